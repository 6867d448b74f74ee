//! The **simulated** GPU node agent: a stand-in for a kubelet, not a container runtime.
//!
//! For each [`NodeSpec`] the agent
//! - registers a Node with the given capacity/allocatable (`cpu`, `memory`, `pods`,
//!   `nvidia.com/gpu`) and the label `finetune-e2e/simulated-node=true`, keeps it Ready with
//!   status heartbeats and a Lease in `kube-node-lease` (every 10 s), and removes the
//!   `node.kubernetes.io/not-ready` taint (the node-lifecycle controller is off);
//! - watches the pods the real scheduler binds to the node and runs their init containers (one
//!   after another) and then their containers as local processes, each in its own process group;
//! - reports status like a kubelet: `Pending` → `Running` → `Succeeded`/`Failed`, container states
//!   with exit codes and reasons (`Completed`, `Error`, `OOMKilled` for exit code 137), the
//!   contents of `terminationMessagePath` as the termination message (`FallbackToLogsOnError`
//!   honoured), `restartCount` (restart policies `Always`, `OnFailure`, `Never`, with back-off),
//!   `ErrImagePull`/`ImagePullBackOff` for images missing from the [`ImageMap`](crate::ImageMap),
//!   `CreateContainerConfigError` for missing env sources;
//! - honours deletion: SIGTERM to the container process groups, SIGKILL after the pod's grace
//!   period, then removes the pod object (grace 0), as a kubelet does.
//!
//! ## Pod network
//! Every pod gets its own loopback address as `status.podIP`: node *i* hands out
//! `127.(i+1).x.y` (y ≥ 2); `127.(i+1).0.1` is the node's InternalIP. [`Cluster`](crate::Cluster)
//! numbers its nodes from a random offset, so that clusters running at the same time on one host
//! (parallel tests) do not hand out the same addresses. Linux routes all of
//! 127.0.0.0/8 to the loopback device, so two pods can listen on the same port on their own IPs.
//! Processes share the host network namespace (nothing stops a pod from binding 0.0.0.0).
//!
//! ## Volumes and mount paths
//! PersistentVolumeClaim → the directory of the PersistentVolume the built-in provisioner made for
//! the claim; ConfigMap, Secret, projected (configMap/secret/downwardAPI) and downwardAPI volumes →
//! files written under `<cluster dir>/pods/<ns>_<pod>_<uid>/volumes/<volume>`; emptyDir → an empty
//! directory there; hostPath → the host path.
//!
//! **Convention**: when the agent runs as root and `unshare` exists (the normal case), each
//! container runs in its own mount namespace (`unshare --mount --propagation private`) in which
//! every volume is bind-mounted at the pod spec's `mountPath` (read-only when asked) and a
//! per-container file at `terminationMessagePath`. The pod spec and the binary are the same as in a
//! real cluster. Mount targets that do not exist on the host are created there (empty directories
//! or files, e.g. `/checkpoints`), since a bind mount needs an existing target. Otherwise the
//! process runs unisolated and finds its mounts through the environment variable
//! `FINETUNE_SIM_MOUNTS` (`<mountPath>=<host dir>` entries separated by `;`) and its termination
//! message file through `FINETUNE_SIM_TERMINATION_LOG`.
//!
//! ## Environment
//! A container sees only: `PATH`, `HOME=/root`, `HOSTNAME=<pod name>`,
//! `KUBERNETES_SERVICE_HOST=127.0.0.1`, `KUBERNETES_SERVICE_PORT=<api port>`, the image's env, then
//! `envFrom` and `env` (with `valueFrom` `fieldRef`, `secretKeyRef`, `configMapKeyRef`,
//! `resourceFieldRef`, and `$(VAR)` expansion), like a container.
//!
//! ## Not simulated
//! Resource limits are not enforced (no cgroups); probes are ignored (a running container is
//! ready); there is no kubelet API (`kubectl logs`/`exec` fail; read logs with
//! [`Cluster::pod_log`](crate::Cluster::pod_log), kept in
//! `pods/<ns>_<pod>_<uid>/<container>/<restartCount>.log`); no network isolation. Events
//! (`Pulled`, `Created`, `Started`, `Killing`, `BackOff`, `Failed`) come from component
//! `sim-kubelet`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, EnvVar, Node, PersistentVolume, PersistentVolumeClaim,
    Pod, PodCondition, PodIP, PodStatus, Secret, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use nix::sys::signal::Signal;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::is_status;
