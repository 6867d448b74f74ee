//! Fault injection against the real control plane (etcd, kube-apiserver v1.20.2, scheduler,
//! controller-manager), the real operator binary and the real tiny trainer on simulated nodes:
//!
//! - the operator aborted right after each API write of a reconcile (its `failpoints` crash
//!   points), then restarted: it converges to one pod per job, every child owned, status kept;
//! - a simulated node deleted under a running job: rescheduled on the other node, resumed from
//!   the checkpoint, counted as a disruption and not against `backoffLimit`;
//! - the API server stopped for 30 s and then frozen (SIGSTOP) for 30 s under a running job: the
//!   same operator process recovers by itself, with a bounded request rate during the outage
//!   (counted by a TCP proxy in front of the API server), and the job succeeds;
//! - watch expiry (HTTP 410 Gone): the operator paused, the job suspended, the API server
//!   restarted without watch cache and etcd compacted past the operator's resourceVersion: after
//!   SIGCONT the operator relists and acts on the suspension.
//!
//! The operator runs as `finetune-operator-failpoints`, this crate's build of the operator's own
//! `main` with the `failpoints` feature (cargo builds it for this test); the trainer is the
//! workspace's `finetune-trainer` (`cargo build --workspace --bins`). Each check prints figures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::job::{
    NS, TRAIN, active, apply_ok, checkpoint_step, condition, env, env_with, http_get, job,
    job_pods, metric, phase, resumed_from, step, tiny_job, tiny_job_with, wait_job,
};
use finetune_api::{FineTuneJob, JOB_LABEL, JobPhase};
use finetune_e2e::operator::OperatorProcess;
use finetune_e2e::proxy::CountingProxy;
use finetune_e2e::{Cluster, NodeSpec, Signal};
use finetune_operator::failpoints::CRASH_POINTS;
use finetune_operator::names;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

/// The two tests start their own clusters and trainers; one at a time on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The operator with its crash points compiled in (this crate's bin target; the same `main`).
const OPERATOR: &str = env!("CARGO_BIN_EXE_finetune-operator-failpoints");

/// The operator executable: [`OPERATOR`], or `CHAOS_OPERATOR` (e.g. a build of another commit,
/// to tell a regression from an old fault).
fn operator_bin() -> std::path::PathBuf {
    std::env::var_os("CHAOS_OPERATOR").map_or_else(|| OPERATOR.into(), Into::into)
}

const STATUS_WRITES_OK: &str = "finetune_operator_status_writes_total{result=\"ok\"}";
const RECONCILES_OK: &str = "finetune_operator_reconcile_total{result=\"ok\"}";

/// `CHAOS_POINTS=a,b` runs only those crash points (to debug one); all by default.
fn selected(point: &str) -> bool {
    std::env::var("CHAOS_POINTS").map_or(true, |only| only.split(',').any(|p| p == point))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Every child of the job (pods, ConfigMaps, Services, NetworkPolicies, claims with the job label) has the
/// job as its controller owner; returns how many children there are.
async fn assert_owned(cluster: &Cluster, j: &FineTuneJob) -> usize {
    let name = j.name_any();
    let uid = j.uid().unwrap();
    let lp = ListParams::default().labels(&format!("{JOB_LABEL}={name}"));
    let c = cluster.client();
    let mut children: Vec<(String, Vec<_>)> = Vec::new();
    for p in Api::<Pod>::namespaced(c.clone(), NS)
        .list(&lp)
        .await
        .unwrap()
    {
        children.push((
            format!("pod/{}", p.name_any()),
            p.owner_references().to_vec(),
        ));
    }
    for o in Api::<ConfigMap>::namespaced(c.clone(), NS)
        .list(&lp)
        .await
        .unwrap()
    {
        children.push((
            format!("configmap/{}", o.name_any()),
            o.owner_references().to_vec(),
        ));
    }
    for o in Api::<Service>::namespaced(c.clone(), NS)
        .list(&lp)
        .await
        .unwrap()
    {
        children.push((
            format!("service/{}", o.name_any()),
            o.owner_references().to_vec(),
        ));
    }
    for o in Api::<NetworkPolicy>::namespaced(c.clone(), NS)
        .list(&lp)
        .await
        .unwrap()
    {
        children.push((
            format!("networkpolicy/{}", o.name_any()),
            o.owner_references().to_vec(),
        ));
    }
    for o in Api::<PersistentVolumeClaim>::namespaced(c.clone(), NS)
        .list(&lp)
        .await
        .unwrap()
    {
        children.push((
            format!("pvc/{}", o.name_any()),
            o.owner_references().to_vec(),
        ));
    }
    for (what, owners) in &children {
        assert!(
            owners
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true) && o.kind == "FineTuneJob"),
            "{what} is an orphan: owners {owners:?}, job uid {uid}"
        );
    }
    children.len()
}

