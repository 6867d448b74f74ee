//! One container as a local process: its image resolved through the
//! [`ImageMap`](crate::ImageMap), its mounts, the process itself (in its own mount namespace and
//! process group), restarts with back-off per restart policy, the stop with SIGTERM then SIGKILL
//! after the grace period, and its exit code, reason and termination message.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
};
use nix::sys::signal::Signal;

use super::env::{DEFAULT_PATH, expand, resolve_env};
use super::pods::{PodCtx, set_condition, waiting};
use super::volumes::{HostVolume, mkdir};
use super::{Isolation, lock, now};
use crate::process;

/// Where a pod's volume sources are staged inside its mount namespace (a private tmpfs).
const STAGE_DIR: &str = "/run/finetune-sim-stage";

/// Single-quotes `s` for /bin/sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A bind mount: `host` appears at `target` in the container's mount namespace.
struct Mount {
    host: PathBuf,
    target: String,
    read_only: bool,
}

/// How one run of a container ended.
enum Exit {
    Code(i32),
    StartError(String),
}

/// Runs one container (with restarts per policy). Returns its final exit code, or `None` when it
/// never ran to completion (image missing, pod stopped while waiting).
pub(super) async fn run_container(
    ctx: Arc<PodCtx>,
    volumes: Arc<HashMap<String, HostVolume>>,
    c: Container,
    init: bool,
    policy: &str,
) -> Option<i32> {
    let image = c.image.clone().unwrap_or_default();
    let cdir = ctx.dir.join(&c.name);
    let mut restarts = 0i32;
    let mut last: Option<i32> = None;
    loop {
        if ctx.stopping().is_some() {
            return last;
        }
        let Some(spec) = ctx.shared.images.resolve(&image).cloned() else {
            let msg = format!(
                "rpc error: code = NotFound desc = failed to pull and unpack image \"{image}\": not in the simulated node's image map"
            );
            ctx.set_container(init, &c.name, |cs| {
                cs.state = Some(waiting("ErrImagePull", Some(msg.clone())))
            });
            ctx.event(
                true,
                "Failed",
                Some(&c.name),
                format!("Failed to pull image \"{image}\": {msg}"),
            );
            ctx.sleep_or_stop(Duration::from_secs(5)).await;
            if ctx.stopping().is_none() {
                let msg = format!("Back-off pulling image \"{image}\"");
                ctx.set_container(init, &c.name, |cs| {
                    cs.state = Some(waiting("ImagePullBackOff", Some(msg)))
                });
            }
            let mut stop = ctx.stop.clone();
            let _ = stop.wait_for(Option::is_some).await;
            return None;
        };
        let env = match resolve_env(&ctx, &c, &spec.env).await {
            Ok(env) => env,
            Err(msg) => {
                ctx.event(true, "Failed", Some(&c.name), format!("Error: {msg}"));
                ctx.set_container(init, &c.name, |cs| {
                    cs.state = Some(waiting("CreateContainerConfigError", Some(msg)));
                });
                ctx.sleep_or_stop(Duration::from_secs(2)).await;
                continue;
            }
        };
        let argv: Vec<String> = spec
            .argv(
                c.command.as_deref().unwrap_or_default(),
                c.args.as_deref().unwrap_or_default(),
            )
            .iter()
            .map(|a| expand(a, &env))
            .collect();
        let term_path = c
            .termination_message_path
            .clone()
            .unwrap_or_else(|| "/dev/termination-log".into());
        let term_host = cdir.join("termination-log");
        let log = cdir.join(format!("{restarts}.log"));
        let mut mounts = Vec::new();
        for m in c.volume_mounts.as_deref().unwrap_or_default() {
            if let Some(v) = volumes.get(&m.name) {
                let host = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                    Some(sub) => {
                        let p = v.path.join(sub);
                        if !p.exists() {
                            let _ = std::fs::create_dir_all(&p);
                        }
                        p
                    }
                    None => v.path.clone(),
                };
                mounts.push(Mount {
                    host,
                    target: m.mount_path.clone(),
                    read_only: m.read_only == Some(true),
                });
            }
        }
        mounts.push(Mount {
            host: term_host.clone(),
            target: term_path,
            read_only: false,
        });
        // As a kubelet does for `dnsPolicy: ClusterFirst` (the default): the pod resolves names
        // through the cluster DNS, with its namespace first on the search path.
        let spec = ctx.pod.spec.as_ref();
        let cluster_first = spec
            .and_then(|s| s.dns_policy.as_deref())
            .is_none_or(|p| p == "ClusterFirst")
            && spec.and_then(|s| s.host_network) != Some(true);
        if let Some(dns) = ctx.shared.dns.filter(|_| cluster_first) {
            let resolv = cdir.join("resolv.conf");
            let written = std::fs::create_dir_all(&cdir)
                .and_then(|()| std::fs::write(&resolv, crate::dns::resolv_conf(dns, &ctx.ns)));
            match written {
                Ok(()) => mounts.push(Mount {
                    host: resolv,
                    target: "/etc/resolv.conf".into(),
                    read_only: true,
                }),
                Err(e) => tracing::warn!("{}: {e}", resolv.display()),
            }
        }
        let started_at = now();
        ctx.event(
            false,
            "Pulled",
            Some(&c.name),
            format!(
                "Container image \"{image}\" already present on machine (simulated: image map)"
            ),
        );
        let exit = match spawn_process(&ctx, &c, &argv, &env, &mounts, &cdir, &log) {
            Err(e) => {
                ctx.event(true, "Failed", Some(&c.name), format!("Error: {e}"));
                Exit::StartError(e)
            }
            Ok(mut child) => {
                ctx.event(
                    false,
                    "Created",
                    Some(&c.name),
                    format!("Created container {}", c.name),
                );
                ctx.event(
                    false,
                    "Started",
                    Some(&c.name),
                    format!("Started container {}", c.name),
                );
                let pid = child.id().and_then(|p| i32::try_from(p).ok());
                ctx.record(&c.name, |r| {
                    r.pgid = pid;
                    r.forced_exit = None;
                    r.log = Some(log.clone());
                });
                ctx.set_container(init, &c.name, |cs| {
                    cs.container_id = Some(format!("sim://{}", pid.unwrap_or_default()));
                    cs.started = Some(true);
                    cs.ready = !init;
                    cs.state = Some(ContainerState {
                        running: Some(ContainerStateRunning {
                            started_at: Some(started_at.clone()),
                        }),
                        ..ContainerState::default()
                    });
                });
                if !init {
                    ctx.update(|s| {
                        s.phase = Some("Running".into());
                        let all_ready = s
                            .container_statuses
                            .as_ref()
                            .is_some_and(|l| l.iter().all(|c| c.ready));
                        set_condition(
                            s,
                            "ContainersReady",
                            all_ready,
                            (!all_ready).then_some("ContainersNotReady"),
                        );
                        set_condition(
                            s,
                            "Ready",
                            all_ready,
                            (!all_ready).then_some("ContainersNotReady"),
                        );
                    });
                }
                let code = wait_or_stop(&ctx, &mut child, pid).await;
                let forced = {
                    let pods = lock(&ctx.shared.pods);
                    pods.get(&format!("{}/{}", ctx.ns, ctx.name))
                        .and_then(|p| p.containers.get(&c.name))
                        .and_then(|r| r.forced_exit)
                };
                ctx.record(&c.name, |r| r.pgid = None);
                Exit::Code(forced.unwrap_or(code))
            }
        };
        let (code, reason, mut message) = match exit {
            Exit::Code(code) => {
                let reason = match code {
                    0 => "Completed",
                    137 => "OOMKilled",
                    _ => "Error",
                };
                let msg = read_limited(&term_host, 4096);
                (code, reason, msg)
            }
            Exit::StartError(e) => (128, "StartError", e),
        };
        if message.is_empty()
            && code != 0
            && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
        {
            message = log_tail(&log, 80, 2048);
        }
        last = Some(code);
        let terminated = ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(reason.into()),
                message: (!message.is_empty()).then_some(message),
                started_at: Some(started_at),
                finished_at: Some(now()),
                container_id: None,
                signal: None,
            }),
            ..ContainerState::default()
        };
        let restart = ctx.stopping().is_none()
            && match policy {
                "Always" => !init || code != 0,
                "OnFailure" => code != 0,
                _ => false,
            };
        if !restart {
            ctx.set_container(init, &c.name, |cs| {
                cs.ready = false;
                cs.started = Some(false);
                cs.state = Some(terminated);
            });
            if !init {
                ctx.update(|s| {
                    set_condition(s, "ContainersReady", false, Some("ContainersNotReady"));
                    set_condition(s, "Ready", false, Some("ContainersNotReady"));
                });
            }
            return last;
        }
        restarts += 1;
        let backoff =
            Duration::from_secs(1u64 << restarts.clamp(0, 4) as u32).min(Duration::from_secs(10));
        ctx.event(
            true,
            "BackOff",
            Some(&c.name),
            format!("Back-off restarting failed container {}", c.name),
        );
        ctx.set_container(init, &c.name, |cs| {
            cs.ready = false;
            cs.started = Some(false);
            cs.restart_count = restarts;
            cs.last_state = Some(terminated);
            cs.state = Some(waiting(
                "CrashLoopBackOff",
                Some(format!(
                    "back-off {}s restarting failed container={}",
                    backoff.as_secs(),
                    c.name
                )),
            ));
        });
        if !init {
            ctx.update(|s| {
                set_condition(s, "ContainersReady", false, Some("ContainersNotReady"));
                set_condition(s, "Ready", false, Some("ContainersNotReady"));
            });
        }
        ctx.sleep_or_stop(backoff).await;
    }
}