use crate::images::ImageMap;
use crate::process::{self, PidRegistry};
use crate::{Error, Result};

/// The extended resource name of GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Label put on every simulated node.
pub const SIMULATED_LABEL: &str = "finetune-e2e/simulated-node";
const HEARTBEAT: Duration = Duration::from_secs(10);
const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
/// Where a pod's volume sources are staged inside its mount namespace (a private tmpfs).
const STAGE_DIR: &str = "/run/finetune-sim-stage";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One simulated node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Node name.
    pub name: String,
    /// CPU capacity (a Kubernetes quantity, e.g. `"8"`).
    pub cpu: String,
    /// Memory capacity (e.g. `"32Gi"`).
    pub memory: String,
    /// `nvidia.com/gpu` capacity.
    pub gpus: u32,
    /// Maximum number of pods.
    pub pods: u32,
    /// Extra node labels.
    pub labels: BTreeMap<String, String>,
}

impl NodeSpec {
    /// A node with `gpus` GPUs, 8 CPUs, 32 GiB of memory and room for 110 pods.
    pub fn gpu(name: impl Into<String>, gpus: u32) -> Self {
        Self {
            name: name.into(),
            cpu: "8".into(),
            memory: "32Gi".into(),
            gpus,
            pods: 110,
            labels: BTreeMap::new(),
        }
    }

    /// Adds a node label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// Whether a Node has condition Ready=True and no not-ready/unreachable taint.
pub fn node_is_ready(node: &Node) -> bool {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| {
            ts.iter()
                .any(|t| t.key == NOT_READY_TAINT || t.key == UNREACHABLE_TAINT)
        });
    ready && !tainted
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How container processes see their volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    /// `unshare --mount` + bind mounts at the real mount paths.
    MountNamespace,
    /// No isolation; `FINETUNE_SIM_MOUNTS` tells where the volumes are.
    PathEnv,
}

#[derive(Debug, Default)]
struct ContainerRecord {
    pgid: Option<i32>,
    forced_exit: Option<i32>,
    log: Option<PathBuf>,
}

#[derive(Debug, Default)]
struct PodRecord {
    node: String,
    containers: HashMap<String, ContainerRecord>,
}

/// State shared by the cluster and all simulated nodes.
pub(crate) struct SimShared {
    client: Client,
    images: ImageMap,
    dir: PathBuf,
    pids: PidRegistry,
    apiserver_port: u16,
    isolation: Isolation,
    pods: Mutex<HashMap<String, PodRecord>>,
    next_ip: Mutex<HashMap<usize, u32>>,
}

impl SimShared {
    pub(crate) fn new(
        client: Client,
        images: ImageMap,
        dir: PathBuf,
        pids: PidRegistry,
        apiserver_port: u16,
    ) -> Self {
        let root = nix::unistd::geteuid().is_root();
        let unshare = ["/usr/bin/unshare", "/bin/unshare"]
            .iter()
            .any(|p| Path::new(p).exists());
        let isolation = if root && unshare {
            Isolation::MountNamespace
        } else {
            Isolation::PathEnv
        };
        Self {
            client,
            images,
            dir,
            pids,
            apiserver_port,
            isolation,
            pods: Mutex::new(HashMap::new()),
            next_ip: Mutex::new(HashMap::new()),
        }
    }

    fn allocate_ip(&self, node_index: usize) -> String {
        let mut next = lock(&self.next_ip);
        let n = next.entry(node_index).or_insert(0);
        let k = *n;
        *n += 1;
        format!(
            "127.{}.{}.{}",
            (node_index % 254) + 1,
            (k / 250) % 250,
            k % 250 + 2
        )
    }

    pub(crate) fn log_path(&self, ns: &str, pod: &str, container: &str) -> Result<PathBuf> {
        lock(&self.pods)
            .get(&format!("{ns}/{pod}"))
            .and_then(|p| p.containers.get(container))
            .and_then(|c| c.log.clone())
            .ok_or_else(|| Error::NotFound(format!("log of {ns}/{pod}/{container}")))
    }