/// Whether the job has converged after a crash on the create path: status written for the
/// current generation, exactly one live trainer pod (attempt 0), its ConfigMap, Service and claim.
async fn created_and_converged(cluster: &Cluster, name: &str) -> Option<FineTuneJob> {
    let j = Api::<FineTuneJob>::namespaced(cluster.client(), NS)
        .get(name)
        .await
        .ok()?;
    let s = j.status.as_ref()?;
    if s.observed_generation != j.metadata.generation
        || !matches!(s.phase, Some(JobPhase::Pending | JobPhase::Running))
        || condition(&j, "Ready").is_none()
    {
        return None;
    }
    let pods = job_pods(cluster, name).await;
    if pods.len() != 1 || active(&pods) != vec![names::trainer_pod(name, 0)] {
        return None;
    }
    let c = cluster.client();
    let cm = Api::<ConfigMap>::namespaced(c.clone(), NS)
        .get_opt(&names::config_map(name))
        .await
        .ok()??;
    let svc = Api::<Service>::namespaced(c.clone(), NS)
        .get_opt(&names::metrics_service(name))
        .await
        .ok()??;
    let pvc = Api::<PersistentVolumeClaim>::namespaced(c, NS)
        .get_opt(&names::checkpoint_claim(name))
        .await
        .ok()??;
    let _ = (cm, svc, pvc);
    Some(j)
}

struct Harness<'a> {
    e: &'a common::job::Env,
    runs: usize,
}

impl Harness<'_> {
    fn operator(&mut self, failpoint: Option<&str>) -> OperatorProcess {
        self.runs += 1;
        let spec = failpoint.map(|p| format!("{p}=return"));
        let log = std::env::var("CHAOS_RUST_LOG").ok();
        let env: Vec<(&str, &str)> = spec
            .iter()
            .map(|s| ("FAILPOINTS", s.as_str()))
            .chain(log.iter().map(|l| ("RUST_LOG", l.as_str())))
            .collect();
        OperatorProcess::start_with_env(
            &self.e.cluster,
            &self.e.ws,
            &self.e.tiny,
            &self.e.assets,
            &format!("operator-{}", self.runs),
            &[],
            &env,
            Some(operator_bin().as_path()),
        )
        .unwrap()
    }

    /// Waits for the armed operator to abort at `point`.
    async fn expect_abort(&self, op: &mut OperatorProcess, point: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while op.is_running() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if op.is_running() {
            let out = self
                .e
                .cluster
                .kubectl()
                .args(["get", "ftj,pods,cm,svc,pvc", "-o", "wide"])
                .output()
                .await
                .unwrap();
            panic!(
                "the operator did not reach crash point {point}; cluster:\n{}\nlog:\n{}",
                String::from_utf8_lossy(&out.stdout),
                op.log_text()
            );
        }
        let log = op.log_text();
        assert!(
            log.contains(&format!("crash point {point} fired")),
            "the operator exited, but not at {point}; log:\n{log}"
        );
    }
}