/// Waits for the process; on a stop request, SIGTERM then SIGKILL after the grace period.
async fn wait_or_stop(ctx: &PodCtx, child: &mut tokio::process::Child, pgid: Option<i32>) -> i32 {
    let code_of = |s: std::io::Result<std::process::ExitStatus>| match s {
        Ok(s) => s
            .code()
            .or_else(|| s.signal().map(|sig| 128 + sig))
            .unwrap_or(255),
        Err(_) => 255,
    };
    let mut stop = ctx.stop.clone();
    let grace = tokio::select! {
        s = child.wait() => return code_of(s),
        g = stop.wait_for(Option::is_some) => g.ok().and_then(|g| *g).unwrap_or_default(),
    };
    ctx.event(
        false,
        "Killing",
        None,
        format!("Stopping container (grace period {}s)", grace.as_secs()),
    );
    if let Some(pgid) = pgid {
        let _ = process::signal_group(pgid, Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(s) => code_of(s),
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = process::signal_group(pgid, Signal::SIGKILL);
            }
            code_of(child.wait().await)
        }
    }
}

fn read_limited(path: &Path, max: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned()
}

fn log_tail(path: &Path, lines: usize, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    let start = tail.len().saturating_sub(max);
    tail.get(start..).unwrap_or_default().to_string()
}