    pub(crate) fn signal_container(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        sig: Signal,
        forced_exit: Option<i32>,
    ) -> Result<()> {
        let mut pods = lock(&self.pods);
        let rec = pods
            .get_mut(&format!("{ns}/{pod}"))
            .and_then(|p| p.containers.get_mut(container))
            .ok_or_else(|| Error::NotFound(format!("container {ns}/{pod}/{container}")))?;
        let pgid = rec
            .pgid
            .ok_or_else(|| Error::NotFound(format!("running process of {ns}/{pod}/{container}")))?;
        if forced_exit.is_some() {
            rec.forced_exit = forced_exit;
        }
        process::signal_group(pgid, sig)
    }

    fn kill_pods(&self, node: Option<&str>) {
        for rec in lock(&self.pods).values() {
            if node.is_some_and(|n| n != rec.node) {
                continue;
            }
            for c in rec.containers.values() {
                if let Some(pgid) = c.pgid {
                    let _ = process::signal_group(pgid, Signal::SIGKILL);
                }
            }
        }
    }

    pub(crate) fn kill_all_pods(&self) {
        self.kill_pods(None);
    }
}

/// Control over a node's readiness, usable without holding the node list.
#[derive(Clone)]
pub(crate) struct NodeControl {
    name: String,
    client: Client,
    ready: Arc<watch::Sender<bool>>,
}

impl NodeControl {
    pub(crate) async fn set_ready(&self, ready: bool) -> Result<()> {
        self.ready.send_replace(ready);
        if ready {
            register_status(&self.client, &self.name, None).await?;
            set_taints(&self.client, &self.name, false).await
        } else {
            let nodes: Api<Node> = Api::all(self.client.clone());
            let t = now();
            let conds: Vec<_> = ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"]
                .iter()
                .map(|c| {
                    json!({"type": c, "status": "Unknown", "reason": "NodeStatusUnknown",
                        "message": "Simulated node agent stopped posting node status (fault hook).",
                        "lastTransitionTime": t, "lastHeartbeatTime": t})
                })
                .collect();
            nodes
                .patch_status(
                    &self.name,
                    &PatchParams::default(),
                    &Patch::Strategic(json!({"status": {"conditions": conds}})),
                )
                .await?;
            set_taints(&self.client, &self.name, true).await
        }
    }
}

/// A running simulated node.
pub(crate) struct NodeHandle {
    control: NodeControl,
    shared: Arc<SimShared>,
    tasks: Vec<JoinHandle<()>>,
    workers: Arc<Mutex<HashMap<String, Worker>>>,
}

impl NodeHandle {
    pub(crate) fn name(&self) -> &str {
        &self.control.name
    }

    pub(crate) fn clone_control(&self) -> NodeControl {
        self.control.clone()
    }

    /// The agent dies: its tasks stop and its pods' processes are killed.
    pub(crate) fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        for (_, w) in lock(&self.workers).drain() {
            w.task.abort();
        }
        self.shared.kill_pods(Some(&self.control.name));
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Debug)]
struct Worker {
    stop: watch::Sender<Option<Duration>>,
    done: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// Starts the agent of one node (registration, heartbeats, pod watch).
pub(crate) fn start_node(shared: Arc<SimShared>, spec: NodeSpec, index: usize) -> NodeHandle {
    let (ready_tx, ready_rx) = watch::channel(true);
    let control = NodeControl {
        name: spec.name.clone(),
        client: shared.client.clone(),
        ready: Arc::new(ready_tx),
    };
    let workers = Arc::new(Mutex::new(HashMap::new()));
    let heartbeat = tokio::spawn(heartbeat_loop(
        shared.client.clone(),
        spec.clone(),
        index,
        ready_rx,
    ));
    let pods = tokio::spawn(pod_loop(
        shared.clone(),
        spec.name.clone(),
        index,
        workers.clone(),
    ));
    NodeHandle {
        control,
        shared,
        tasks: vec![heartbeat, pods],
        workers,
    }
}

fn node_ip(index: usize) -> String {
    format!("127.{}.0.1", (index % 254) + 1)
}

async fn heartbeat_loop(
    client: Client,
    spec: NodeSpec,
    index: usize,
    ready: watch::Receiver<bool>,
) {
    let mut registered = false;
    loop {
        if *ready.borrow() {
            let r = if registered {
                heartbeat(&client, &spec.name).await
            } else {
                register(&client, &spec, index).await
            };
            match r {
                Ok(()) => registered = true,
                Err(e) => tracing::debug!("sim node {}: status update failed: {e}", spec.name),
            }
        }
        let period = if registered {
            HEARTBEAT
        } else {
            Duration::from_secs(1)
        };
        tokio::time::sleep(period).await;
    }
}

async fn register(client: &Client, spec: &NodeSpec, index: usize) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut labels = spec.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), spec.name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), "amd64".into());
    labels.insert(SIMULATED_LABEL.into(), "true".into());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": spec.name, "labels": labels},
        "spec": {}
    }))
    .map_err(|e| Error::ControlPlane(format!("node object: {e}")))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(e) if is_status(&e, 409) => {}
        Err(e) => return Err(e.into()),
    }
    register_status(client, &spec.name, Some((spec, index))).await?;
    set_taints(client, &spec.name, false).await?;
    renew_lease(client, &spec.name).await
}