async fn converge<T, F, Fut>(what: &str, f: F) -> (T, f64)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = Instant::now();
    let v = common::wait_for(Duration::from_secs(180), what, f).await;
    (v, t0.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_converges_after_a_crash_at_every_write() {
    let _serial = SERIAL.lock().await;
    let e = env().await;
    const {
        assert!(
            finetune_operator::failpoints::COMPILED,
            "finetune-e2e enables the operator's failpoints feature"
        )
    };
    let mut h = Harness { e: &e, runs: 0 };
    let mut times: Vec<(String, f64)> = Vec::new();
    let jobs = Api::<FineTuneJob>::namespaced(e.cluster.client(), NS);

    // The create path: the operator aborts right after its first write of that kind for a fresh
    // job (every applied child, the status, the event), is restarted without the crash point,
    // and must end with one pod, every child owned and the status of the current generation.
    let create_path = CRASH_POINTS
        .iter()
        .filter(|p| !p.starts_with("after-delete-"));
    for (i, point) in create_path.enumerate() {
        if !selected(point) {
            continue;
        }
        let name = format!("crash-{i}");
        let mut armed = h.operator(Some(point));
        // The binary must carry the crash points (a `-p finetune-operator` build does not).
        if i == 0 {
            common::wait_for(Duration::from_secs(60), "the operator to start", || async {
                armed.log_text().contains("serving /metrics").then_some(())
            })
            .await;
            assert!(
                armed.log_text().contains("crash points compiled in"),
                "{OPERATOR} lacks the crash points"
            );
        }
        apply_ok(&e.cluster, &tiny_job(&name, 400, 50)).await;
        h.expect_abort(&mut armed, point).await;
        let op = h.operator(None);
        // Converged: the restarted operator reconciled without error and the state is right.
        let (j, secs) = converge(&format!("{name} to converge after {point}"), || async {
            (scrape(&op, RECONCILES_OK).await >= 1.0).then_some(())?;
            created_and_converged(&e.cluster, &name).await
        })
        .await;
        // Stays converged: no second pod appears once the restarted operator settles.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            job_pods(&e.cluster, &name).await.len(),
            1,
            "a duplicate pod after {point}"
        );
        let children = assert_owned(&e.cluster, &j).await;
        eprintln!("crash point {point}: converged in {secs:.1}s ({children} children, all owned)");
        times.push((point.to_string(), secs));
        drop(op);
        jobs.delete(&name, &DeleteParams::background())
            .await
            .unwrap();
    }

    // The delete path of a suspension: abort right after the trainer pod's deletion.
    if selected("after-delete-pod") {
        let point = "after-delete-pod";
        let name = "crash-suspend";
        let op = h.operator(None);
        apply_ok(&e.cluster, &tiny_job(name, 400, 50)).await;
        wait_job(&e.cluster, name, TRAIN, "Running", |j| {
            phase(j) == Some(JobPhase::Running)
        })
        .await;
        drop(op);
        let mut armed = h.operator(Some(point));
        jobs.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
        h.expect_abort(&mut armed, point).await;
        let _op = h.operator(None);
        let (j, secs) = converge(&format!("{name} Suspended after {point}"), || async {
            (scrape(&_op, RECONCILES_OK).await >= 1.0).then_some(())?;
            let j = jobs.get(name).await.ok()?;
            let s = j.status.as_ref()?;
            (s.phase == Some(JobPhase::Suspended)
                && s.observed_generation == j.metadata.generation
                && active(&job_pods(&e.cluster, name).await).is_empty())
            .then_some(j)
        })
        .await;
        assert_owned(&e.cluster, &j).await;
        assert_eq!(j.status.as_ref().unwrap().restarts, 0);
        eprintln!("crash point {point}: converged (Suspended, no live pod) in {secs:.1}s");
        times.push((point.to_string(), secs));
        drop(_op);
        jobs.delete(name, &DeleteParams::background())
            .await
            .unwrap();
    }

    // The TTL path of a finished job (ttlSecondsAfterFinished: 0): abort right after deleting
    // the ConfigMap, and (another job) right after deleting the Service; the NetworkPolicy goes
    // too.
    for point in ["after-delete-configmap", "after-delete-service"] {
        if !selected(point) {
            continue;
        }
        let name = format!("crash-ttl-{}", point.rsplit('-').next().unwrap());
        let mut doc: serde_yaml::Value = serde_yaml::from_str(&tiny_job(&name, 400, 50)).unwrap();
        doc["spec"]["ttlSecondsAfterFinished"] = 0.into();
        let op = h.operator(None);
        apply_ok(&e.cluster, &serde_yaml::to_string(&doc).unwrap()).await;
        wait_job(&e.cluster, &name, TRAIN, "Running", |j| {
            phase(j) == Some(JobPhase::Running)
        })
        .await;
        drop(op);
        let mut armed = h.operator(Some(point));
        // The trainer "finishes": its container exits 0.
        e.cluster
            .fail_container(NS, &names::trainer_pod(&name, 0), "trainer", 0)
            .unwrap();
        h.expect_abort(&mut armed, point).await;
        let before = job(&e.cluster, &name).await;
        let done = before
            .status
            .as_ref()
            .and_then(|s| s.completion_time.clone());
        assert_eq!(phase(&before), Some(JobPhase::Succeeded));
        let policy = Api::<NetworkPolicy>::namespaced(e.cluster.client(), NS)
            .get_opt(&names::network_policy(&name))
            .await
            .unwrap();
        assert!(
            policy.is_some(),
            "the trainer NetworkPolicy exists before the TTL"
        );
        let _op = h.operator(None);
        let c = e.cluster.client();
        let (j, secs) = converge(&format!("{name} cleaned up after {point}"), || async {
            (scrape(&_op, RECONCILES_OK).await >= 1.0).then_some(())?;
            let cm = Api::<ConfigMap>::namespaced(c.clone(), NS)
                .get_opt(&names::config_map(&name))
                .await
                .ok()?;
            let svc = Api::<Service>::namespaced(c.clone(), NS)
                .get_opt(&names::metrics_service(&name))
                .await
                .ok()?;
            let policy = Api::<NetworkPolicy>::namespaced(c.clone(), NS)
                .get_opt(&names::network_policy(&name))
                .await
                .ok()?;
            let pods = job_pods(&e.cluster, &name).await;
            let live = pods.iter().any(|p| p.metadata.deletion_timestamp.is_none());
            (cm.is_none() && svc.is_none() && policy.is_none() && !live).then_some(())?;
            jobs.get(&name).await.ok()
        })
        .await;
        let s = j.status.clone().unwrap();
        assert_eq!(s.phase, Some(JobPhase::Succeeded), "status kept: {s:?}");
        assert_eq!(s.completion_time, done, "completion time kept");
        assert!(s.output.is_some(), "output kept: {s:?}");
        let claim = Api::<PersistentVolumeClaim>::namespaced(c.clone(), NS)
            .get_opt(&names::checkpoint_claim(&name))
            .await
            .unwrap();
        assert!(claim.is_some(), "the TTL keeps the checkpoint claim");
        assert_owned(&e.cluster, &j).await;
        eprintln!("crash point {point}: converged (children deleted, claim kept) in {secs:.1}s");
        times.push((point.to_string(), secs));
    }

    let covered: std::collections::BTreeSet<&str> = times.iter().map(|(p, _)| p.as_str()).collect();
    if std::env::var_os("CHAOS_POINTS").is_none() {
        assert_eq!(
            covered,
            CRASH_POINTS.iter().copied().collect(),
            "every declared crash point is exercised"
        );
    }
    let mut secs: Vec<f64> = times.iter().map(|t| t.1).collect();
    let max = secs.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "CRASH POINTS: {} covered, operator restarts {}, time to converge max {max:.1}s median {:.1}s",
        times.len(),
        h.runs,
        median(&mut secs)
    );
    e.cluster.shutdown().await;
}

