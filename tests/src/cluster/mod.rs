//! Starting, driving and stopping a local cluster.
//!
//! This module holds [`Cluster`] with its options, accessors, namespace and readiness waits, and
//! its shutdown; `start` brings the control plane and the simulated nodes up (ports, PKI,
//! kubeconfig, processes, StorageClass); `faults` holds the fault hooks tests inject (container
//! signals, node readiness and loss, kube-apiserver stop/freeze/restart).

mod faults;
mod start;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use nix::sys::signal::Signal;

use crate::binaries::KubeBinaries;
use crate::error::is_status;
use crate::images::ImageMap;
use crate::process::{self, ManagedProcess, PidRegistry};
use crate::sim_node::{self, NodeHandle, NodeSpec, SimShared};
use crate::{Error, Result};

/// The StorageClass the harness creates (default class; claims are bound by the built-in
/// provisioner to a host directory each).
pub const STORAGE_CLASS: &str = "sim-local";

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The simulated nodes (default: one node `sim-gpu-0` with 2 GPUs).
    pub nodes: Vec<NodeSpec>,
    /// Image → host executable map for the simulated node agent.
    pub images: ImageMap,
    /// Directory for certificates, kubeconfig, logs, pod files and volumes. Default: a fresh
    /// directory under the system temp dir, removed at shutdown. A given directory is kept.
    pub work_dir: Option<PathBuf>,
    /// Use the Kubernetes binaries in this directory (overrides `KUBE_BIN_DIR` and skips the build).
    pub kube_bin_dir: Option<PathBuf>,
    /// How long start-up may take once the binaries exist (default 120 s; a noisy machine is slow).
    pub ready_timeout: Duration,
    /// Extra `kube-apiserver` flags.
    pub extra_apiserver_args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: vec![NodeSpec::gpu("sim-gpu-0", 2)],
            images: ImageMap::default(),
            work_dir: None,
            kube_bin_dir: None,
            ready_timeout: Duration::from_secs(120),
            extra_apiserver_args: Vec::new(),
        }
    }
}

/// Free TCP ports picked at start.
#[derive(Debug, Clone, Copy)]
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
    scheduler: u16,
}