/// Posts Ready conditions (and, at registration, capacity, addresses and node info).
async fn register_status(
    client: &Client,
    name: &str,
    full: Option<(&NodeSpec, usize)>,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let t = now();
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": t, "lastTransitionTime": t})
    };
    let mut status = json!({
        "conditions": [
            cond("Ready", "True", "KubeletReady", "simulated node agent is posting ready status"),
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "simulated"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "simulated"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "simulated"),
        ]
    });
    if let Some((spec, index)) = full {
        let resources = json!({
            "cpu": spec.cpu, "memory": spec.memory, "pods": spec.pods.to_string(),
            "ephemeral-storage": "100Gi", GPU_RESOURCE: spec.gpus.to_string()
        });
        status["capacity"] = resources.clone();
        status["allocatable"] = resources;
        status["addresses"] = json!([
            {"type": "InternalIP", "address": node_ip(index)},
            {"type": "Hostname", "address": spec.name}
        ]);
        status["daemonEndpoints"] = json!({"kubeletEndpoint": {"Port": 0}});
        status["nodeInfo"] = json!({
            "machineID": format!("sim-{}", spec.name), "systemUUID": format!("sim-{}", spec.name),
            "bootID": format!("sim-{}", spec.name), "kernelVersion": "simulated",
            "osImage": "finetune-e2e simulated node", "containerRuntimeVersion": "finetune-sim://0.1.0",
            "kubeletVersion": "v1.20.2-sim", "kubeProxyVersion": "v1.20.2-sim",
            "operatingSystem": "linux", "architecture": "amd64"
        });
    }
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": status})),
        )
        .await?;
    Ok(())
}

async fn heartbeat(client: &Client, name: &str) -> Result<()> {
    register_status(client, name, None).await?;
    renew_lease(client, name).await
}

/// Removes (`unreachable == false`) the not-ready/unreachable taints, or adds the unreachable ones.
async fn set_taints(client: &Client, name: &str, unreachable: bool) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get(name).await?;
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    let mut kept: Vec<_> = taints
        .iter()
        .filter(|t| t.key != NOT_READY_TAINT && t.key != UNREACHABLE_TAINT)
        .map(|t| serde_json::to_value(t).unwrap_or_default())
        .collect();
    if unreachable {
        let t = now();
        kept.push(json!({"key": UNREACHABLE_TAINT, "effect": "NoSchedule"}));
        kept.push(json!({"key": UNREACHABLE_TAINT, "effect": "NoExecute", "timeAdded": t}));
    } else if kept.len() == taints.len() {
        return Ok(());
    }
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": kept}})),
        )
        .await?;
    Ok(())
}

async fn renew_lease(client: &Client, name: &str) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renew = MicroTime(Timestamp::now());
    let patch =
        json!({"spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": renew}});
    match leases
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 404) => {
            let node = Api::<Node>::all(client.clone()).get(name).await?;
            let lease: Lease = serde_json::from_value(json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease", "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": name,
                    "uid": node.metadata.uid.unwrap_or_default()
                }]},
                "spec": patch["spec"]
            }))
            .map_err(|e| Error::ControlPlane(format!("lease object: {e}")))?;
            match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(()),
                Err(e) if is_status(&e, 409) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Watches the pods bound to `node` and starts/stops pod workers.