/// How long the operator may take to write again after the API server is back.
const RECOVERY_LIMIT: Duration = Duration::from_secs(120);
/// A recovery slower than this prints the operator's log since the API server was back.
const SLOW_RECOVERY: Duration = Duration::from_secs(10);

/// The tiny job with its epochs and step budget out of reach while the test runs, so it is still
/// training (and writing status) through both outages however fast the machine is.
fn endless_job(name: &str) -> String {
    let mut doc: serde_yaml::Value =
        serde_yaml::from_str(&tiny_job_with(name, 1_000_000, 50, 200)).unwrap();
    doc["spec"]["hyperparameters"]["epochs"] = 1_000.into();
    // Early stopping would end it too: at 2,000 tokens/s the sample's patience ran out at step
    // 800 during a slow freeze recovery (the CI failure of 2026-12-01).
    doc["spec"]["evaluation"]
        .as_mapping_mut()
        .unwrap()
        .remove("earlyStopping");
    serde_yaml::to_string(&doc).unwrap()
}

/// The job's current step; panics unless it is still Running, naming `when` (a precondition:
/// an outage under a finished job has nothing to recover).
async fn still_training(cluster: &Cluster, name: &str, when: &str) -> u64 {
    let j = job(cluster, name).await;
    assert_eq!(
        phase(&j),
        Some(JobPhase::Running),
        "job {name} is not training {when}: {:#?}",
        j.status
    );
    step(&j)
}

