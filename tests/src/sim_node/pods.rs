//! The pods bound to a node: the watch that starts and stops one worker per pod, the pod's
//! lifecycle ([`run_pod`]: volumes, init containers in order, then the containers together), its
//! status as a kubelet reports it (phase, conditions, container statuses, synced to the API server
//! in the background), its events, and the final deletion with grace 0.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodIP,
    PodStatus,
};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::container::run_container;
use super::node::node_ip;
use super::volumes::prepare_volumes;
use super::{ContainerRecord, PodRecord, SimShared, lock, now};
use crate::error::is_status;

/// The worker running one pod, as the pod watch keeps it.
#[derive(Debug)]
pub(super) struct Worker {
    /// `Some(grace)` asks the pod to stop (SIGTERM, SIGKILL after `grace`).
    stop: watch::Sender<Option<Duration>>,
    /// Set when the pod has finished and its last status is written.
    done: Arc<AtomicBool>,
    /// The task running [`run_pod`].
    pub(super) task: JoinHandle<()>,
}

/// Watches the pods bound to `node` and starts/stops pod workers.
pub(super) async fn pod_loop(
    shared: Arc<SimShared>,
    node: String,
    index: usize,
    workers: Arc<Mutex<HashMap<String, Worker>>>,
) {
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher::watcher(pods, cfg).default_backoff().boxed();
    let mut seen: Option<HashSet<String>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => seen = Some(HashSet::new()),
            Ok(Event::InitApply(pod)) => {
                if let (Some(s), Some(uid)) = (seen.as_mut(), pod.metadata.uid.as_ref()) {
                    s.insert(uid.clone());
                }
                on_pod(&shared, &node, index, &workers, pod);
            }
            Ok(Event::InitDone) => {
                // Pods deleted while the watch was down: stop their workers now.
                if let Some(s) = seen.take() {
                    for (uid, w) in lock(&workers).iter() {
                        if !s.contains(uid) {
                            w.stop.send_replace(Some(Duration::ZERO));
                        }
                    }
                }
            }
            Ok(Event::Apply(pod)) => on_pod(&shared, &node, index, &workers, pod),
            Ok(Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid.as_ref()
                    && let Some(w) = lock(&workers).remove(uid)
                {
                    w.stop.send_replace(Some(Duration::ZERO));
                }
            }
            Err(e) => tracing::debug!("sim node {node}: pod watch error: {e}"),
        }
    }
}

fn on_pod(
    shared: &Arc<SimShared>,
    node: &str,
    index: usize,
    workers: &Arc<Mutex<HashMap<String, Worker>>>,
    pod: Pod,
) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    let deleting = pod.metadata.deletion_timestamp.is_some();
    let grace = Duration::from_secs(
        pod.metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                pod.spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0)
            .unsigned_abs(),
    );
    let mut workers_guard = lock(workers);
    if let Some(w) = workers_guard.get(&uid) {
        if deleting {
            if w.done.load(Ordering::SeqCst) {
                tokio::spawn(finalize_delete(shared.client.clone(), pod));
            } else if w.stop.borrow().is_none() {
                w.stop.send_replace(Some(grace));
            }
        }
        return;
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    if deleting {
        // Nothing of it runs here (agent restarted, or it finished): remove it.
        tokio::spawn(finalize_delete(shared.client.clone(), pod));
        return;
    }
    if phase == "Succeeded" || phase == "Failed" {
        return;
    }
    let (stop_tx, stop_rx) = watch::channel(None);
    let done = Arc::new(AtomicBool::new(false));
    let ip = shared.allocate_ip(index);
    let task = tokio::spawn(run_pod(
        shared.clone(),
        node.to_string(),
        node_ip(index),
        ip,
        pod,
        stop_rx,
        done.clone(),
    ));
    workers_guard.insert(
        uid,
        Worker {
            stop: stop_tx,
            done,
            task,
        },
    );
}