/// A running local cluster: real etcd, kube-apiserver, kube-controller-manager and
/// kube-scheduler processes plus simulated node agents. Dropping it (or [`Cluster::shutdown`])
/// stops every process it started, by recorded pid.
pub struct Cluster {
    dir: PathBuf,
    etcd_dir: PathBuf,
    remove_dirs: bool,
    bins: KubeBinaries,
    ports: Ports,
    token: String,
    server_version: String,
    pids: PidRegistry,
    reaper: Option<Child>,
    etcd: Option<ManagedProcess>,
    apiserver: Mutex<Option<ManagedProcess>>,
    apiserver_args: Vec<String>,
    controller_manager: Option<ManagedProcess>,
    scheduler: Option<ManagedProcess>,
    client: Client,
    shared: Arc<SimShared>,
    nodes: Mutex<Vec<NodeHandle>>,
    provisioner: Option<tokio::task::JoinHandle<()>>,
    /// The cluster DNS stand-in ([`crate::dns`]), when it could bind.
    dns: Option<tokio::task::JoinHandle<()>>,
    down: bool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir)
            .field("apiserver", &self.server_url())
            .field("server_version", &self.server_version)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A client with cluster-admin rights (member of `system:masters`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The kubeconfig file (admin token, CA file) for host processes such as the operator.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The API server URL, e.g. `https://127.0.0.1:41234`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.apiserver)
    }

    /// The admin bearer token.
    pub fn admin_token(&self) -> &str {
        &self.token
    }

    /// `kube-apiserver --version` output, e.g. `Kubernetes v1.20.2`.
    pub fn server_version(&self) -> &str {
        &self.server_version
    }

    /// The cluster's working directory (pki/, logs/, pods/, volumes/, kubeconfig).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A `kubectl` command (the `KUBECTL` environment variable or `kubectl` on the PATH) with
    /// `--kubeconfig` set to this cluster.
    pub fn kubectl(&self) -> tokio::process::Command {
        let program = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_string());
        let mut cmd = tokio::process::Command::new(program);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig_path().display()));
        cmd.kill_on_drop(true);
        cmd
    }

    /// Runs kubectl against this cluster with `input` on its standard input (e.g.
    /// `["apply", "-f", "-"]` and a manifest) and returns its output.
    pub async fn kubectl_with_input(
        &self,
        args: &[&str],
        input: &str,
    ) -> Result<std::process::Output> {
        use tokio::io::AsyncWriteExt;
        let mut child = self
            .kubectl()
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("run kubectl", e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .await
                .map_err(|e| Error::io("write kubectl stdin", e))?;
        }
        child
            .wait_with_output()
            .await
            .map_err(|e| Error::io("wait for kubectl", e))
    }

    /// Records a process group the cluster must kill at shutdown, and its reaper if the test
    /// process dies first (e.g. an operator started by the test in its own process group).
    pub fn record_process_group(&self, pgid: u32) {
        self.pids.record(pgid);
    }

    /// Process ids of every process the cluster started and that may still run (control plane,
    /// reaper, pod processes). Empty after [`Cluster::shutdown`] when nothing leaked.
    pub fn recorded_pids(&self) -> Vec<i32> {
        let mut pids = PidRegistry::read(self.pids.path());
        if let Some(r) = &self.reaper {
            pids.extend(i32::try_from(r.id()).ok());
        }
        pids
    }

    /// The log file of a pod container's latest run (`pods/<ns>_<pod>/<container>/<restart>.log`).
    pub fn pod_log_path(&self, namespace: &str, pod: &str, container: &str) -> Result<PathBuf> {
        self.shared.log_path(namespace, pod, container)
    }

    /// The contents of [`Cluster::pod_log_path`] (stdout and stderr, interleaved). The simulated
    /// node serves no kubelet API, so `kubectl logs` does not work; read logs here.
    pub fn pod_log(&self, namespace: &str, pod: &str, container: &str) -> Result<String> {
        let path = self.pod_log_path(namespace, pod, container)?;
        std::fs::read_to_string(&path).map_err(|e| Error::io(format!("read {}", path.display()), e))
    }

    /// The etcd client URL (`http://127.0.0.1:PORT`, no TLS), e.g. for `etcdctl --endpoints` or
    /// etcd's JSON gateway (`/v3/kv/compaction`).
    pub fn etcd_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.etcd_client)
    }

    /// Stops everything (pods, node agents, scheduler, controller-manager, API server, etcd) by
    /// recorded pid and removes the temporary directories.
    pub async fn shutdown(mut self) {
        self.shutdown_now();
    }

    fn shutdown_now(&mut self) {
        if self.down {
            return;
        }
        self.down = true;
        if let Some(p) = self.provisioner.take() {
            p.abort();
        }
        if let Some(d) = self.dns.take() {
            d.abort();
        }
        for handle in self.lock_nodes().drain(..) {
            handle.stop();
        }
        self.shared.kill_all_pods();
        for p in [self.scheduler.take(), self.controller_manager.take()]
            .into_iter()
            .flatten()
        {
            let mut p = p;
            p.stop(Duration::from_secs(5));
        }
        self.stop_apiserver();
        if let Some(mut p) = self.etcd.take() {
            p.stop(Duration::from_secs(5));
        }
        // Anything recorded that is still alive (a pod process that escaped its agent) goes too.
        for pgid in PidRegistry::read(self.pids.path()) {
            if process::group_alive(pgid) {
                let _ = process::signal_group(pgid, Signal::SIGKILL);
            }
        }
        let _ = std::fs::write(self.dir.join("reaper.stop"), b"");
        if let Some(mut r) = self.reaper.take() {
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(r.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = r.kill();
            let _ = r.wait();
        }
        let _ = std::fs::remove_file(self.pids.path());
        if let Some(parent) = self.etcd_dir.parent().filter(|p| p.starts_with("/dev/shm")) {
            let _ = std::fs::remove_dir_all(parent);
        }
        if self.remove_dirs {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, Vec<NodeHandle>> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_apiserver(&self) -> std::sync::MutexGuard<'_, Option<ManagedProcess>> {
        self.apiserver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until the namespace's `default` ServiceAccount exists and has its token secret
    /// (Kubernetes 1.20 refuses pods before that: "No API token found for service account").
    pub async fn wait_service_account_token(
        &self,
        namespace: &str,
        deadline: Instant,
    ) -> Result<()> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        loop {
            if let Ok(Some(sa)) = sas.get_opt("default").await
                && sa.secrets.as_ref().is_some_and(|s| !s.is_empty())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "no token for ServiceAccount {namespace}/default"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Creates a namespace (no error if it exists) and waits until pods can be created in it
    /// (its `default` ServiceAccount and token exist), at most 60 s.
    pub async fn create_namespace(&self, name: &str) -> Result<()> {
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        }))
        .map_err(|e| Error::ControlPlane(format!("namespace object: {e}")))?;
        match Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
        {
            Ok(_) => {}
            Err(e) if is_status(&e, 409) => {}
            Err(e) => return Err(e.into()),
        }
        self.wait_service_account_token(name, Instant::now() + Duration::from_secs(60))
            .await
    }

    /// Waits until Node `name` exists with condition Ready=True and no not-ready taint.
    pub async fn wait_node_ready(&self, name: &str, deadline: Instant) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        loop {
            if let Ok(Some(node)) = nodes.get_opt(name).await
                && sim_node::node_is_ready(&node)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!("node {name} not Ready")));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

/// A client for the kubeconfig at `path`.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let err = |message: String| Error::Kubeconfig {
        path: path.to_path_buf(),
        message,
    };
    let kc = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    Client::try_from(config).map_err(Error::Kube)
}

/// Last `n` lines of a file.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