async fn pod_loop(
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
struct PodCtx {
    shared: Arc<SimShared>,
    node: String,
    pod: Pod,
    ns: String,
    name: String,
    dir: PathBuf,
    ip: String,
    host_ip: String,
    status: Mutex<PodStatus>,
    version: watch::Sender<u64>,
    synced: watch::Receiver<u64>,
    stop: watch::Receiver<Option<Duration>>,
}

impl PodCtx {
    fn update(&self, f: impl FnOnce(&mut PodStatus)) {
        f(&mut lock(&self.status));
        self.version.send_modify(|v| *v += 1);
    }

    fn set_container(&self, init: bool, name: &str, f: impl FnOnce(&mut ContainerStatus)) {
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
    fn event(&self, warning: bool, reason: &str, container: Option<&str>, message: String) {
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

    fn stopping(&self) -> Option<Duration> {
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
    async fn sleep_or_stop(&self, d: Duration) {
        let mut stop = self.stop.clone();
        let _ = tokio::time::timeout(d, stop.wait_for(Option::is_some)).await;
    }

    fn record(&self, container: &str, f: impl FnOnce(&mut ContainerRecord)) {
        let mut pods = lock(&self.shared.pods);
        if let Some(p) = pods.get_mut(&format!("{}/{}", self.ns, self.name)) {
            f(p.containers.entry(container.to_string()).or_default());
        }
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..ContainerState::default()
    }
}

fn condition(type_: &str, ok: bool, reason: Option<&str>) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        last_transition_time: Some(now()),
        reason: reason.map(Into::into),
        ..PodCondition::default()
    }
}

fn set_condition(s: &mut PodStatus, type_: &str, ok: bool, reason: Option<&str>) {
    let conds = s.conditions.get_or_insert_with(Vec::new);
    let status = if ok { "True" } else { "False" };
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == status => {}
        Some(c) => *c = condition(type_, ok, reason),
        None => conds.push(condition(type_, ok, reason)),
    }
}

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

    // Volumes (retried until ready, as a kubelet does).
    let volumes = loop {
        match prepare_volumes(&ctx, spec.volumes.as_deref().unwrap_or_default()).await {
            Ok(v) => break Some(v),
            Err(msg) => {
                tracing::debug!("pod {ns}/{name}: volumes not ready: {msg}");
                ctx.set_container(
                    false,
                    &mains.first().map(|c| c.name.clone()).unwrap_or_default(),
                    |cs| {
                        cs.state = Some(waiting("ContainerCreating", Some(msg)));
                    },
                );
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

/// A volume's host location.
#[derive(Debug, Clone)]
struct HostVolume {
    path: PathBuf,
}

async fn prepare_volumes(
    ctx: &PodCtx,
    volumes: &[Volume],
) -> Result<HashMap<String, HostVolume>, String> {
    let client = ctx.shared.client.clone();
    let vdir = ctx.dir.join("volumes");
    let mut out = HashMap::new();
    for v in volumes {
        let dir = vdir.join(&v.name);
        let path = if let Some(pvc) = &v.persistent_volume_claim {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ctx.ns);
            let claim = claims
                .get(&pvc.claim_name)
                .await
                .map_err(|e| format!("claim {}: {e}", pvc.claim_name))?;
            let pv_name = claim
                .spec
                .and_then(|s| s.volume_name)
                .ok_or_else(|| format!("claim {} is not bound", pvc.claim_name))?;
            let pv = Api::<PersistentVolume>::all(client.clone())
                .get(&pv_name)
                .await
                .map_err(|e| format!("volume {pv_name}: {e}"))?;
            let host = pv
                .spec
                .and_then(|s| s.host_path)
                .map(|h| PathBuf::from(h.path))
                .ok_or_else(|| format!("volume {pv_name} has no hostPath"))?;
            std::fs::create_dir_all(&host).map_err(|e| format!("{}: {e}", host.display()))?;
            host
        } else if let Some(hp) = &v.host_path {
            let p = PathBuf::from(&hp.path);
            if hp.type_.as_deref() == Some("DirectoryOrCreate") {
                std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            p
        } else if v.empty_dir.is_some() {
            mkdir(&dir)?;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
            dir
        } else if let Some(cm) = &v.config_map {
            let files =
                config_map_files(&client, &ctx.ns, &cm.name, cm.items.as_deref(), cm.optional)
                    .await?;
            write_files(&dir, &files, cm.default_mode)?;
            dir
        } else if let Some(sec) = &v.secret {
            let name = sec.secret_name.clone().unwrap_or_default();
            let files =
                secret_files(&client, &ctx.ns, &name, sec.items.as_deref(), sec.optional).await?;
            write_files(&dir, &files, sec.default_mode.or(Some(0o644)))?;
            dir
        } else if let Some(proj) = &v.projected {
            let mut files = Vec::new();
            for src in proj.sources.as_deref().unwrap_or_default() {
                if let Some(cm) = &src.config_map {
                    files.extend(
                        config_map_files(
                            &client,
                            &ctx.ns,
                            &cm.name,
                            cm.items.as_deref(),
                            cm.optional,
                        )
                        .await?,
                    );
                }
                if let Some(sec) = &src.secret {
                    files.extend(
                        secret_files(
                            &client,
                            &ctx.ns,
                            &sec.name,
                            sec.items.as_deref(),
                            sec.optional,
                        )
                        .await?,
                    );
                }
                if let Some(d) = &src.downward_api {
                    files.extend(downward_files(ctx, d.items.as_deref().unwrap_or_default()));
                }
            }
            write_files(&dir, &files, proj.default_mode)?;
            dir
        } else if let Some(d) = &v.downward_api {
            write_files(
                &dir,
                &downward_files(ctx, d.items.as_deref().unwrap_or_default()),
                d.default_mode,
            )?;
            dir
        } else {
            return Err(format!(
                "volume {}: type not supported by the simulated node",
                v.name
            ));
        };
        out.insert(v.name.clone(), HostVolume { path });
    }
    Ok(out)
}

fn mkdir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

type Files = Vec<(String, Vec<u8>, Option<i32>)>;

fn select_items(
    all: BTreeMap<String, Vec<u8>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    what: &str,
) -> Result<Files, String> {
    match items {
        None => Ok(all.into_iter().map(|(k, v)| (k, v, None)).collect()),
        Some(items) => items
            .iter()
            .map(|i| {
                all.get(&i.key)
                    .map(|v| (i.path.clone(), v.clone(), i.mode))
                    .ok_or_else(|| format!("{what}: key {} not found", i.key))
            })
            .collect(),
    }
}

async fn config_map_files(
    client: &Client,
    ns: &str,
    name: &str,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    optional: Option<bool>,
) -> Result<Files, String> {
    match Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(Some(cm)) => {
            let mut all: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            all.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            select_items(all, items, &format!("configmap {name}"))
        }
        Ok(None) if optional == Some(true) => Ok(Vec::new()),
        Ok(None) => Err(format!("configmap \"{name}\" not found")),
        Err(e) => Err(format!("configmap {name}: {e}")),
    }
}

async fn secret_files(
    client: &Client,
    ns: &str,
    name: &str,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    optional: Option<bool>,
) -> Result<Files, String> {
    match Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(Some(s)) => {
            let mut all: BTreeMap<String, Vec<u8>> = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            all.extend(
                s.string_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes())),
            );
            select_items(all, items, &format!("secret {name}"))
        }
        Ok(None) if optional == Some(true) => Ok(Vec::new()),
        Ok(None) => Err(format!("secret \"{name}\" not found")),
        Err(e) => Err(format!("secret {name}: {e}")),
    }
}

