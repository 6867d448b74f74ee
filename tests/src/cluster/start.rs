//! [`Cluster::start`]: free ports, PKI and kubeconfig, the reaper, etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler, the StorageClass and its provisioner, then the
//! simulated nodes, and the waits until all of it is ready.

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Api;
use kube::api::PostParams;

use super::{Cluster, ClusterOptions, Ports, STORAGE_CLASS, client_from_kubeconfig, tail};
use crate::binaries;
use crate::error::is_status;
use crate::process::{self, ManagedProcess, PidRegistry};
use crate::sim_node::{self, SimShared};
use crate::{Error, Result};

/// Picks five distinct free ports on 127.0.0.1.
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

/// Numbers the clusters this process starts (part of their directory names).
static CLUSTER_SEQ: AtomicU64 = AtomicU64::new(0);

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
        // Node i hands out pod IPs 127.(net + i + 1).x.y: a random `net` per cluster keeps pods of
        // clusters running at the same time on this host (parallel tests) off each other's
        // addresses (two trainers on one IP: the second cannot bind, the operator of one cluster
        // would read the other's /progress). The block after the nodes' is the cluster DNS's.
        let net = network_base(opts.nodes.len() + 1)?;
        let dns_ip = Ipv4Addr::new(127, ((net + opts.nodes.len()) % 254 + 1) as u8, 0, 53);
        let dns_socket = match crate::dns::bind(dns_ip).await {
            Ok(socket) => Some(socket),
            Err(e) => {
                eprintln!("[finetune-e2e] no cluster DNS (binding {dns_ip}:53: {e})");
                None
            }
        };
        let shared = Arc::new(SimShared::new(
            client.clone(),
            opts.images.clone(),
            dir.clone(),
            pids.clone(),
            ports.apiserver,
            dns_socket.as_ref().map(|_| dns_ip),
        ));
        let dns = dns_socket.map(|socket| tokio::spawn(crate::dns::serve(socket, client.clone())));
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
            dns,
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

    /// Starts kube-apiserver (on the cluster's port and etcd, with the extra flags of
    /// [`ClusterOptions::extra_apiserver_args`]) and records it.
    pub(super) fn spawn_apiserver(&self) -> Result<()> {
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
    pub(super) async fn wait_apiserver_ready(&self, deadline: Instant) -> Result<()> {
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
