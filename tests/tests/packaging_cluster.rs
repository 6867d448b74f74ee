//! Packaging tests against the local control plane (real kube-apiserver v1.20):
//!
//! * everything the chart renders (several value sets) and the kustomize base pass
//!   `kubectl apply --dry-run=server`;
//! * the operator binary, started with the rendered Deployment's environment and the token of
//!   the rendered ServiceAccount (so only the chart's RBAC applies), elects itself leader and
//!   reconciles the tiny sample to Succeeded; `kubectl auth can-i` shows what the identity may
//!   and may not do.
//!
//! The binaries are built by `make test` (`cargo build --bins`) first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use finetune_api::{FineTuneJob, JobPhase};
use finetune_e2e::operator::{Assets, Workspace, create_demo_data, install_crd, tiny_base};
use finetune_e2e::packaging::{NAMESPACE, RELEASE, helm_render, of_kind, parse_docs, repo_root};
use finetune_e2e::{Cluster, ClusterOptions, NodeSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::Api;
use serde_json::json;
use serde_yaml::Value;

/// One cluster at a time keeps the 2-core machine responsive.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Stand-ins for the Prometheus Operator CRDs, so that ServiceMonitor, PodMonitor and
/// PrometheusRule objects can be dry-run (their schemas are not checked).
const MONITORING_CRDS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, plural: servicemonitors, singular: servicemonitor, listKind: ServiceMonitorList}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: podmonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: PodMonitor, plural: podmonitors, singular: podmonitor, listKind: PodMonitorList}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: prometheusrules.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: PrometheusRule, plural: prometheusrules, singular: prometheusrule, listKind: PrometheusRuleList}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#;

async fn kubectl_stdin(cluster: &Cluster, args: &[&str], input: &str) -> std::process::Output {
    cluster.kubectl_with_input(args, input).await.unwrap()
}

