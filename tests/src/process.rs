//! Host processes started by the harness: each runs in its own process group, is recorded in the
//! cluster's pid file, and is stopped by its recorded pid (SIGTERM to the group, then SIGKILL).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::{Error, Result};

/// Appends process-group ids to a file that the reaper (and `finetune-cluster down`) reads.
#[derive(Debug, Clone)]
pub(crate) struct PidRegistry {
    path: PathBuf,
}

impl PidRegistry {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Records the process group `pgid`.
    pub(crate) fn record(&self, pgid: u32) {
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{pgid}"));
        if let Err(e) = written {
            tracing::warn!("cannot record pid {pgid} in {}: {e}", self.path.display());
        }
    }

    /// All recorded process groups.
    pub(crate) fn read(path: &Path) -> Vec<i32> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .filter(|p| *p > 1)
            .collect()
    }
}

/// Sends `sig` to the process group `pgid`; a group that is already gone is not an error.
pub(crate) fn signal_group(pgid: i32, sig: Signal) -> Result<()> {
    match killpg(Pid::from_raw(pgid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether any process of group `pgid` is alive.
pub(crate) fn group_alive(pgid: i32) -> bool {
    killpg(Pid::from_raw(pgid), None).is_ok()
}

/// A long-running control-plane process (etcd, kube-apiserver, …).
#[derive(Debug)]
pub(crate) struct ManagedProcess {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ManagedProcess {
    /// Starts `program args` in a new process group, stdout and stderr appended to `log`.
    pub(crate) fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        pids: &PidRegistry,
    ) -> Result<Self> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io(format!("open {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io(format!("dup {}", log.display()), e))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::io(format!("start {name} ({})", program.display()), e))?;
        pids.record(child.id());
        tracing::debug!(pid = child.id(), "started {name}");
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Sends `signal` to the process (not its group), e.g. SIGSTOP to freeze it.
    pub(crate) fn signal(&self, signal: Signal) -> Result<()> {
        let Some(pid) = self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok()) else {
            return Err(Error::ControlPlane(format!("{} is not running", self.name)));
        };
        nix::sys::signal::kill(Pid::from_raw(pid), signal)
            .map_err(|e| Error::ControlPlane(format!("signal {signal} to {}: {e}", self.name)))
    }

    /// The log file.
    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` when the process has exited.
    pub(crate) fn exited(&mut self) -> Option<String> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(e)) => Some(e.to_string()),
            _ => None,
        }
    }

    /// SIGTERM to the process group, then SIGKILL after `grace`; waits for the process.
    pub(crate) fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let Ok(pgid) = i32::try_from(child.id()) else {
            return;
        };
        let _ = signal_group(pgid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = signal_group(pgid, Signal::SIGKILL);
                    let _ = child.wait();
                    break;
                }
            }
        }
        // Anything else left in the group (children of the process) goes too.
        if group_alive(pgid) {
            let _ = signal_group(pgid, Signal::SIGKILL);
        }
        tracing::debug!("stopped {}", self.name);
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Starts a watchdog shell that, once `owner_pid` is gone (the test process died without running
/// its destructors) or `stop_file` appears, kills every process group recorded in the pid file and
/// then removes the directories in `cleanup`.
pub(crate) fn spawn_reaper(
    owner_pid: u32,
    pids: &PidRegistry,
    stop_file: &Path,
    cleanup: &[PathBuf],
) -> Result<Child> {
    let script = r#"
owner=$1; pids=$2; stop=$3; shift 3
while kill -0 "$owner" 2>/dev/null && [ ! -e "$stop" ]; do sleep 1; done
[ -e "$stop" ] && exit 0
for g in $(cat "$pids" 2>/dev/null); do kill -TERM "-$g" 2>/dev/null; done
sleep 3
for g in $(cat "$pids" 2>/dev/null); do kill -KILL "-$g" 2>/dev/null; done
for d in "$@"; do rm -rf -- "$d"; done
"#;
    Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .arg("finetune-e2e-reaper")
        .arg(owner_pid.to_string())
        .arg(pids.path())
        .arg(stop_file)
        .args(cleanup)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io("start reaper", e))
}
