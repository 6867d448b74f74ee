//! `finetune-operator`: reconciles FineTuneJobs into trainer pods, volumes and status.

use clap::Parser;
use finetune_operator::{Args, Context, controller, leader, metrics::Metrics, server, telemetry};
use tracing::{error, info};

/// Public so that finetune-e2e's `finetune-operator-failpoints` binary can run this very `main`.
#[tokio::main]
pub async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Crash points for the fault-injection tests, armed by FAILPOINTS (failpoints feature only).
    let _crash_points = finetune_operator::failpoints::arm_from_env();
    telemetry::init(args.log_json);
    let client = kube::Client::try_default().await?;
    let version = client.apiserver_version().await?;
    info!(server = %version.git_version, "connected to the API server");
    if finetune_operator::failpoints::COMPILED {
        info!("crash points compiled in (failpoints feature)");
    }

    let metrics = Metrics::new()?;
    let health = server::Health::default();
    let (addr, serve) = server::bind(args.metrics_address, metrics.clone(), health.clone()).await?;
    info!(%addr, "serving /metrics, /healthz and /readyz");
    tokio::spawn(serve);

    let ctx = Context::new(client.clone(), args.clone(), metrics.clone());
    if !args.leader_election {
        metrics.leader.set(1);
        controller::run(ctx, &health).await;
        return Ok(());
    }
    // A follower is ready: it is healthy and takes over when the leader goes.
    health.set_ready(true);
    let identity = if args.identity.is_empty() {
        format!("finetune-operator-{}", std::process::id())
    } else {
        args.identity.clone()
    };
    let mut leading = leader::elect(
        client,
        &args.leader_election_lease,
        &args.leader_election_namespace,
        &identity,
        args.leader_lease_duration,
    )
    .await?;
    info!(%identity, "waiting for leadership");
    leading.wait_for(|l| *l).await?;
    info!(%identity, "became the leader");
    metrics.leader.set(1);
    // Not ready again until this replica's caches have synced.
    health.set_ready(false);
    tokio::select! {
        () = controller::run(ctx, &health) => Ok(()),
        lost = leading.wait_for(|l| !*l) => {
            metrics.leader.set(0);
            error!(%identity, "lost leadership; exiting so a fresh replica can rejoin");
            lost?;
            anyhow::bail!("lost leadership")
        }
    }
}
