//! The operator end-to-end prologue shared by `operator.rs` and `chaos.rs`: a cluster with the
//! CRD and the demo data, the tiny FineTuneJob, and reads of jobs, pods and operator metrics.

use std::time::{Duration, Instant};

use finetune_api::{FineTuneJob, JOB_LABEL, JobPhase};
use finetune_e2e::operator::{Assets, Workspace, create_demo_data, install_crd, tiny_base};
use finetune_e2e::{Cluster, ClusterOptions, NodeSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

/// Namespace of every test job.
pub const NS: &str = "default";

/// Deadline for anything that trains.
pub const TRAIN: Duration = Duration::from_secs(600);

/// A started cluster with the CRD, the demo ConfigMaps, the workspace binaries and the tiny base.
pub struct Env {
    /// The cluster.
    pub cluster: Cluster,
    /// The workspace (binaries).
    pub ws: Workspace,
    /// Tokenizer and data.
    pub assets: Assets,
    /// The tiny base model directory.
    pub tiny: std::path::PathBuf,
}

/// One simulated node `sim-gpu-0` with 2 GPUs.
pub async fn env() -> Env {
    env_with(vec![NodeSpec::gpu("sim-gpu-0", 2)], Vec::new()).await
}

/// A cluster with these nodes and extra kube-apiserver flags.
pub async fn env_with(nodes: Vec<NodeSpec>, apiserver_args: Vec<String>) -> Env {
    let ws = Workspace::locate().unwrap();
    let assets = Assets::fetch(&ws).unwrap();
    let tiny = tiny_base(&ws, &assets).unwrap();
    let cluster = Cluster::start(ClusterOptions {
        nodes,
        images: ws.image_map(),
        extra_apiserver_args: apiserver_args,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    eprintln!("API server {}", cluster.server_version());
    install_crd(&cluster, &ws).await.unwrap();
    create_demo_data(&cluster, NS, &assets, 800).await.unwrap();
    Env {
        cluster,
        ws,
        assets,
        tiny,
    }
}

/// The demo sample, shortened for tests: LoRA, `max_steps`, a checkpoint and an evaluation every
/// `checkpoint_every` steps.
pub fn tiny_job(name: &str, max_steps: u32, checkpoint_every: u32) -> String {
    tiny_job_with(name, max_steps, checkpoint_every, checkpoint_every)
}

/// [`tiny_job`] with its own evaluation interval (evaluation is the slow part of a step).
pub fn tiny_job_with(name: &str, max_steps: u32, checkpoint_every: u32, eval_every: u32) -> String {
    let sample = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/samples/tiny-sentiment-cpu.yaml"),
    )
    .unwrap();
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&sample).unwrap();
    doc["metadata"]["name"] = name.into();
    let spec = &mut doc["spec"];
    // LoRA keeps the test runs short and checks the adapter output.
    spec["method"] = serde_yaml::from_str(
        "{type: lora, lora: {rank: 8, alpha: 16, dropout: 0.0, targetModules: [q_proj, v_proj]}}",
    )
    .unwrap();
    spec["hyperparameters"]["maxSteps"] = max_steps.into();
    spec["hyperparameters"]["warmupSteps"] = 2.into();
    spec["hyperparameters"]["batchSize"] = 8.into();
    spec["hyperparameters"]["maxSequenceLength"] = 96.into();
    spec["evaluation"]["intervalSteps"] = eval_every.into();
    spec["evaluation"]["retention"]["maxRows"] = 40.into();
    spec["checkpoints"]["intervalSteps"] = checkpoint_every.into();
    serde_yaml::to_string(&doc).unwrap()
}

/// `kubectl apply -f -` of `yaml`.
pub async fn kubectl_apply(cluster: &Cluster, yaml: &str) -> std::process::Output {
    cluster
        .kubectl_with_input(&["apply", "-f", "-"], yaml)
        .await
        .unwrap()
}

/// `kubectl apply` that must succeed.
pub async fn apply_ok(cluster: &Cluster, yaml: &str) {
    let out = kubectl_apply(cluster, yaml).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The job, read from the API server.
pub async fn job(cluster: &Cluster, name: &str) -> FineTuneJob {
    Api::<FineTuneJob>::namespaced(cluster.client(), NS)
        .get(name)
        .await
        .unwrap()
}

/// Polls the job every 500 ms until `f` holds; panics with its status after `timeout`.
pub async fn wait_job<F: Fn(&FineTuneJob) -> bool>(
    cluster: &Cluster,
    name: &str,
    timeout: Duration,
    what: &str,
    f: F,
) -> FineTuneJob {
    let api = Api::<FineTuneJob>::namespaced(cluster.client(), NS);
    let deadline = Instant::now() + timeout;
    loop {
        // The API server may be restarting under a fault test: retry reads.
        if let Ok(j) = api.get(name).await {
            if f(&j) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; status: {}",
                serde_json::to_string_pretty(&j.status).unwrap()
            );
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The job's phase.
pub fn phase(j: &FineTuneJob) -> Option<JobPhase> {
    j.status.as_ref().and_then(|s| s.phase)
}

/// The job's reported step.
pub fn step(j: &FineTuneJob) -> u64 {
    j.status
        .as_ref()
        .and_then(|s| s.progress.as_ref())
        .map_or(0, |p| p.step)
}

/// The newest checkpoint's step.
pub fn checkpoint_step(j: &FineTuneJob) -> u64 {
    j.status
        .as_ref()
        .and_then(|s| s.checkpoints.as_ref())
        .and_then(|c| c.latest_step)
        .unwrap_or(0)
}

/// The step the current trainer resumed from.
pub fn resumed_from(j: &FineTuneJob) -> u64 {
    j.status
        .as_ref()
        .and_then(|s| s.progress.as_ref())
        .map_or(0, |p| p.resumed_from_step)
}

/// One condition of the job.
pub fn condition(
    j: &FineTuneJob,
    type_: &str,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    j.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .cloned()
}

/// The job's pods (by the job label).
pub async fn job_pods(cluster: &Cluster, name: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(cluster.client(), NS)
        .list(&ListParams::default().labels(&format!("{JOB_LABEL}={name}")))
        .await
        .unwrap()
        .items
}

/// Names of the pods that are not being deleted and not finished.
pub fn active(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    None | Some("Pending") | Some("Running")
                )
        })
        .map(|p| p.metadata.name.clone().unwrap())
        .collect()
}

/// `GET http://{addr}{path}` over HTTP/1.0; the body, or `None` on any failure.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_string())
}

/// The value of one Prometheus sample (`name{labels}` exactly as exposed, e.g.
/// `finetune_operator_status_writes_total{result="ok"}`) from a `/metrics` body; 0 when absent.
pub fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == series).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}