async fn kubectl_ok(cluster: &Cluster, args: &[&str], input: &str) -> String {
    let out = kubectl_stdin(cluster, args, input).await;
    assert!(
        out.status.success(),
        "kubectl {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `kubectl get <resource>` works (a new CRD is served).
async fn wait_served(cluster: &Cluster, resource: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cluster
            .kubectl()
            .args(["get", resource, "-A"])
            .output()
            .await
            .unwrap();
        if out.status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "{resource} is not served");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The API server of the harness is v1.20, which serves PodDisruptionBudget only as
/// policy/v1beta1 (same fields for what the chart sets) and has no CEL, so the CRD is the
/// pre-1.25 variant (`finetune_e2e::operator::crd_file`); newer servers take the chart as is.
async fn for_this_server(cluster: &Cluster, yaml: &str) -> String {
    let crd_path = finetune_e2e::operator::crd_file(cluster, &repo_root())
        .await
        .unwrap();
    let crd: Value = serde_yaml::from_str(&std::fs::read_to_string(crd_path).unwrap()).unwrap();
    let out = cluster
        .kubectl()
        .arg("api-versions")
        .output()
        .await
        .unwrap();
    let versions = String::from_utf8_lossy(&out.stdout).into_owned();
    let pdb_v1 = versions.lines().any(|l| l.trim() == "policy/v1");
    let docs = parse_docs(yaml).unwrap();
    docs.into_iter()
        .map(|mut d| {
            if d["kind"].as_str() == Some("PodDisruptionBudget") && !pdb_v1 {
                d["apiVersion"] = Value::from("policy/v1beta1");
            }
            if d["kind"].as_str() == Some("CustomResourceDefinition") {
                d = crd.clone();
            }
            format!("---\n{}", serde_yaml::to_string(&d).unwrap())
        })
        .collect()
}

/// Work directory of a test cluster: outside /tmp, because the simulated node bind-mounts the
/// trainer's `/tmp` scratch volume before the checkpoint volume, which then hides a volume
/// directory under /tmp inside the pod's mount namespace. Removed by [`finish`].
fn work_dir(name: &str) -> std::path::PathBuf {
    let dir = finetune_e2e::operator::cache_root()
        .join("packaging-runs")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Shuts the cluster down and removes its work directory.
async fn finish(cluster: Cluster) {
    let dir = cluster.dir().to_path_buf();
    cluster.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

async fn start_cluster(nodes: Vec<NodeSpec>, ws: Option<&Workspace>, name: &str) -> Cluster {
    let cluster = Cluster::start(ClusterOptions {
        nodes,
        images: ws.map(Workspace::image_map).unwrap_or_default(),
        work_dir: Some(work_dir(name)),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    eprintln!("API server {}", cluster.server_version());
    cluster
}

#[tokio::test]
async fn rendered_chart_and_kustomize_base_pass_server_dry_run() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let cluster = start_cluster(vec![], None, "dry-run").await;
    kubectl_ok(&cluster, &["apply", "-f", "-"], MONITORING_CRDS).await;
    for r in ["servicemonitors", "podmonitors", "prometheusrules"] {
        wait_served(&cluster, &format!("{r}.monitoring.coreos.com")).await;
    }
    for ns in [NAMESPACE, "monitoring"] {
        cluster.create_namespace(ns).await.unwrap();
    }
    let sets = [
        ("defaults", json!({})),
        (
            "monitoring",
            json!({"serviceMonitor": {"enabled": true}, "podMonitor": {"enabled": true},
                   "prometheusRule": {"enabled": true}, "dashboards": {"namespace": "monitoring"}}),
        ),
        (
            "single-namespaced",
            json!({"replicaCount": 1, "leaderElection": {"enabled": false},
                   "operator": {"watchNamespace": "default"}, "networkPolicy": {"enabled": false}}),
        ),
        (
            "renamed",
            json!({"fullnameOverride": "ft", "serviceAccount": {"name": "ft-operator"},
                   "networkPolicy": {"apiServerCIDRs": ["10.0.0.1/32"]}, "prometheusRule": {"enabled": true}}),
        ),
    ];
    // The CRD itself first (dry-run cannot serve a CRD it did not create), then each render.
    let crd = helm_render(None, RELEASE, NAMESPACE, true).unwrap();
    let crd = for_this_server(&cluster, &crd).await;
    let crd_only: String = parse_docs(&crd)
        .unwrap()
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some("CustomResourceDefinition"))
        .map(|d| format!("---\n{}", serde_yaml::to_string(&d).unwrap()))
        .collect();
    eprintln!(
        "{}",
        kubectl_ok(
            &cluster,
            &["apply", "--dry-run=server", "-f", "-"],
            &crd_only
        )
        .await
    );
    let ws_root = repo_root();
    let out = cluster
        .kubectl()
        .args(["apply", "-f"])
        .arg(
            finetune_e2e::operator::crd_file(&cluster, &ws_root)
                .await
                .unwrap(),
        )
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_served(&cluster, "finetunejobs.finetune.dev").await;
    for (name, values) in sets {
        let yaml = helm_render(Some(&values), RELEASE, NAMESPACE, false).unwrap();
        let yaml = for_this_server(&cluster, &yaml).await;
        let out = kubectl_ok(&cluster, &["apply", "--dry-run=server", "-f", "-"], &yaml).await;
        let objects = parse_docs(&yaml).unwrap().len();
        assert_eq!(
            out.lines().count(),
            objects,
            "{name}: every object applied:\n{out}"
        );
        eprintln!("{name}: {objects} objects accepted by the API server (dry run)\n{out}");
    }
    // The kustomize base (its Namespace exists already; the CRD too).
    let base = finetune_e2e::packaging::kustomize(&ws_root.join("manifests/default")).unwrap();
    let base = for_this_server(&cluster, &base).await;
    let out = kubectl_ok(&cluster, &["apply", "--dry-run=server", "-f", "-"], &base).await;
    eprintln!("manifests/default:\n{out}");
    finish(cluster).await;
    eprintln!("took {:?}", started.elapsed());
}

/// The pretrained tiny base when the shared cache has it (`tiny_base`, 300 pretraining steps);
/// otherwise a base with 20 pretraining steps of its own (these tests check packaging, not
/// model quality, and 300 steps take many minutes on a busy 2-core machine).
fn quick_tiny_base(ws: &Workspace, assets: &Assets) -> std::path::PathBuf {
    let shared = finetune_e2e::operator::cache_root().join("tiny-base");
    if std::env::var_os("FINETUNE_TINY_BASE").is_some() || shared.join("init-tiny.json").is_file() {
        return tiny_base(ws, assets).unwrap();
    }
    finetune_e2e::operator::quick_tiny_base(ws, assets).unwrap()
}

/// The demo sample, shortened for tests (as in tests/tests/operator.rs).
fn tiny_job(name: &str, max_steps: u32, every: u32) -> String {
    let sample =
        std::fs::read_to_string(repo_root().join("manifests/samples/tiny-sentiment-cpu.yaml"))
            .unwrap();
    let mut doc: Value = serde_yaml::from_str(&sample).unwrap();
    doc["metadata"]["name"] = name.into();
    let spec = &mut doc["spec"];
    spec["hyperparameters"]["maxSteps"] = max_steps.into();
    spec["hyperparameters"]["warmupSteps"] = 2.into();
    spec["hyperparameters"]["batchSize"] = 8.into();
    spec["hyperparameters"]["maxSequenceLength"] = 96.into();
    spec["evaluation"]["intervalSteps"] = every.into();
    spec["evaluation"]["retention"]["maxRows"] = 40.into();
    spec["checkpoints"]["intervalSteps"] = every.into();
    serde_yaml::to_string(&doc).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `kubectl auth can-i VERB RESOURCE [-n NS]` as the ServiceAccount; `RESOURCE:SUB` asks
/// about a subresource.
async fn can_i(cluster: &Cluster, sa: &str, verb: &str, resource: &str, ns: Option<&str>) -> bool {
    let mut cmd = cluster.kubectl();
    let (resource, sub) = resource.split_once(':').unwrap_or((resource, ""));
    cmd.args(["auth", "can-i", verb, resource, "--as", sa]);
    if !sub.is_empty() {
        cmd.arg(format!("--subresource={sub}"));
    }
    match ns {
        Some(ns) => cmd.args(["-n", ns]),
        None => cmd.arg("--all-namespaces"),
    };
    let out = cmd.output().await.unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[tokio::test]
async fn operator_reconciles_tiny_job_with_only_the_chart_rbac() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let ws = Workspace::locate().unwrap();
    let assets = Assets::fetch(&ws).unwrap();
    let tiny = quick_tiny_base(&ws, &assets);
    let cluster = start_cluster(vec![NodeSpec::gpu("sim-gpu-0", 2)], Some(&ws), "rbac").await;
    install_crd(&cluster, &ws).await.unwrap();
    cluster.create_namespace(NAMESPACE).await.unwrap();
    create_demo_data(&cluster, "default", &assets, 400)
        .await
        .unwrap();

    // Install the chart's objects, except the Deployment: its operator runs as a host process
    // below, with the Deployment's environment and the ServiceAccount's token.
    let rendered = helm_render(None, RELEASE, NAMESPACE, false).unwrap();
    let docs = parse_docs(&rendered).unwrap();
    let deploy = of_kind(&docs, "Deployment")[0].clone();
    let rest: String = docs
        .iter()
        .filter(|d| d["kind"].as_str() != Some("Deployment"))
        .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
        .collect();
    let rest = for_this_server(&cluster, &rest).await;
    eprintln!(
        "{}",
        kubectl_ok(&cluster, &["apply", "-f", "-"], &rest).await
    );

    let pod = &deploy["spec"]["template"]["spec"];
    let sa_name = pod["serviceAccountName"].as_str().unwrap().to_string();
    let sa = format!("system:serviceaccount:{NAMESPACE}:{sa_name}");

    // What the identity may do (each verb is used by the operator) and may not do.
    let lease = format!("leases/{RELEASE}-leader");
    let allowed: &[(&str, &str, Option<&str>)] = &[
        ("watch", "finetunejobs.finetune.dev", None),
        ("patch", "finetunejobs.finetune.dev:status", None),
        ("update", "finetunejobs.finetune.dev:finalizers", None),
        ("create", "pods", Some("default")),
        ("delete", "pods", Some("default")),
        ("patch", "configmaps", Some("default")),
        ("delete", "services", Some("default")),
        (
            "delete",
            "networkpolicies.networking.k8s.io",
            Some("default"),
        ),
        ("create", "persistentvolumeclaims", Some("default")),
        ("get", "nodes", None),
        ("create", "events.events.k8s.io", Some("default")),
        ("create", "leases.coordination.k8s.io", Some(NAMESPACE)),
        ("patch", lease.as_str(), Some(NAMESPACE)),
    ];
    let denied: &[(&str, &str, Option<&str>)] = &[
        ("get", "secrets", Some("default")),
        ("list", "secrets", None),
        ("create", "pods:exec", Some("default")),
        ("delete", "finetunejobs.finetune.dev", Some("default")),
        ("update", "finetunejobs.finetune.dev", Some("default")),
        ("delete", "persistentvolumeclaims", Some("default")),
        ("create", "leases.coordination.k8s.io", Some("default")),
        ("patch", "leases/someone-elses-lease", Some(NAMESPACE)),
        ("create", "clusterrolebindings", None),
        ("impersonate", "serviceaccounts", Some("default")),
        ("list", "nodes", None),
    ];
    for (verb, res, ns) in allowed {
        assert!(
            can_i(&cluster, &sa, verb, res, *ns).await,
            "{sa} cannot {verb} {res} in {ns:?}"
        );
    }
    for (verb, res, ns) in denied {
        assert!(
            !can_i(&cluster, &sa, verb, res, *ns).await,
            "{sa} may {verb} {res} in {ns:?}"
        );
    }

    // The ServiceAccount's token (v1.20: the token controller's Secret).
    let client = cluster.client();
    let deadline = Instant::now() + Duration::from_secs(60);
    let secret_name = loop {
        let sa_obj = Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
            .get(&sa_name)
            .await
            .unwrap();
        if let Some(name) = sa_obj
            .secrets
            .as_ref()
            .and_then(|s| s.first())
            .and_then(|s| s.name.clone())
        {
            break name;
        }
        assert!(Instant::now() < deadline, "no token Secret for {sa}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get(&secret_name)
        .await
        .unwrap();
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    let admin_kubeconfig = std::fs::read_to_string(cluster.kubeconfig_path()).unwrap();
    assert!(admin_kubeconfig.contains(cluster.admin_token()));
    let sa_kubeconfig = cluster.dir().join("operator-sa.kubeconfig");
    std::fs::write(
        &sa_kubeconfig,
        admin_kubeconfig.replace(cluster.admin_token(), &token),
    )
    .unwrap();

    // The operator with the Deployment's environment (downward API resolved by hand), host
    // paths for the tiny model, a free metrics port and fast test intervals.
    let container = &pod["containers"][0];
    let identity = format!("{RELEASE}-7d9f-rbac");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut cmd = std::process::Command::new(ws.bin("finetune-operator"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KUBECONFIG", &sa_kubeconfig);
    for e in container["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap();
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.name") => identity.clone(),
            Some("metadata.namespace") => NAMESPACE.to_string(),
            Some(other) => panic!("unexpected fieldRef {other}"),
            None => e["value"].as_str().unwrap().to_string(),
        };
        cmd.env(name, value);
    }
    cmd.env("METRICS_ADDRESS", &metrics)
        .env("TINY_MODEL_DIR", &tiny)
        .env("TINY_TOKENIZER_FILE", assets.tokenizer())
        .env("PROGRESS_INTERVAL", "2s")
        .env("BASE_BACKOFF", "1s")
        .env("MAX_BACKOFF", "5s")
        .env("TRAINER_GRACE_SECONDS", "30")
        .env("LOG_JSON", "false")
        .env("RUST_LOG", "info,kube=warn");
    let log = cluster.dir().join("operator-rbac.log");
    let file = std::fs::File::create(&log).unwrap();
    cmd.stdout(file.try_clone().unwrap()).stderr(file);
    let mut operator = cmd.spawn().unwrap();

    kubectl_ok(
        &cluster,
        &["apply", "-n", "default", "-f", "-"],
        &tiny_job("rbac-tiny", 20, 10),
    )
    .await;
    let jobs: Api<FineTuneJob> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut health_seen = std::collections::BTreeSet::new();
    let job = loop {
        let j = jobs.get("rbac-tiny").await.unwrap();
        let phase = j.status.as_ref().and_then(|s| s.phase);
        // The Argo CD health check on the live object, as the operator writes it.
        let obj: Value = serde_json::from_value(serde_json::to_value(&j).unwrap()).unwrap();
        let (health, message) = finetune_e2e::packaging::argocd_health(&obj).unwrap();
        if health_seen.insert(format!("{phase:?} -> {health}")) {
            eprintln!("live status {phase:?}: Argo CD health {health} ({message})");
        }
        if matches!(phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
            break j;
        }
        assert_eq!(health, "Progressing", "{phase:?}: {message}");
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            matches!(operator.try_wait(), Ok(None)),
            "operator exited:\n{log_text}"
        );
        assert!(
            Instant::now() < deadline,
            "job not finished after 10 min; status {:?}\noperator log:\n{log_text}",
            j.status
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = operator.kill();
    let _ = operator.wait();
    assert_eq!(
        job.status.as_ref().and_then(|s| s.phase),
        Some(JobPhase::Succeeded),
        "status {:?}\noperator log:\n{log_text}",
        job.status
    );
    let obj: Value = serde_json::from_value(serde_json::to_value(&job).unwrap()).unwrap();
    let (health, message) = finetune_e2e::packaging::argocd_health(&obj).unwrap();
    assert_eq!(health, "Healthy", "{message}");
    let status = job.status.as_ref().unwrap();
    assert_eq!(
        status.observed_generation, job.metadata.generation,
        "kstatus: observedGeneration"
    );
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "kstatus: Ready=True on success"
    );
    // An RBAC denial from the API server always says "forbidden" (reason Forbidden); a bare
    // "403" would also match timestamps such as 12:00:53.995403Z.
    for denied in ["forbidden", "Forbidden", " 403 "] {
        assert!(
            !log_text.contains(denied),
            "RBAC denial in the operator log:\n{log_text}"
        );
    }
    let lease = Api::<Lease>::namespaced(client.clone(), NAMESPACE)
        .get(&format!("{RELEASE}-leader"))
        .await
        .unwrap();
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some(identity.as_str()),
        "the operator led through the chart's Role"
    );
    eprintln!(
        "Succeeded under {sa} in {:?}; progress {:?}",
        started.elapsed(),
        job.status.and_then(|s| s.progress).map(|p| p.summary)
    );
    finish(cluster).await;
}

/// `GET http://{addr}{path_and_query}` over HTTP/1.0: the response head and body, or `None`
/// when nothing answers.
fn http_response(addr: &str, path_and_query: &str) -> Option<(String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(s, "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    Some((head.to_string(), body.to_string()))
}

fn is_ok_head(head: &str) -> bool {
    head.starts_with("HTTP/1.") && head.contains(" 200 ")
}

/// `GET http://{addr}{path_and_query}` over HTTP/1.0; the body (it must answer 200).
fn http_get(addr: &str, path_and_query: &str) -> String {
    let (head, body) = http_response(addr, path_and_query)
        .unwrap_or_else(|| panic!("GET {path_and_query}: no answer from {addr}"));
    assert!(is_ok_head(&head), "GET {path_and_query}: {head}\n{body}");
    body
}

/// Whether `GET /-/ready` answers 200; false while Prometheus is still starting (no listener
/// yet, or 503).
fn ready(addr: &str) -> bool {
    http_response(addr, "/-/ready").is_some_and(|(head, _)| is_ok_head(&head))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus (Debian's `prometheus`) scraping the operator (static target) and the
/// trainer pods (file-based discovery, written by the test from the pods' IPs, with the labels
/// the chart's PodMonitor produces: namespace, pod, finetune_job).
struct Prometheus {
    child: std::process::Child,
    addr: String,
    sd_file: std::path::PathBuf,
}

impl Prometheus {
    fn start(dir: &std::path::Path, operator_metrics: &str) -> Prometheus {
        finetune_e2e::packaging::ensure_apt_tool("prometheus", "prometheus").unwrap();
        let dir = dir.join("prometheus");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let sd_file = dir.join("trainers.json");
        std::fs::write(&sd_file, "[]").unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: {RELEASE}\n    static_configs:\n      - targets: ['{operator_metrics}']\n  - job_name: finetune-trainers\n    file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 1s\n",
            sd_file.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Prometheus listens before it is ready (503 while its TSDB opens): retry on 503.
            if ready(&addr) {
                break;
            }
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(300));
        }
        Prometheus {
            child,
            addr,
            sd_file,
        }
    }

    fn set_trainers(&self, targets: &[(String, String, String)]) {
        let groups: Vec<serde_json::Value> = targets
            .iter()
            .map(|(ip, pod, job)| json!({"targets": [format!("{ip}:9090")], "labels": {"namespace": "default", "pod": pod, "finetune_job": job}}))
            .collect();
        let tmp = self.sd_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string(&groups).unwrap()).unwrap();
        std::fs::rename(&tmp, &self.sd_file).unwrap();
    }

    /// A range query over `[start, end]` at 1 s resolution: the `data.result` array.
    fn query_range(&self, expr: &str, start: f64, end: f64) -> Vec<serde_json::Value> {
        let body = http_get(
            &self.addr,
            &format!(
                "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
                url_encode(expr)
            ),
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"].as_str(), Some("success"), "{expr}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Panels that may legitimately have only NaN values in a tiny run: no job was ever
/// unschedulable, so the queue-wait histogram has no observations (0/0).
const NAN_ALLOWED: &[&str] = &["Queue wait for GPUs (mean and p90)"];

#[tokio::test]
async fn dashboard_queries_return_data_from_a_real_prometheus() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let ws = Workspace::locate().unwrap();
    let assets = Assets::fetch(&ws).unwrap();
    let tiny = quick_tiny_base(&ws, &assets);
    let cluster = start_cluster(vec![NodeSpec::gpu("sim-gpu-0", 2)], Some(&ws), "prometheus").await;
    install_crd(&cluster, &ws).await.unwrap();
    create_demo_data(&cluster, "default", &assets, 400)
        .await
        .unwrap();
    let operator = finetune_e2e::operator::OperatorProcess::start(
        &cluster,
        &ws,
        &tiny,
        &assets,
        "operator-prom",
        &[],
    )
    .unwrap();
    let prom = Prometheus::start(cluster.dir(), &operator.metrics);
    let t0 = now_secs() - 5.0;

    let job = "prom-tiny";
    kubectl_ok(
        &cluster,
        &["apply", "-n", "default", "-f", "-"],
        &tiny_job(job, 30, 10),
    )
    .await;
    let jobs: Api<FineTuneJob> = Api::namespaced(cluster.client(), "default");
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(cluster.client(), "default");
    let mut known = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        // Trainer pods as scrape targets, as the PodMonitor would discover them.
        let list = pods
            .list(&kube::api::ListParams::default().labels(&format!("finetune.dev/job={job}")))
            .await
            .unwrap();
        let mut targets: Vec<(String, String, String)> = list
            .items
            .iter()
            .filter_map(|p| {
                let ip = p.status.as_ref()?.pod_ip.clone()?;
                Some((ip, p.metadata.name.clone()?, job.to_string()))
            })
            .collect();
        targets.sort();
        if targets != known {
            prom.set_trainers(&targets);
            known = targets;
        }
        let j = jobs.get(job).await.unwrap();
        let phase = j.status.as_ref().and_then(|s| s.phase);
        if matches!(phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
            assert_eq!(
                phase,
                Some(JobPhase::Succeeded),
                "{:?}\n{}",
                j.status,
                operator.log_text()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job not finished: {:?}",
            j.status
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Let the last scrapes and the operator's final gauges land.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let t1 = now_secs();
    let range = format!("{}s", (t1 - t0).ceil() as u64 + 60);

    let mut report = Vec::new();
    let mut failures = Vec::new();
    for file in ["finetune-job.json", "finetune-fleet.json"] {
        let dash: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                repo_root()
                    .join("charts/finetune-operator/dashboards")
                    .join(file),
            )
            .unwrap(),
        )
        .unwrap();
        for panel in dash["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap();
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$namespace", "default")
                    .replace("$job", job)
                    .replace("$operator_job", RELEASE)
                    .replace("$__rate_interval", "15s")
                    .replace("$__range", &range);
                let result = prom.query_range(&expr, t0, t1);
                let finite = result
                    .iter()
                    .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
                    .filter(|v| {
                        v[1].as_str()
                            .and_then(|x| x.parse::<f64>().ok())
                            .is_some_and(f64::is_finite)
                    })
                    .count();
                let line = format!(
                    "{file} / {title}: {} series, {finite} finite samples: {expr}",
                    result.len()
                );
                if result.is_empty() || (finite == 0 && !NAN_ALLOWED.contains(&title)) {
                    failures.push(line.clone());
                }
                report.push((line, result));
            }
        }
    }
    for (line, _) in &report {
        eprintln!("{line}");
    }
    // One panel's query and its series, for the record.
    for (line, result) in report
        .iter()
        .filter(|(l, _)| l.contains("Train vs validation loss"))
    {
        let summary: Vec<String> = result
            .iter()
            .map(|s| {
                let values = s["values"].as_array().cloned().unwrap_or_default();
                format!(
                    "{} : {} samples, first {:?}, last {:?}",
                    s["metric"],
                    values.len(),
                    values.first().map(|v| v[1].clone()),
                    values.last().map(|v| v[1].clone())
                )
            })
            .collect();
        eprintln!("example panel: {line}\n  {}", summary.join("\n  "));
    }
    drop(prom);
    drop(operator);
    finish(cluster).await;
    assert!(
        failures.is_empty(),
        "panels without data:\n{}",
        failures.join("\n")
    );
    eprintln!("took {:?}", started.elapsed());
}
