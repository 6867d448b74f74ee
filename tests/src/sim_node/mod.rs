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
//!
//! ## Layout
//! `node` registers the node and keeps it Ready; `pods` watches the pods bound to it and runs
//! each one; `volumes` makes their volumes exist on the host; `env` resolves a container's
//! environment; `container` runs one container as a process. This module holds what they share.

mod container;
mod env;
mod node;
mod pods;
mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use env::expand;
pub(crate) use node::NodeControl;
pub use node::node_is_ready;

use crate::images::ImageMap;
use crate::process::{self, PidRegistry};
use crate::{Error, Result};
use pods::Worker;

/// The extended resource name of GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Label put on every simulated node.
pub const SIMULATED_LABEL: &str = "finetune-e2e/simulated-node";

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
    /// The cluster DNS stand-in's address, named by the pods' `/etc/resolv.conf`.
    dns: Option<std::net::Ipv4Addr>,
    isolation: Isolation,
    pods: Mutex<HashMap<String, PodRecord>>,
    next_ip: Mutex<HashMap<usize, u32>>,
}

impl SimShared {
    /// The shared state of a cluster's nodes; container processes are recorded in `pids`.
    pub(crate) fn new(
        client: Client,
        images: ImageMap,
        dir: PathBuf,
        pids: PidRegistry,
        apiserver_port: u16,
        dns: Option<std::net::Ipv4Addr>,
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
            dns,
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

    /// The log file of the current run of a container.
    pub(crate) fn log_path(&self, ns: &str, pod: &str, container: &str) -> Result<PathBuf> {
        lock(&self.pods)
            .get(&format!("{ns}/{pod}"))
            .and_then(|p| p.containers.get(container))
            .and_then(|c| c.log.clone())
            .ok_or_else(|| Error::NotFound(format!("log of {ns}/{pod}/{container}")))
    }

    /// Sends `sig` to a running container's process group; with `forced_exit`, the container's
    /// exit code is reported as that instead of what the process returns.
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

    /// Kills the processes of every pod on every node (SIGKILL).
    pub(crate) fn kill_all_pods(&self) {
        self.kill_pods(None);
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
    /// The node's name.
    pub(crate) fn name(&self) -> &str {
        &self.control.name
    }

    /// A handle on the node's readiness that outlives the borrow of the node list.
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

/// Starts the agent of one node (registration, heartbeats, pod watch).
pub(crate) fn start_node(shared: Arc<SimShared>, spec: NodeSpec, index: usize) -> NodeHandle {
    let (ready_tx, ready_rx) = watch::channel(true);
    let control = NodeControl {
        name: spec.name.clone(),
        client: shared.client.clone(),
        ready: Arc::new(ready_tx),
    };
    let workers = Arc::new(Mutex::new(HashMap::new()));
    let heartbeat = tokio::spawn(node::heartbeat_loop(
        shared.client.clone(),
        spec.clone(),
        index,
        ready_rx,
    ));
    let pods = tokio::spawn(pods::pod_loop(
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
