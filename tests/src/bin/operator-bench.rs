//! `operator-bench`: creates N FineTuneJobs at once against the local control plane and
//! measures how long the operator takes until every trainer pod exists, its write requests per
//! job, its peak RSS, and its write requests per idle job over a quiet period.
//!
//! The cluster has no node, so the pods stay Pending: this measures the operator, not the
//! simulated kubelet. Every job uses one shared, bound checkpoint claim. Run by `make bench` (10-minute quiet period) and by `make soak`
//! (`scripts/soak.sh`: 30 minutes, with the operator's RSS sampled every minute to give the
//! memory slope); results go to BENCHMARKS.md and RELIABILITY.md.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use finetune_api::FineTuneJob;
use finetune_e2e::operator::{Assets, OperatorProcess, Workspace, install_crd};
use finetune_e2e::{Cluster, ClusterOptions};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, PostParams};

#[derive(Parser, Debug)]
#[command(about = "Operator load benchmark")]
struct Args {
    /// FineTuneJobs created at once.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// Quiet period over which idle writes are counted, seconds.
    #[arg(long, env = "BENCH_IDLE_SECONDS", default_value_t = 600)]
    idle_seconds: u64,
    /// Interval between samples of the operator's RSS during the quiet period, seconds.
    #[arg(long, env = "BENCH_SAMPLE_SECONDS", default_value_t = 60)]
    sample_seconds: u64,
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Least-squares slope of `(seconds, MiB)` samples, in MiB per hour.
fn slope_mib_per_hour(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let mean_m = samples.iter().map(|s| s.1).sum::<f64>() / n;
    let cov: f64 = samples
        .iter()
        .map(|s| (s.0 - mean_t) * (s.1 - mean_m))
        .sum();
    let var: f64 = samples.iter().map(|s| (s.0 - mean_t).powi(2)).sum();
    if var == 0.0 { 0.0 } else { cov / var * 3600.0 }
}

fn scrape(addr: &str, metric: &str) -> f64 {
    let body = std::process::Command::new("curl")
        .args(["-s", &format!("http://{addr}/metrics")])
        .output();
    let text = body
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(metric))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ws = Workspace::locate()?;
    let cluster = Cluster::start(ClusterOptions {
        nodes: vec![],
        ..ClusterOptions::default()
    })
    .await?;
    install_crd(&cluster, &ws).await?;
    let assets = Assets {
        dir: Path::new("/nonexistent").into(),
    };
    let op = OperatorProcess::start(
        &cluster,
        &ws,
        Path::new("/nonexistent"),
        &assets,
        "bench-operator",
        &[],
    )?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let sample =
        std::fs::read_to_string(ws.root.join("manifests/samples/tiny-sentiment-cpu.yaml"))?;
    let mut template: FineTuneJob = serde_yaml::from_str(&sample)?;
    // Every job writes its checkpoints to one shared, already bound claim: with a claim per job
    // the quiet period would measure kube-controller-manager binding 1,000 claims (tens of
    // minutes here, each binding changing the scheduler's message on the pod), not the operator.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client(), "default");
    let claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "bench-checkpoints"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}
    }))?;
    claims.create(&PostParams::default(), &claim).await?;
    let bound_by = Instant::now() + Duration::from_secs(120);
    while claims
        .get("bench-checkpoints")
        .await?
        .status
        .and_then(|s| s.phase)
        .as_deref()
        != Some("Bound")
    {
        anyhow::ensure!(Instant::now() < bound_by, "bench claim not bound in 120 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let storage = &mut template.spec.checkpoints.storage;
    storage.existing_claim = Some("bench-checkpoints".into());
    storage.size = None;
    storage.storage_class_name = None;
    let jobs: Api<FineTuneJob> = Api::namespaced(cluster.client(), "default");
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let writes_before = scrape(&op.metrics, "finetune_operator_api_writes_total");

    let start = Instant::now();
    futures::stream::iter(0..args.jobs)
        .map(|i| {
            let mut job = template.clone();
            job.metadata.name = Some(format!("bench-{i:04}"));
            let jobs = jobs.clone();
            async move { jobs.create(&PostParams::default(), &job).await }
        })
        .buffer_unordered(32)
        .for_each(|r| async move {
            if let Err(e) = r {
                eprintln!("create failed: {e}");
            }
        })
        .await;
    let created = start.elapsed();
    let lp = ListParams::default().labels("finetune.dev/job");
    let all_pods = loop {
        let n = pods.list_metadata(&lp).await?.items.len();
        if n >= args.jobs {
            break start.elapsed();
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(900),
            "only {n} pods after 900 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Let the status of every job settle (Pending, with the pod created) before measuring idle.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let writes_settled = scrape(&op.metrics, "finetune_operator_api_writes_total");
    let reconciles_settled = scrape(&op.metrics, "finetune_operator_reconcile_total");
    let op_pid = op.pid();
    let idle_start = Instant::now();
    let mut samples = Vec::new();
    // (seconds, API writes, reconciles) at every sample, to show when the quiet-period work
    // happened (a backlog draining at the start, or a steady rate).
    let mut counters = Vec::new();
    while idle_start.elapsed() < Duration::from_secs(args.idle_seconds) {
        let mib = rss_kib(op_pid, "VmRSS:") as f64 / 1024.0;
        samples.push((idle_start.elapsed().as_secs_f64(), mib));
        counters.push((
            idle_start.elapsed().as_secs_f64(),
            scrape(&op.metrics, "finetune_operator_api_writes_total"),
            scrape(&op.metrics, "finetune_operator_reconcile_total"),
        ));
        let left = Duration::from_secs(args.idle_seconds).saturating_sub(idle_start.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(args.sample_seconds.max(1)))).await;
    }
    samples.push((
        idle_start.elapsed().as_secs_f64(),
        rss_kib(op_pid, "VmRSS:") as f64 / 1024.0,
    ));
    let idle = idle_start.elapsed().as_secs_f64();
    let writes_idle = scrape(&op.metrics, "finetune_operator_api_writes_total") - writes_settled;
    let reconciles = scrape(&op.metrics, "finetune_operator_reconcile_total");
    let reconciles_idle = reconciles - reconciles_settled;
    let conflicts = scrape(
        &op.metrics,
        "finetune_operator_status_writes_total{result=\"conflict\"}",
    );
    let rss = rss_kib(op_pid, "VmHWM:");
    println!(
        "jobs created: {} in {:.1} s",
        args.jobs,
        created.as_secs_f64()
    );
    println!(
        "all {} pods exist after {:.1} s",
        args.jobs,
        all_pods.as_secs_f64()
    );
    println!(
        "API writes per job to settle: {:.2}",
        (writes_settled - writes_before) / args.jobs as f64
    );
    println!(
        "idle writes per job over {} s: {:.4} ({} in total)",
        idle_start.elapsed().as_secs(),
        writes_idle / args.jobs as f64,
        writes_idle
    );
    let per_job_hour = |n: f64| n / args.jobs as f64 / (idle / 3600.0);
    println!(
        "idle: {:.4} writes and {:.4} reconciles per job per hour ({writes_idle} writes, \
         {reconciles_idle} reconciles in {idle:.0} s)",
        per_job_hour(writes_idle),
        per_job_hour(reconciles_idle)
    );
    counters.push((idle, writes_settled + writes_idle, reconciles));
    let series: Vec<String> = counters
        .windows(2)
        .map(|w| format!("{:.0}s:+{}w/+{}r", w[1].0, w[1].1 - w[0].1, w[1].2 - w[0].2))
        .collect();
    println!(
        "quiet period, per sample (writes/reconciles): {}",
        series.join(" ")
    );
    // The second half of the quiet period: steady state, after any backlog drained.
    if let (Some(mid), Some(end)) = (counters.get(counters.len() / 2), counters.last()) {
        let hours = (end.0 - mid.0) / 3600.0;
        if hours > 0.0 {
            println!(
                "second half of the quiet period ({:.0} s): {:.4} writes and {:.4} reconciles per \
                 job per hour",
                end.0 - mid.0,
                (end.1 - mid.1) / args.jobs as f64 / hours,
                (end.2 - mid.2) / args.jobs as f64 / hours
            );
        }
    }
    println!("reconciles in total: {reconciles}");
    println!("HTTP 409 conflicts on status writes: {conflicts}");
    let first = samples.first().map(|s| s.1).unwrap_or(0.0);
    let last = samples.last().map(|s| s.1).unwrap_or(0.0);
    println!(
        "operator RSS over the quiet period: {first:.1} → {last:.1} MiB, slope {:.2} MiB/h \
         ({} samples)",
        slope_mib_per_hour(&samples),
        samples.len()
    );
    println!("operator peak RSS: {:.1} MiB", rss as f64 / 1024.0);
    drop(op);
    cluster.shutdown().await;
    Ok(())
}