fn downward_files(
    ctx: &PodCtx,
    items: &[k8s_openapi::api::core::v1::DownwardAPIVolumeFile],
) -> Files {
    items
        .iter()
        .filter_map(|i| {
            let value = i
                .field_ref
                .as_ref()
                .map(|f| field_value(ctx, &f.field_path))?;
            Some((i.path.clone(), value.into_bytes(), i.mode))
        })
        .collect()
}

fn write_files(dir: &Path, files: &Files, default_mode: Option<i32>) -> Result<(), String> {
    mkdir(dir)?;
    for (rel, data, mode) in files {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            mkdir(parent)?;
        }
        std::fs::write(&p, data).map_err(|e| format!("{}: {e}", p.display()))?;
        let mode = mode.or(default_mode).unwrap_or(0o644);
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode.unsigned_abs()));
    }
    Ok(())
}

/// The value of a downward-API field path.
fn field_value(ctx: &PodCtx, path: &str) -> String {
    let meta = &ctx.pod.metadata;
    let spec = ctx.pod.spec.as_ref();
    let map_key = |prefix: &str, map: Option<&BTreeMap<String, String>>| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        map.and_then(|m| m.get(key).cloned())
    };
    match path {
        "metadata.name" => ctx.name.clone(),
        "metadata.namespace" => ctx.ns.clone(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => ctx.ip.clone(),
        "status.hostIP" | "status.hostIPs" => ctx.host_ip.clone(),
        p if p.starts_with("metadata.labels['") => {
            map_key("metadata.labels['", meta.labels.as_ref()).unwrap_or_default()
        }
        p if p.starts_with("metadata.annotations['") => {
            map_key("metadata.annotations['", meta.annotations.as_ref()).unwrap_or_default()
        }
        _ => String::new(),
    }
}