/// Polls the operator's `/metrics` until its successful status writes exceed `base`; seconds
/// since the call. Past [`RECOVERY_LIMIT`] the failure shows the operator's log, the API server's
/// log and what the proxy saw.
async fn first_write_after(
    op: &OperatorProcess,
    cluster: &Cluster,
    proxy: &CountingProxy,
    base: f64,
) -> f64 {
    let (series, limit) = (STATUS_WRITES_OK, RECOVERY_LIMIT);
    let t0 = Instant::now();
    let log_before = op.log_text().len();
    loop {
        let addr = op.metrics.clone();
        let v = tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
            .await
            .unwrap()
            .map_or(0.0, |b| metric(&b, series));
        if v > base {
            let took = t0.elapsed();
            if took >= SLOW_RECOVERY {
                let log = op.log_text();
                eprintln!(
                    "SLOW RECOVERY ({:.1}s): the operator's log since the API server was back:\n{}",
                    took.as_secs_f64(),
                    tail(&log[log_before.min(log.len())..], 40)
                );
            }
            return took.as_secs_f64();
        }
        // A dead API server is the control plane's failure, not the operator's: say so.
        if let Some(exit) = cluster.apiserver_exited() {
            panic!(
                "kube-apiserver exited {:.1}s after recovery, before the operator could write: \
                 {exit}",
                t0.elapsed().as_secs_f64()
            );
        }
        if t0.elapsed() >= limit {
            let now = Instant::now();
            let apiserver = std::fs::read_to_string(cluster.dir().join("logs/kube-apiserver.log"))
                .unwrap_or_default();
            panic!(
                "no successful write within {limit:?} after recovery; the proxy accepted {} \
                 connections since, {} of them refused upstream; operator log tail:\n{}\n\
                 kube-apiserver log tail:\n{}",
                proxy.accepted_between(t0, now),
                proxy.refused_between(t0, now),
                tail(&op.log_text(), 30),
                tail(&apiserver, 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn scrape(op: &OperatorProcess, series: &str) -> f64 {
    let addr = op.metrics.clone();
    tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
        .await
        .unwrap()
        .map_or(0.0, |b| metric(&b, series))
}

/// etcd's JSON gateway: `POST {endpoint}{path}` with a JSON body.
async fn etcd_post(endpoint: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-X", "POST", &format!("{endpoint}{path}"), "-d"])
        .arg(body.to_string())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn signal_pid(pid: u32, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_rides_out_node_loss_api_outages_and_watch_expiry() {
    let _serial = SERIAL.lock().await;
    // No watch cache: watches are served from etcd, so compaction expires them (410 Gone).
    let e = env_with(
        vec![NodeSpec::gpu("sim-gpu-a", 2), NodeSpec::gpu("sim-gpu-b", 2)],
        vec!["--watch-cache=false".into()],
    )
    .await;
    // The operator reaches the API server through a counting proxy.
    let url = e.cluster.server_url();
    let upstream: std::net::SocketAddr = url.trim_start_matches("https://").parse().unwrap();
    let proxy = CountingProxy::start(upstream).await.unwrap();
    let kubeconfig = e.cluster.dir().join("proxy.kubeconfig");
    std::fs::write(
        &kubeconfig,
        std::fs::read_to_string(e.cluster.kubeconfig_path())
            .unwrap()
            .replace(&url, &format!("https://{}", proxy.addr())),
    )
    .unwrap();
    let kc = kubeconfig.display().to_string();
    // The watcher reports each watch error (410 Gone included) at debug level; CHAOS_RUST_LOG
    // overrides the filter to debug the operator.
    let rust_log = std::env::var("CHAOS_RUST_LOG")
        .unwrap_or_else(|_| "info,kube=warn,kube_runtime::watcher=debug".into());
    let mut op = OperatorProcess::start_with_env(
        &e.cluster,
        &e.ws,
        &e.tiny,
        &e.assets,
        "operator",
        &[],
        &[("KUBECONFIG", kc.as_str()), ("RUST_LOG", rust_log.as_str())],
        Some(operator_bin().as_path()),
    )
    .unwrap();
    let pid = op.pid();
    let name = "node-loss";
    let t_apply = Instant::now();
    apply_ok(&e.cluster, &tiny_job_with(name, 40, 5, 40)).await;

    // --- Node deleted under the running trainer ---
    let j = wait_job(&e.cluster, name, TRAIN, "a checkpoint at step >= 5", |j| {
        checkpoint_step(j) >= 5 && step(j) >= 6
    })
    .await;
    let ckpt = checkpoint_step(&j);
    eprintln!(
        "node-loss: step {} (checkpoint {ckpt}) {:.0}s after apply",
        step(&j),
        t_apply.elapsed().as_secs_f64()
    );
    let pod = Api::<Pod>::namespaced(e.cluster.client(), NS)
        .get(&names::trainer_pod(name, 0))
        .await
        .unwrap();
    let node_a = pod.spec.unwrap().node_name.unwrap();
    let t_loss = Instant::now();
    e.cluster.delete_node(&node_a).await.unwrap();
    let j = wait_job(
        &e.cluster,
        name,
        TRAIN,
        "a trainer resumed on the other node",
        |j| j.status.as_ref().is_some_and(|s| s.disruptions >= 1) && resumed_from(j) >= ckpt,
    )
    .await;
    let s = j.status.clone().unwrap();
    let attempt = s.restarts + s.disruptions;
    let new_pod = Api::<Pod>::namespaced(e.cluster.client(), NS)
        .get(&names::trainer_pod(name, attempt))
        .await
        .unwrap();
    let node_b = new_pod.spec.unwrap().node_name.unwrap();
    assert_ne!(node_b, node_a, "rescheduled on another node");
    assert_eq!(s.restarts, 0, "a lost node is not a failure: {s:?}");
    assert!(
        resumed_from(&j) >= ckpt,
        "resumed at {} < checkpoint {ckpt}",
        resumed_from(&j)
    );
    eprintln!(
        "NODE LOSS: {node_a} deleted at step {}, checkpoint {ckpt}; resumed on {node_b} from step {} after {:.1}s; restarts {}, disruptions {}",
        step(&j).max(ckpt),
        resumed_from(&j),
        t_loss.elapsed().as_secs_f64(),
        s.restarts,
        s.disruptions
    );
    let j = wait_job(&e.cluster, name, TRAIN, "Succeeded", |j| {
        phase(j).is_some_and(JobPhase::is_finished)
    })
    .await;
    let s = j.status.clone().unwrap();
    assert_eq!(s.phase, Some(JobPhase::Succeeded), "{s:#?}");
    assert_eq!(s.restarts, 0, "backoffLimit untouched: {s:?}");
    assert!(s.disruptions >= 1);
    eprintln!(
        "node-loss Succeeded {:.0}s after apply (restarts {}, disruptions {})",
        t_apply.elapsed().as_secs_f64(),
        s.restarts,
        s.disruptions
    );

    // --- Watch expiry (410 Gone) while the operator is paused ---
    {
        let name = "expiry";
        apply_ok(&e.cluster, &tiny_job(name, 400, 50)).await;
        wait_job(&e.cluster, name, TRAIN, "Running", |j| {
            phase(j) == Some(JobPhase::Running)
        })
        .await;
        let log_before = op.log_text().len();
        signal_pid(pid, Signal::SIGSTOP);
        let jobs = Api::<FineTuneJob>::namespaced(e.cluster.client(), NS);
        jobs.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
        for i in 0..30 {
            jobs.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"metadata": {"annotations": {"chaos/n": i.to_string()}}}),
                ),
            )
            .await
            .unwrap();
        }
        // Drop every watch, then compact etcd past every resourceVersion the operator holds.
        e.cluster.restart_apiserver().await.unwrap();
        let etcd = e.cluster.etcd_endpoint();
        let head = etcd_post(&etcd, "/v3/kv/range", &serde_json::json!({"key": "AA=="})).await;
        let rev = head["header"]["revision"].as_str().unwrap().to_string();
        let compacted = etcd_post(
            &etcd,
            "/v3/kv/compaction",
            &serde_json::json!({"revision": rev, "physical": true}),
        )
        .await;
        eprintln!("etcd compacted at revision {rev}: {compacted}");
        let t_cont = Instant::now();
        signal_pid(pid, Signal::SIGCONT);
        // Acted on: the operator stops the trainer (reason Suspending) or reports Suspended.
        wait_job(
            &e.cluster,
            name,
            Duration::from_secs(120),
            "the suspension acted on",
            |j| {
                condition(j, "Ready")
                    .is_some_and(|c| c.reason == "Suspending" || c.reason == "Suspended")
            },
        )
        .await;
        let acted = t_cont.elapsed().as_secs_f64();
        let j = wait_job(
            &e.cluster,
            name,
            Duration::from_secs(120),
            "Suspended",
            |j| phase(j) == Some(JobPhase::Suspended),
        )
        .await;
        let suspended = t_cont.elapsed().as_secs_f64();
        assert_eq!(
            j.status.as_ref().unwrap().observed_generation,
            j.metadata.generation
        );
        assert!(active(&job_pods(&e.cluster, name).await).is_empty());
        let log = op.log_text();
        let after = &log[log_before.min(log.len())..];
        let gone = after
            .lines()
            .filter(|l| {
                l.contains("Expired") || l.contains("too old resource version") || l.contains("410")
            })
            .count();
        assert!(
            gone > 0,
            "the operator never saw a 410 Gone; its log since SIGCONT:\n{after}"
        );
        eprintln!(
            "WATCH EXPIRY: {gone} log line(s) with 410/Expired after SIGCONT; the suspension made during the pause acted on {acted:.1}s after SIGCONT (trainer stopped, Suspended at {suspended:.1}s)"
        );
        jobs.delete(name, &DeleteParams::background())
            .await
            .unwrap();
    }

    // --- API server stopped for 30 s, then frozen for 30 s, under a running job ---
    // The job must still be training when each outage ends, or there is nothing left to write:
    // with 200 steps an idle machine finished it before the freeze (the CI failure of #12). Its
    // step budget is out of reach, and the test ends it after the outages instead.
    let name = "outage";
    let t_apply = Instant::now();
    apply_ok(&e.cluster, &endless_job(name)).await;
    let j = wait_job(&e.cluster, name, TRAIN, "training", |j| {
        phase(j) == Some(JobPhase::Running) && step(j) >= 1
    })
    .await;
    eprintln!("outage: step {} when the API server stops", step(&j));
    let outage = Duration::from_secs(30);
    let base = scrape(&op, STATUS_WRITES_OK).await;
    let t_stop = Instant::now();
    e.cluster.stop_apiserver();
    tokio::time::sleep(outage.saturating_sub(t_stop.elapsed())).await;
    let t_end = Instant::now();
    let conns = proxy.accepted_between(t_stop, t_end);
    let refused = proxy.refused_between(t_stop, t_end);
    // No write can succeed while the API server is down: this is the count before recovery.
    let base = base.max(scrape(&op, STATUS_WRITES_OK).await);
    e.cluster.start_apiserver().await.unwrap();
    let down_for = t_stop.elapsed().as_secs_f64();
    let recovered = first_write_after(&op, &e.cluster, &proxy, base).await;
    let rate = conns as f64 / (t_end - t_stop).as_secs_f64();
    eprintln!(
        "API STOPPED {down_for:.0}s: {conns} connection attempts ({refused} refused) = {rate:.2}/s; first status write {recovered:.1}s after the API server served again"
    );
    assert!(rate < 5.0, "connection storm: {rate:.2}/s");
    assert!(
        op.is_running() && op.pid() == pid,
        "the same operator process"
    );

    // --- API server frozen (SIGSTOP) for 30 s ---
    let before_freeze = still_training(&e.cluster, name, "before the freeze").await;
    let base = scrape(&op, STATUS_WRITES_OK).await;
    let t_freeze = Instant::now();
    e.cluster.freeze_apiserver().unwrap();
    tokio::time::sleep(outage).await;
    let t_thaw = Instant::now();
    let conns = proxy.accepted_between(t_freeze, t_thaw);
    let base = base.max(scrape(&op, STATUS_WRITES_OK).await);
    e.cluster.thaw_apiserver().unwrap();
    let recovered = first_write_after(&op, &e.cluster, &proxy, base).await;
    let rate = conns as f64 / (t_thaw - t_freeze).as_secs_f64();
    eprintln!(
        "API FROZEN 30s: {conns} new connections = {rate:.2}/s; first status write {recovered:.1}s after SIGCONT"
    );
    assert!(rate < 5.0, "connection storm while frozen: {rate:.2}/s");
    assert!(
        op.is_running() && op.pid() == pid,
        "the same operator process"
    );
    // The status keeps up with the trainer after both outages: a newer step is reported.
    let j = wait_job(&e.cluster, name, TRAIN, "a step past the freeze", |j| {
        step(j) > before_freeze
    })
    .await;
    let s = j.status.clone().unwrap();
    assert_eq!(s.phase, Some(JobPhase::Running), "{s:#?}");

    // The trainer finishes (its container exits 0, the simulated node's stand-in for the last
    // step); the operator reports Succeeded, its restarts untouched by the outages.
    let attempt = s.restarts + s.disruptions;
    e.cluster
        .fail_container(NS, &names::trainer_pod(name, attempt), "trainer", 0)
        .unwrap();
    let j = wait_job(&e.cluster, name, TRAIN, "Succeeded", |j| {
        phase(j).is_some_and(JobPhase::is_finished)
    })
    .await;
    let s = j.status.clone().unwrap();
    assert_eq!(s.phase, Some(JobPhase::Succeeded), "{s:#?}");
    assert_eq!(s.restarts, 0, "backoffLimit untouched: {s:?}");
    assert_eq!(s.disruptions, 0, "an API outage is no disruption: {s:?}");
    assert_eq!(s.observed_generation, j.metadata.generation);
    assert!(op.is_running() && op.pid() == pid, "never restarted");
    eprintln!(
        "outage Succeeded {:.0}s after apply (step {}); proxy saw {} connections in all",
        t_apply.elapsed().as_secs_f64(),
        step(&j),
        proxy.accepted()
    );
    drop(op);
    e.cluster.shutdown().await;
}