/// Container processes start with every signal at its default disposition, as a container
/// runtime starts them: a harness started in the background by a non-interactive shell (CI
/// scripts, `cmd &`) has SIGINT and SIGQUIT ignored, children inherit that through exec, and a
/// container would then survive the SIGINT a test sends it. GNU `env --default-signal` resets
/// them (no `unsafe` `pre_exec` needed) and then execs the container's command (same pid).
const RESET_SIGNALS_ENV: &str = "/usr/bin/env";
/// See [`RESET_SIGNALS_ENV`].
const RESET_SIGNALS_FLAG: &str = "--default-signal";

fn spawn_process(
    ctx: &PodCtx,
    c: &Container,
    argv: &[String],
    env: &[(String, String)],
    mounts: &[Mount],
    cdir: &Path,
    log: &Path,
) -> Result<tokio::process::Child, String> {
    mkdir(cdir)?;
    let term_host = cdir.join("termination-log");
    std::fs::write(&term_host, b"").map_err(|e| format!("{}: {e}", term_host.display()))?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let Some(program) = argv.first() else {
        return Err("no command specified".into());
    };
    let mut cmd = match ctx.shared.isolation {
        Isolation::MountNamespace => {
            // Two phases, so that a volume mounted over a directory holding other volumes'
            // host sources (an emptyDir at /tmp, say) cannot hide them: first every source is
            // bound into a private staging tmpfs, then the staged copies are bound at their
            // targets, parents before children.
            let mut script = String::from("set -e\n");
            script.push_str(&format!(
                "mount -t tmpfs sim-stage {stage}\n",
                stage = sh_quote(STAGE_DIR)
            ));
            mkdir(Path::new(STAGE_DIR))?;
            for (i, m) in mounts.iter().enumerate() {
                let target = Path::new(&m.target);
                ensure_target(&m.host, target)?;
                let staged = format!("{STAGE_DIR}/{i}");
                let make = if m.host.is_dir() { "mkdir" } else { "touch" };
                script.push_str(&format!(
                    "{make} {staged}\nmount --bind {} {staged}\n",
                    sh_quote(&m.host.display().to_string()),
                    staged = sh_quote(&staged)
                ));
            }
            // The executable, too, lives on the host file system (the simulated image): stage
            // it before any volume (an emptyDir at /tmp, say) can hide the directory it is in.
            let mut argv = argv.to_vec();
            if let Some(exe) = argv.first_mut().filter(|p| p.starts_with('/'))
                && Path::new(exe.as_str()).is_file()
            {
                let staged = format!("{STAGE_DIR}/entrypoint");
                script.push_str(&format!(
                    "touch {staged}\nmount --bind {} {staged}\n",
                    sh_quote(exe),
                    staged = sh_quote(&staged)
                ));
                *exe = staged;
            }
            let mut order: Vec<usize> = (0..mounts.len()).collect();
            order.sort_by_key(|i| Path::new(&mounts[*i].target).components().count());
            for i in order {
                let m = &mounts[i];
                script.push_str(&format!(
                    "mount --bind {} {}\n",
                    sh_quote(&format!("{STAGE_DIR}/{i}")),
                    sh_quote(&m.target)
                ));
                if m.read_only {
                    script.push_str(&format!(
                        "mount -o remount,bind,ro {}\n",
                        sh_quote(&m.target)
                    ));
                }
            }
            let wd = c
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| "/".into());
            script.push_str(&format!(
                "mkdir -p {wd} && cd {wd}\nexec {RESET_SIGNALS_ENV} {RESET_SIGNALS_FLAG} -- \"$@\"\n",
                wd = sh_quote(&wd)
            ));
            let mut cmd = tokio::process::Command::new("unshare");
            cmd.args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                &script,
                "sim-pod",
            ]);
            cmd.args(&argv);
            cmd
        }
        Isolation::PathEnv => {
            if program.contains('/') && !Path::new(program).is_file() {
                return Err(format!("starting {program}: no such file"));
            }
            let mut cmd = tokio::process::Command::new(RESET_SIGNALS_ENV);
            cmd.arg(RESET_SIGNALS_FLAG).arg("--").arg(program);
            cmd.args(&argv[1..]);
            let mapping: Vec<String> = mounts
                .iter()
                .map(|m| format!("{}={}", m.target, m.host.display()))
                .collect();
            cmd.env("FINETUNE_SIM_MOUNTS", mapping.join(";"));
            cmd.env("FINETUNE_SIM_TERMINATION_LOG", &term_host);
            let wd = c
                .working_dir
                .as_ref()
                .map(PathBuf::from)
                .filter(|w| w.is_dir())
                .unwrap_or_else(|| cdir.to_path_buf());
            cmd.current_dir(wd);
            cmd
        }
    };
    cmd.env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    if ctx.shared.isolation == Isolation::MountNamespace {
        // unshare itself must be found even if the pod's PATH is odd.
        cmd.env(
            "PATH",
            env.iter()
                .rev()
                .find(|(k, _)| k == "PATH")
                .map_or(DEFAULT_PATH, |(_, v)| v),
        );
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    if let Some(pid) = child.id() {
        ctx.shared.pids.record(pid);
    }
    Ok(child)
}

/// Creates the mount target on the host when missing (a bind mount needs an existing target).
fn ensure_target(host: &Path, target: &Path) -> Result<(), String> {
    if target.exists() {
        return Ok(());
    }
    if host.is_dir() {
        mkdir(target)
    } else {
        if let Some(parent) = target.parent() {
            mkdir(parent)?;
        }
        std::fs::write(target, b"").map_err(|e| format!("{}: {e}", target.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_sh() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