/// Deletes a pod object with grace 0 (uid precondition), retrying until it is gone.
async fn finalize_delete(client: Client, pod: Pod) {
    let (Some(ns), Some(name), Some(uid)) = (
        pod.metadata.namespace.clone(),
        pod.metadata.name.clone(),
        pod.metadata.uid.clone(),
    ) else {
        return;
    };
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    for _ in 0..600 {
        match pods.delete(&name, &dp).await {
            Ok(_) => return,
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => return,
            Err(e) => tracing::debug!("final delete of {ns}/{name}: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Everything a pod worker needs.
pub(super) struct PodCtx {
    /// State shared by all simulated nodes.
    pub(super) shared: Arc<SimShared>,
    /// The node's name.
    pub(super) node: String,
    /// The pod as the watch first saw it.
    pub(super) pod: Pod,
    /// The pod's namespace.
    pub(super) ns: String,
    /// The pod's name.
    pub(super) name: String,
    /// `<cluster dir>/pods/<ns>_<pod>_<uid>`: volumes, logs and termination messages.
    pub(super) dir: PathBuf,
    /// `status.podIP`.
    pub(super) ip: String,
    /// `status.hostIP`.
    pub(super) host_ip: String,
    /// The status as the agent sees it; [`status_syncer`] writes it to the API server.
    status: Mutex<PodStatus>,
    /// Bumped on every change of `status`.
    version: watch::Sender<u64>,
    /// The last `version` the API server has.
    synced: watch::Receiver<u64>,
    /// `Some(grace)` once the pod is asked to stop.
    pub(super) stop: watch::Receiver<Option<Duration>>,
}

impl PodCtx {
    /// Changes the pod status (synced in the background).
    pub(super) fn update(&self, f: impl FnOnce(&mut PodStatus)) {
        f(&mut lock(&self.status));
        self.version.send_modify(|v| *v += 1);
    }

    /// Changes the status of one (init) container.
    pub(super) fn set_container(
        &self,
        init: bool,
        name: &str,
        f: impl FnOnce(&mut ContainerStatus),
    ) {
        self.update(|s| {
            let list = if init {
                s.init_container_statuses.get_or_insert_with(Vec::new)
            } else {
                s.container_statuses.get_or_insert_with(Vec::new)
            };
            if let Some(cs) = list.iter_mut().find(|c| c.name == name) {
                f(cs);
            }
        });
    }

    /// Posts a core/v1 Event about the pod (source component `sim-kubelet`), in the background.
    pub(super) fn event(
        &self,
        warning: bool,
        reason: &str,
        container: Option<&str>,
        message: String,
    ) {
        let client = self.shared.client.clone();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let t = now();
        let value = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": format!("{}.{nanos:x}", self.name), "namespace": self.ns},
            "involvedObject": {
                "apiVersion": "v1", "kind": "Pod", "name": self.name, "namespace": self.ns,
                "uid": self.pod.metadata.uid,
                "fieldPath": container.map(|c| format!("spec.containers{{{c}}}")),
            },
            "reason": reason, "message": message,
            "type": if warning { "Warning" } else { "Normal" },
            "source": {"component": "sim-kubelet", "host": self.node},
            "firstTimestamp": t, "lastTimestamp": t, "count": 1
        });
        let ns = self.ns.clone();
        tokio::spawn(async move {
            let Ok(ev) = serde_json::from_value::<k8s_openapi::api::core::v1::Event>(value) else {
                return;
            };
            let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, &ns);
            if let Err(e) = events.create(&PostParams::default(), &ev).await {
                tracing::debug!("event: {e}");
            }
        });
    }

    /// The grace period, once the pod is asked to stop.
    pub(super) fn stopping(&self) -> Option<Duration> {
        *self.stop.borrow()
    }

    /// Waits until the latest status has reached the API server (or the pod is gone), at most 2 min.
    async fn flush(&self) {
        let target = *self.version.borrow();
        let mut synced = self.synced.clone();
        let _ =
            tokio::time::timeout(Duration::from_secs(120), synced.wait_for(|v| *v >= target)).await;
    }

    /// Resolves after `d`, or earlier when the pod is asked to stop.
    pub(super) async fn sleep_or_stop(&self, d: Duration) {
        let mut stop = self.stop.clone();
        let _ = tokio::time::timeout(d, stop.wait_for(Option::is_some)).await;
    }

    /// Changes what the agent keeps about one container (process group, log, forced exit code).
    pub(super) fn record(&self, container: &str, f: impl FnOnce(&mut ContainerRecord)) {
        let mut pods = lock(&self.shared.pods);
        if let Some(p) = pods.get_mut(&format!("{}/{}", self.ns, self.name)) {
            f(p.containers.entry(container.to_string()).or_default());
        }
    }
}

/// A `waiting` container state.
pub(super) fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..ContainerState::default()
    }
}

