//! Starting, driving and stopping a local cluster.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use nix::sys::signal::Signal;

use crate::binaries::{self, KubeBinaries};
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

fn free_ports() -> Result<Ports> {
    // Hold all listeners until every port is known so the five are distinct.
    let listeners = (0..5)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io("pick free port", e))?;
    let ports = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io("pick free port", e))?;
    match ports.as_slice() {
        &[
            etcd_client,
            etcd_peer,
            apiserver,
            controller_manager,
            scheduler,
        ] => Ok(Ports {
            etcd_client,
            etcd_peer,
            apiserver,
            controller_manager,
            scheduler,
        }),
        _ => Err(Error::ControlPlane("could not pick ports".into())),
    }
}

static CLUSTER_SEQ: AtomicU64 = AtomicU64::new(0);

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
    /// Builds the binaries if needed, starts the control plane and the simulated nodes, and
    /// returns once the API server serves, the `default` ServiceAccount exists and every node is
    /// Ready. Must run inside a multi-threaded Tokio runtime.
    pub async fn start(opts: ClusterOptions) -> Result<Self> {
        let t0 = Instant::now();
        let override_dir = opts.kube_bin_dir.clone();
        let bins = tokio::task::spawn_blocking(move || binaries::ensure(override_dir))
            .await
            .map_err(|e| Error::ControlPlane(format!("build task: {e}")))??;
        let server_version = bins.server_version()?;
        eprintln!(
            "[finetune-e2e] control plane {server_version} from {} (simulated nodes: {})",
            bins.dir.display(),
            opts.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let seq = CLUSTER_SEQ.fetch_add(1, Ordering::SeqCst);
        let unique = format!(
            "finetune-e2e-{}-{seq}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        let (dir, remove_dirs) = match &opts.work_dir {
            Some(d) => (d.clone(), false),
            None => (std::env::temp_dir().join(&unique), true),
        };
        let shm = Path::new("/dev/shm");
        let etcd_dir = if shm.is_dir() {
            shm.join(&unique).join("etcd")
        } else {
            dir.join("etcd")
        };
        for d in [&dir, &dir.join("logs"), &dir.join("pki"), &etcd_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| Error::io(format!("mkdir {}", d.display()), e))?;
        }
        let ports = free_ports()?;
        let token = random_token()?;
        write_pki(&dir.join("pki")).await?;
        let tokens = format!("{token},admin,admin-uid,\"system:masters\"\n");
        write(&dir.join("tokens.csv"), &tokens)?;
        let kubeconfig = kubeconfig_yaml(ports.apiserver, &dir.join("pki/ca.crt"), &token);
        write(&dir.join("kubeconfig"), &kubeconfig)?;

        let pids = PidRegistry::new(dir.join("pids"));
        let _ = std::fs::remove_file(pids.path());
        let _ = std::fs::remove_file(dir.join("reaper.stop"));
        let mut cleanup = Vec::new();
        if let Some(shm_dir) = etcd_dir.parent().filter(|p| p.starts_with("/dev/shm")) {
            cleanup.push(shm_dir.to_path_buf());
        }
        if remove_dirs {
            cleanup.push(dir.clone());
        }
        let reaper = process::spawn_reaper(
            std::process::id(),
            &pids,
            &dir.join("reaper.stop"),
            &cleanup,
        )?;

        let etcd = ManagedProcess::spawn(
            "etcd",
            &bins.etcd,
            &[
                format!("--data-dir={}", etcd_dir.display()),
                format!(
                    "--listen-client-urls=http://127.0.0.1:{}",
                    ports.etcd_client
                ),
                format!(
                    "--advertise-client-urls=http://127.0.0.1:{}",
                    ports.etcd_client
                ),
                format!("--listen-peer-urls=http://127.0.0.1:{}", ports.etcd_peer),
                format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                    ports.etcd_peer
                ),
                format!(
                    "--initial-cluster=default=http://127.0.0.1:{}",
                    ports.etcd_peer
                ),
                "--name=default".into(),
                "--log-level=warn".into(),
            ],
            &dir.join("logs/etcd.log"),
            &pids,
        )?;
        let client = client_from_kubeconfig(&dir.join("kubeconfig")).await?;
        let shared = Arc::new(SimShared::new(
            client.clone(),
            opts.images.clone(),
            dir.clone(),
            pids.clone(),
            ports.apiserver,
        ));
        let mut cluster = Self {
            dir,
            etcd_dir,
            remove_dirs,
            bins,
            ports,
            token,
            server_version,
            pids,
            reaper: Some(reaper),
            etcd: Some(etcd),
            apiserver: Mutex::new(None),
            apiserver_args: opts.extra_apiserver_args.clone(),
            controller_manager: None,
            scheduler: None,
            client,
            shared,
            nodes: Mutex::new(Vec::new()),
            provisioner: None,
            down: false,
        };
        let deadline = Instant::now() + opts.ready_timeout;
        cluster.spawn_apiserver()?;
        cluster.wait_apiserver_ready(deadline).await?;
        let kc = cluster.kubeconfig_path();
        let kc_args = |port: u16| {
            vec![
                format!("--kubeconfig={}", kc.display()),
                format!("--authentication-kubeconfig={}", kc.display()),
                format!("--authorization-kubeconfig={}", kc.display()),
                "--leader-elect=false".to_string(),
                "--bind-address=127.0.0.1".to_string(),
                format!("--secure-port={port}"),
                // No insecure port (1.20 defaults to 10251/10252, which would clash).
                "--port=0".to_string(),
            ]
        };
        let mut cm_args = kc_args(cluster.ports.controller_manager);
        cm_args.extend([
            format!(
                "--service-account-private-key-file={}",
                cluster.dir.join("pki/sa.key").display()
            ),
            format!(
                "--root-ca-file={}",
                cluster.dir.join("pki/ca.crt").display()
            ),
            "--controllers=*,-nodelifecycle".to_string(),
            "--pvclaimbinder-sync-period=2s".to_string(),
            "--use-service-account-credentials=false".to_string(),
        ]);
        cluster.controller_manager = Some(ManagedProcess::spawn(
            "kube-controller-manager",
            &cluster.bins.bin("kube-controller-manager"),
            &cm_args,
            &cluster.dir.join("logs/kube-controller-manager.log"),
            &cluster.pids,
        )?);
        cluster.scheduler = Some(ManagedProcess::spawn(
            "kube-scheduler",
            &cluster.bins.bin("kube-scheduler"),
            &kc_args(cluster.ports.scheduler),
            &cluster.dir.join("logs/kube-scheduler.log"),
            &cluster.pids,
        )?);
        cluster.create_storage_class().await?;
        cluster.provisioner = Some(tokio::spawn(crate::provisioner::run(
            cluster.client.clone(),
            cluster.dir.join("volumes"),
        )));
        // Node i hands out pod IPs 127.(net + i + 1).x.y: a random `net` per cluster keeps pods of
        // clusters running at the same time on this host (parallel tests) off each other's
        // addresses (two trainers on one IP: the second cannot bind, the operator of one cluster
        // would read the other's /progress).
        let net = network_base(opts.nodes.len())?;
        for (index, spec) in opts.nodes.iter().enumerate() {
            let handle = sim_node::start_node(cluster.shared.clone(), spec.clone(), net + index);
            cluster.lock_nodes().push(handle);
        }
        cluster.wait_default_service_account(deadline).await?;
        for spec in &opts.nodes {
            cluster.wait_node_ready(&spec.name, deadline).await?;
        }
        eprintln!(
            "[finetune-e2e] cluster ready in {:.1}s: {} (KUBECONFIG={})",
            t0.elapsed().as_secs_f64(),
            cluster.server_url(),
            cluster.kubeconfig_path().display()
        );
        Ok(cluster)
    }

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

    /// Fault hook: sends `signal` to a running container's process group. The container ends
    /// with exit code 128 + signal number (137 → reason `OOMKilled`).
    pub fn kill_container(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        signal: Signal,
    ) -> Result<()> {
        self.shared
            .signal_container(namespace, pod, container, signal, None)
    }

    /// Fault hook: kills a running container (SIGKILL) and reports it as exited with `exit_code`
    /// (e.g. 137 to simulate the OOM killer).
    pub fn fail_container(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        exit_code: i32,
    ) -> Result<()> {
        self.shared
            .signal_container(namespace, pod, container, Signal::SIGKILL, Some(exit_code))
    }

    /// Fault hook: makes a node NotReady (`ready == false`: heartbeats stop, condition Ready becomes
    /// `Unknown`, the `node.kubernetes.io/unreachable` taints are added; its processes keep
    /// running, as in a network partition) or Ready again.
    pub async fn set_node_ready(&self, node: &str, ready: bool) -> Result<()> {
        let handle = self
            .lock_nodes()
            .iter()
            .find(|h| h.name() == node)
            .map(NodeHandle::clone_control)
            .ok_or_else(|| Error::NotFound(format!("node {node}")))?;
        handle.set_ready(ready).await
    }

    /// Fault hook: the node's agent dies with its pods' processes and the Node object is deleted
    /// (the pod garbage collector then deletes its pods).
    pub async fn delete_node(&self, node: &str) -> Result<()> {
        let handle = {
            let mut nodes = self.lock_nodes();
            let pos = nodes
                .iter()
                .position(|h| h.name() == node)
                .ok_or_else(|| Error::NotFound(format!("node {node}")))?;
            nodes.remove(pos)
        };
        handle.stop();
        match Api::<Node>::all(self.client.clone())
            .delete(node, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Fault hook: stops kube-apiserver (SIGTERM, then SIGKILL after 10 s; a frozen one is
    /// thawed first so that it can exit).
    pub fn stop_apiserver(&self) {
        let proc = self.lock_apiserver().take();
        if let Some(mut p) = proc {
            let _ = p.signal(Signal::SIGCONT);
            p.stop(Duration::from_secs(10));
        }
    }

    /// Fault hook: freezes kube-apiserver with SIGSTOP. Its port still accepts connections (the
    /// kernel completes the handshakes) but nothing is answered: clients hang, as behind a dead
    /// load balancer, until [`Cluster::thaw_apiserver`].
    pub fn freeze_apiserver(&self) -> Result<()> {
        self.lock_apiserver()
            .as_ref()
            .ok_or_else(|| Error::ControlPlane("kube-apiserver is not running".into()))?
            .signal(Signal::SIGSTOP)
    }

    /// `Some(status)` when the kube-apiserver the harness started has exited by itself (e.g. a
    /// fatal PostStartHook), with its log's path and tail.
    pub fn apiserver_exited(&self) -> Option<String> {
        let mut guard = self.lock_apiserver();
        let status = guard.as_mut().and_then(ManagedProcess::exited)?;
        let (path, log) = guard
            .as_ref()
            .map(|p| (p.log().display().to_string(), tail(p.log(), 20)))
            .unwrap_or_default();
        Some(format!("{status}; log: {path}\n{log}"))
    }

    /// Fault hook: resumes a frozen kube-apiserver (SIGCONT).
    pub fn thaw_apiserver(&self) -> Result<()> {
        self.lock_apiserver()
            .as_ref()
            .ok_or_else(|| Error::ControlPlane("kube-apiserver is not running".into()))?
            .signal(Signal::SIGCONT)
    }

    /// The etcd client URL (`http://127.0.0.1:PORT`, no TLS), e.g. for `etcdctl --endpoints` or
    /// etcd's JSON gateway (`/v3/kv/compaction`).
    pub fn etcd_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.etcd_client)
    }

    /// Fault hook: starts kube-apiserver again (same port, same etcd, same extra flags) and waits
    /// until it serves.
    pub async fn start_apiserver(&self) -> Result<()> {
        if self.lock_apiserver().is_none() {
            self.spawn_apiserver()?;
        }
        self.wait_apiserver_ready(Instant::now() + Duration::from_secs(120))
            .await
    }

    /// Fault hook: [`Cluster::stop_apiserver`] then [`Cluster::start_apiserver`].
    pub async fn restart_apiserver(&self) -> Result<()> {
        self.stop_apiserver();
        self.start_apiserver().await
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

    fn spawn_apiserver(&self) -> Result<()> {
        let pki = self.dir.join("pki");
        let mut args = vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.ports.etcd_client),
            format!("--cert-dir={}", pki.display()),
            format!("--tls-cert-file={}", pki.join("apiserver.crt").display()),
            format!(
                "--tls-private-key-file={}",
                pki.join("apiserver.key").display()
            ),
            format!("--client-ca-file={}", pki.join("ca.crt").display()),
            format!("--secure-port={}", self.ports.apiserver),
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=10.0.0.1".to_string(),
            format!(
                "--token-auth-file={}",
                self.dir.join("tokens.csv").display()
            ),
            "--authorization-mode=RBAC".to_string(),
            "--service-account-issuer=https://kubernetes.default.svc".to_string(),
            format!(
                "--service-account-key-file={}",
                pki.join("sa.pub").display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                pki.join("sa.key").display()
            ),
            "--service-cluster-ip-range=10.0.0.0/24".to_string(),
            "--allow-privileged=true".to_string(),
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement".to_string(),
            "--profiling=false".to_string(),
        ];
        args.extend(self.apiserver_args.iter().cloned());
        let p = ManagedProcess::spawn(
            "kube-apiserver",
            &self.bins.bin("kube-apiserver"),
            &args,
            &self.dir.join("logs/kube-apiserver.log"),
            &self.pids,
        )?;
        *self.lock_apiserver() = Some(p);
        Ok(())
    }

    /// Waits until kube-apiserver is ready: `/readyz` answers `ok` (every PostStartHook has
    /// finished) and the `default` namespace is served. Serving requests alone is not enough:
    /// the `rbac/bootstrap-roles` hook keeps polling for up to 30 s of wall-clock time after the
    /// server answers and kills the process when that runs out, so a fault injected before it
    /// finished (a 30 s SIGSTOP) made kube-apiserver exit at SIGCONT (RELIABILITY.md §1).
    async fn wait_apiserver_ready(&self, deadline: Instant) -> Result<()> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        loop {
            if self.apiserver_readyz().await
                && let Ok(ns) = namespaces.get("default").await
                && ns.metadata.name.is_some()
            {
                return Ok(());
            }
            if let Some(exit) = self.apiserver_exited() {
                return Err(Error::ControlPlane(format!(
                    "kube-apiserver exited: {exit}"
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "kube-apiserver not ready (/readyz and the default namespace); log tail:\n{}",
                    tail(&self.dir.join("logs/kube-apiserver.log"), 20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Whether `GET /readyz` answers `ok`.
    async fn apiserver_readyz(&self) -> bool {
        let Ok(req) = http::Request::get("/readyz").body(Vec::new()) else {
            return false;
        };
        self.client
            .request_text(req)
            .await
            .is_ok_and(|body| body.trim() == "ok")
    }

    async fn wait_default_service_account(&self, deadline: Instant) -> Result<()> {
        self.wait_service_account_token("default", deadline)
            .await
            .map_err(|e| {
                Error::Timeout(format!(
                    "{e}; controller-manager log tail:\n{}",
                    tail(&self.dir.join("logs/kube-controller-manager.log"), 20)
                ))
            })
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

    async fn create_storage_class(&self) -> Result<()> {
        let sc: StorageClass = serde_json::from_value(serde_json::json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}
            },
            "provisioner": crate::provisioner::PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate"
        }))
        .map_err(|e| Error::ControlPlane(format!("storage class: {e}")))?;
        match Api::<StorageClass>::all(self.client.clone())
            .create(&PostParams::default(), &sc)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(e.into()),
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

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// A random first node index for this cluster's pod network, leaving room for `nodes` nodes in
/// the 254 second-octet values.
fn network_base(nodes: usize) -> Result<usize> {
    let mut buf = [0u8; 2];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| Error::io("read /dev/urandom", e))?;
    let room = 254usize.saturating_sub(nodes).max(1);
    Ok(usize::from(u16::from_le_bytes(buf)) % room)
}

fn random_token() -> Result<String> {
    let mut buf = [0u8; 16];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| Error::io("read /dev/urandom", e))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Last `n` lines of a file.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn kubeconfig_yaml(port: u16, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: finetune-e2e\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: finetune-e2e\n  context:\n    cluster: finetune-e2e\n    user: admin\n    namespace: default\ncurrent-context: finetune-e2e\n",
        ca = ca.display()
    )
}

/// CA, API-server serving certificate (SANs 127.0.0.1, 10.0.0.1, localhost, kubernetes.default.svc)
/// and service-account signing key pair, all ECDSA P-256, made with the `openssl` CLI.
async fn write_pki(dir: &Path) -> Result<()> {
    let script = r#"set -e
cd "$1"
openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -subj "/CN=finetune-e2e-ca" -days 3650 -out ca.crt
openssl ecparam -name prime256v1 -genkey -noout -out apiserver.key
openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr
printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' > ext.cnf
openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile ext.cnf -out apiserver.crt 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out sa.key
openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null
"#;
    let out = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .arg("pki")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| Error::io("run openssl", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::ControlPlane(format!(
            "openssl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}
