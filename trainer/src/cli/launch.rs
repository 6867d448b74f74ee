//! A node's entry process with several ranks per node (`PET_NPROC_PER_NODE` > 1, as torchrun
//! does): starts one `finetune-trainer` per local rank with the same arguments and its rank's
//! environment, forwards SIGTERM to all of them, and when one fails stops the others, so a node
//! never keeps ranks that wait on a dead peer. Its exit code is the cause: the first failure other
//! than a collective's (the peers of a dead rank fail in their collective at once, often before
//! the dead rank is seen), else the collective's code, else 0.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::distributed::{COLLECTIVE_EXIT_CODE, RankEnv};
use crate::{Result, TrainerError};

/// How long the ranks have to exit after SIGTERM before they are killed (below the pod's grace
/// period, so a checkpoint written on SIGTERM still completes).
const STOP_GRACE: Duration = Duration::from_secs(90);
/// How often the children are polled.
const POLL: Duration = Duration::from_millis(100);

/// Starts a rank for each of `ranks` (its environment), waits for all, and returns the exit code.
pub fn run_local_ranks(ranks: Vec<RankEnv>) -> Result<ExitCode> {
    let exe = std::env::current_exe().map_err(|e| TrainerError::io("current executable", e))?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())
        .map_err(|e| TrainerError::io("SIGTERM handler", e))?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for (local, env) in ranks.into_iter().enumerate() {
        let child = Command::new(&exe)
            .args(&args)
            .envs(env)
            .spawn()
            .map_err(|e| TrainerError::io(&exe, e))?;
        tracing::info!(local_rank = local, pid = child.id(), "started rank");
        children.push((local, child));
    }
    let mut first_failure: Option<(usize, u8)> = None;
    let mut cause: Option<u8> = None;
    let mut stopping_since: Option<Instant> = None;
    let mut running = children.len();
    let mut done: Vec<Option<ExitStatus>> = vec![None; children.len()];
    while running > 0 {
        for (i, (local, child)) in children.iter_mut().enumerate() {
            if done[i].is_some() {
                continue;
            }
            if let Some(status) = child.try_wait().map_err(|e| TrainerError::io(&exe, e))? {
                done[i] = Some(status);
                running -= 1;
                let code = exit_code(status);
                if code != 0 && first_failure.is_none() {
                    tracing::error!(
                        local_rank = *local,
                        code,
                        "rank failed: stopping the others"
                    );
                    first_failure = Some((*local, code));
                }
                if code != 0 && code != COLLECTIVE_EXIT_CODE && cause.is_none() {
                    cause = Some(code);
                }
            }
        }
        let must_stop = first_failure.is_some() || term.load(Ordering::SeqCst);
        if must_stop && stopping_since.is_none() && running > 0 {
            stopping_since = Some(Instant::now());
            signal_running(&children, &done, Signal::SIGTERM);
        }
        if stopping_since.is_some_and(|t| t.elapsed() > STOP_GRACE) {
            signal_running(&children, &done, Signal::SIGKILL);
        }
        if running > 0 {
            std::thread::sleep(POLL);
        }
    }
    Ok(match (cause, first_failure) {
        (Some(code), _) | (None, Some((_, code))) => ExitCode::from(code),
        (None, None) => ExitCode::SUCCESS,
    })
}

/// The code a shell would report: the exit code, or 128 + the signal that ended the process.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(1),
        (None, None) => 1,
    }
}

fn signal_running(children: &[(usize, Child)], done: &[Option<ExitStatus>], signal: Signal) {
    for ((_, child), status) in children.iter().zip(done) {
        if status.is_none()
            && let Ok(pid) = i32::try_from(child.id())
        {
            // Best effort: the child may have exited since it was polled.
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }
}