/// A pod condition whose last transition is now.
fn condition(type_: &str, ok: bool, reason: Option<&str>) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        last_transition_time: Some(now()),
        reason: reason.map(Into::into),
        ..PodCondition::default()
    }
}

/// Sets a pod condition; its transition time changes only when its status does.
pub(super) fn set_condition(s: &mut PodStatus, type_: &str, ok: bool, reason: Option<&str>) {
    let conds = s.conditions.get_or_insert_with(Vec::new);
    let status = if ok { "True" } else { "False" };
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == status => {}
        Some(c) => *c = condition(type_, ok, reason),
        None => conds.push(condition(type_, ok, reason)),
    }
}

/// Writes the pod status to the API server after every change, retrying until it is taken (or the
/// pod is gone: then `synced` becomes `u64::MAX`).
async fn status_syncer(
    client: Client,
    ns: String,
    name: String,
    ctx: Arc<PodCtx>,
    mut version: watch::Receiver<u64>,
    synced: watch::Sender<u64>,
) {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    loop {
        let v = *version.borrow_and_update();
        let status = lock(&ctx.status).clone();
        loop {
            match pods
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": status})),
                )
                .await
            {
                Ok(_) => {
                    synced.send_replace(v);
                    break;
                }
                Err(e) if is_status(&e, 404) => {
                    synced.send_replace(u64::MAX);
                    return;
                }
                Err(e) => {
                    tracing::debug!("status of {ns}/{name}: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        if version.changed().await.is_err() {
            return;
        }
    }
}

/// Runs one pod to its end: volumes (retried until ready), init containers in order, then all
/// containers; then the final phase, and the deletion when the pod was asked to stop.
async fn run_pod(
    shared: Arc<SimShared>,
    node: String,
    host_ip: String,
    ip: String,
    pod: Pod,
    stop: watch::Receiver<Option<Duration>>,
    done: Arc<AtomicBool>,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let dir = shared.dir.join("pods").join(format!("{ns}_{name}_{uid}"));
    let inits = spec.init_containers.clone().unwrap_or_default();
    let mains = spec.containers.clone();
    let first_wait = if inits.is_empty() {
        "ContainerCreating"
    } else {
        "PodInitializing"
    };
    let cstatus = |c: &Container, reason: &str| ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        image_id: format!("sim://{}", c.image.clone().unwrap_or_default()),
        ready: false,
        restart_count: 0,
        started: Some(false),
        state: Some(waiting(reason, None)),
        ..ContainerStatus::default()
    };
    let initial = PodStatus {
        phase: Some("Pending".into()),
        host_ip: Some(host_ip.clone()),
        pod_ip: Some(ip.clone()),
        pod_ips: Some(vec![PodIP { ip: ip.clone() }]),
        start_time: Some(now()),
        qos_class: pod.status.as_ref().and_then(|s| s.qos_class.clone()),
        conditions: Some(vec![
            condition("PodScheduled", true, None),
            condition(
                "Initialized",
                inits.is_empty(),
                (!inits.is_empty()).then_some("ContainersNotInitialized"),
            ),
            condition("ContainersReady", false, Some("ContainersNotReady")),
            condition("Ready", false, Some("ContainersNotReady")),
        ]),
        init_container_statuses: (!inits.is_empty()).then(|| {
            inits
                .iter()
                .map(|c| cstatus(c, "PodInitializing"))
                .collect()
        }),
        container_statuses: Some(mains.iter().map(|c| cstatus(c, first_wait)).collect()),
        ..PodStatus::default()
    };
    {
        let mut pods = lock(&shared.pods);
        pods.insert(
            format!("{ns}/{name}"),
            PodRecord {
                node: node.clone(),
                containers: HashMap::new(),
            },
        );
    }
    let (version_tx, version_rx) = watch::channel(1u64);
    let (synced_tx, synced_rx) = watch::channel(0u64);
    let ctx = Arc::new(PodCtx {
        shared: shared.clone(),
        node: node.clone(),
        pod: pod.clone(),
        ns: ns.clone(),
        name: name.clone(),
        dir,
        ip,
        host_ip,
        status: Mutex::new(initial),
        version: version_tx,
        synced: synced_rx,
        stop,
    });
    let syncer = tokio::spawn(status_syncer(
        shared.client.clone(),
        ns.clone(),
        name.clone(),
        ctx.clone(),
        version_rx,
        synced_tx,
    ));
    tracing::debug!("sim node {node}: running pod {ns}/{name} on {}", ctx.ip);
    let policy = spec
        .restart_policy
        .clone()
        .unwrap_or_else(|| "Always".into());

    // Volumes (retried until ready, as a kubelet does). As a kubelet, the pod says only
    // ContainerCreating; the cause is a FailedMount warning event (one per distinct message).
    let mut reported = None;
    let volumes = loop {
        match prepare_volumes(&ctx, spec.volumes.as_deref().unwrap_or_default()).await {
            Ok(v) => break Some(v),
            Err(msg) => {
                tracing::debug!("pod {ns}/{name}: volumes not ready: {msg}");
                ctx.set_container(
                    false,
                    &mains.first().map(|c| c.name.clone()).unwrap_or_default(),
                    |cs| {
                        cs.state = Some(waiting("ContainerCreating", None));
                    },
                );
                if reported.as_ref() != Some(&msg) {
                    ctx.event(true, "FailedMount", None, msg.clone());
                    reported = Some(msg);
                }
                if ctx.stopping().is_some() {
                    break None;
                }
                ctx.sleep_or_stop(Duration::from_secs(2)).await;
            }
        }
    };
    let mut failed = false;
    if let Some(volumes) = volumes {
        let volumes = Arc::new(volumes);
        // Init containers, in order.
        let mut init_ok = true;
        for c in &inits {
            match run_container(ctx.clone(), volumes.clone(), c.clone(), true, &policy).await {
                Some(0) => {}
                _ => {
                    init_ok = false;
                    break;
                }
            }
        }
        if init_ok {
            ctx.update(|s| set_condition(s, "Initialized", true, None));
            let runs = mains
                .iter()
                .map(|c| run_container(ctx.clone(), volumes.clone(), c.clone(), false, &policy));
            let codes = futures::future::join_all(runs).await;
            failed = codes.iter().any(|c| *c != Some(0));
            if codes.iter().all(Option::is_some) || ctx.stopping().is_some() {
                ctx.update(|s| {
                    s.phase = Some(if failed { "Failed" } else { "Succeeded" }.into());
                    set_condition(s, "ContainersReady", false, Some("PodCompleted"));
                    set_condition(s, "Ready", false, Some("PodCompleted"));
                });
            }
        } else if ctx.stopping().is_none() || policy == "Never" {
            ctx.update(|s| {
                s.phase = Some("Failed".into());
            });
        }
    }
    ctx.flush().await;
    done.store(true, Ordering::SeqCst);
    if ctx.stopping().is_some() {
        finalize_delete(shared.client.clone(), pod).await;
    }
    syncer.abort();
    tracing::debug!("sim node {node}: pod {ns}/{name} finished (failed: {failed})");
}