/// Expands `$(VAR)` references (kubelet semantics: `$$` escapes, unknown names stay as written).
pub fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn set_env(env: &mut Vec<(String, String)>, k: String, v: String) {
    env.retain(|(name, _)| *name != k);
    env.push((k, v));
}

async fn resolve_env(
    ctx: &PodCtx,
    c: &Container,
    image_env: &[(String, String)],
) -> Result<Vec<(String, String)>, String> {
    let client = &ctx.shared.client;
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), "/root".into()),
        ("HOSTNAME".into(), ctx.name.clone()),
        ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
        (
            "KUBERNETES_SERVICE_PORT".into(),
            ctx.shared.apiserver_port.to_string(),
        ),
    ];
    for (k, v) in image_env {
        set_env(&mut env, k.clone(), v.clone());
    }
    for from in c.env_from.as_deref().unwrap_or_default() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            for (k, v, _) in config_map_files(client, &ctx.ns, &r.name, None, r.optional).await? {
                set_env(
                    &mut env,
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&v).into_owned(),
                );
            }
        }
        if let Some(r) = &from.secret_ref {
            for (k, v, _) in secret_files(client, &ctx.ns, &r.name, None, r.optional).await? {
                set_env(
                    &mut env,
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&v).into_owned(),
                );
            }
        }
    }
    for EnvVar {
        name,
        value,
        value_from,
    } in c.env.as_deref().unwrap_or_default()
    {
        let v = match (value, value_from) {
            (Some(v), _) => expand(v, &env),
            (None, Some(src)) => {
                if let Some(f) = &src.field_ref {
                    field_value(ctx, &f.field_path)
                } else if let Some(r) = &src.secret_key_ref {
                    let files = secret_files(client, &ctx.ns, &r.name, None, r.optional).await?;
                    match files.into_iter().find(|(k, _, _)| *k == r.key) {
                        Some((_, v, _)) => String::from_utf8_lossy(&v).into_owned(),
                        None if r.optional == Some(true) => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in Secret {}/{}",
                                r.key, ctx.ns, r.name
                            ));
                        }
                    }
                } else if let Some(r) = &src.config_map_key_ref {
                    let files =
                        config_map_files(client, &ctx.ns, &r.name, None, r.optional).await?;
                    match files.into_iter().find(|(k, _, _)| *k == r.key) {
                        Some((_, v, _)) => String::from_utf8_lossy(&v).into_owned(),
                        None if r.optional == Some(true) => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in ConfigMap {}/{}",
                                r.key, ctx.ns, r.name
                            ));
                        }
                    }
                } else if let Some(r) = &src.resource_field_ref {
                    let res = c.resources.as_ref();
                    let (kind, resource) = r
                        .resource
                        .split_once('.')
                        .unwrap_or(("limits", &r.resource));
                    let map = if kind == "requests" {
                        res.and_then(|x| x.requests.as_ref())
                    } else {
                        res.and_then(|x| x.limits.as_ref())
                    };
                    map.and_then(|m| m.get(resource))
                        .map(|q| q.0.clone())
                        .unwrap_or_else(|| "0".into())
                } else {
                    String::new()
                }
            }
            (None, None) => String::new(),
        };
        set_env(&mut env, name.clone(), v);
    }
    Ok(env)
}

/// Single-quotes `s` for /bin/sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

struct Mount {
    host: PathBuf,
    target: String,
    read_only: bool,
}

enum Exit {
    Code(i32),
    StartError(String),
}

/// Runs one container (with restarts per policy). Returns its final exit code, or `None` when it
/// never ran to completion (image missing, pod stopped while waiting).
async fn run_container(
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
    fn expands_like_kubelet() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &env), "x-$(B)-$(A)-$");
    }

    #[test]
    fn quotes_for_sh() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
