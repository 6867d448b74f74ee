//! The harness's API-server restart, on the real kube-apiserver: once
//! [`Cluster::start_apiserver`] returns, every PostStartHook has finished, so a fault injected
//! right after it (the chaos test freezes the API server for 30 s) cannot make kube-apiserver kill
//! itself. kube-apiserver's `rbac/bootstrap-roles` hook polls for 30 s of wall-clock time and
//! exits fatally when that runs out ("unable to initialize roles"), so a SIGSTOP while it is still
//! polling ends the process at SIGCONT. The restart happens under CPU load, as in the chaos test
//! (a trainer runs beside it), where the hook is slow.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use finetune_e2e::{Cluster, ClusterOptions};

/// Two busy loops, one per core of a CI machine, until dropped.
struct Load(Vec<std::process::Child>);

impl Load {
    fn start() -> Self {
        Self(
            (0..2)
                .map(|_| {
                    std::process::Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .unwrap()
                })
                .collect(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_api_server_survives_a_freeze_right_after_it_is_ready() {
    let cluster = Cluster::start(ClusterOptions {
        nodes: Vec::new(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let load = Load::start();
    let t0 = Instant::now();
    cluster.restart_apiserver().await.unwrap();
    let ready = t0.elapsed().as_secs_f64();
    cluster.freeze_apiserver().unwrap();
    tokio::time::sleep(Duration::from_secs(31)).await;
    cluster.thaw_apiserver().unwrap();
    drop(load);
    // A fatal hook exits within moments of SIGCONT; give it time, then require it served.
    tokio::time::sleep(Duration::from_secs(5)).await;
    if let Some(exit) = cluster.apiserver_exited() {
        panic!("kube-apiserver exited after the freeze ({ready:.1}s to restart): {exit}");
    }
    cluster.start_apiserver().await.unwrap();
    eprintln!("API SERVER RESTART: ready {ready:.1}s under load; frozen 31s; still serving");
    cluster.shutdown().await;
}

/// The hazard the harness's readiness wait closes, probed by hand (`cargo test -p finetune-e2e
/// --test apiserver_restart -- --ignored`): kube-apiserver frozen for 31 s soon after it first
/// serves `GET /api/v1/namespaces/default` (the harness's old readiness test), while its
/// PostStartHooks may still be running. Prints, per delay, whether it survived and what `/readyz`
/// said when it was frozen (it survived 5 of 5 here; the chaos failure of #12 had another cause,
/// RELIABILITY.md §1). Timing dependent, so not in `make test`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a hazard probe; timing dependent"]
async fn freezes_soon_after_kube_apiserver_first_serves() {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::Api;
    let cluster = Cluster::start(ClusterOptions {
        nodes: Vec::new(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let mut deaths = 0;
    for delay in [0u64, 0, 2, 5, 10] {
        let load = Load::start();
        cluster.stop_apiserver();
        let t0 = Instant::now();
        let c = &cluster;
        let serves = async {
            let ns: Api<Namespace> = Api::all(c.client());
            while ns.get("default").await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let served = t0.elapsed().as_secs_f64();
            tokio::time::sleep(Duration::from_secs(delay)).await;
            let req = http::Request::get("/readyz?verbose")
                .body(Vec::new())
                .unwrap();
            let readyz = match c.client().request_text(req).await {
                Ok(_) => "ok".to_string(),
                Err(e) => e
                    .to_string()
                    .lines()
                    .filter(|l| l.contains("[-]"))
                    .map(|l| {
                        l.trim_start_matches("[-]")
                            .replace(" failed: reason withheld", "")
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            };
            c.freeze_apiserver().unwrap();
            tokio::time::sleep(Duration::from_secs(31)).await;
            c.thaw_apiserver().unwrap();
            (served, readyz)
        };
        let ((served, readyz), restart) = tokio::join!(serves, c.start_apiserver());
        drop(load);
        let outcome = match (&restart, cluster.apiserver_exited()) {
            (Ok(()), None) => "survived".to_string(),
            (_, Some(exit)) => {
                deaths += 1;
                format!("EXITED: {exit}")
            }
            (Err(e), None) => format!("not ready: {e}"),
        };
        eprintln!(
            "first GET {served:.1}s after start; frozen {delay}s later with readyz pending [{readyz}]: {outcome}"
        );
        if cluster.apiserver_exited().is_some() {
            cluster.stop_apiserver();
        }
        let _ = cluster.start_apiserver().await;
    }
    eprintln!("{deaths} of 5 freezes killed kube-apiserver");
    cluster.shutdown().await;
}
