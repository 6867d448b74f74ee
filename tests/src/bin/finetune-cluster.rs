//! `finetune-cluster`: a local Kubernetes v1.20.2 control plane with simulated GPU nodes, for people.
//!
//! - `finetune-cluster up` builds the binaries on first use, starts the cluster in the background
//!   and prints `export KUBECONFIG=…`;
//! - `finetune-cluster env` prints that line again; `status` shows the nodes; `down` stops
//!   everything (by recorded pid).
//!
//! State lives in `$FINETUNE_CLUSTER_DIR` (default `~/.cache/finetune-operator/cluster`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use finetune_e2e::{Cluster, ClusterOptions, ImageMap, ImageSpec, NodeSpec};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::ListParams;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

#[derive(Parser)]
#[command(about = "Local Kubernetes control plane with simulated GPU nodes (for tests and demos)")]
struct Cli {
    /// State directory (kubeconfig, logs, pids).
    #[arg(long, env = "FINETUNE_CLUSTER_DIR", global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the cluster in the background and print `export KUBECONFIG=…`.
    Up(NodeArgs),
    /// Stop the cluster started by `up`.
    Down,
    /// Print `export KUBECONFIG=…` for a running cluster.
    Env,
    /// Show whether the cluster runs, its version and nodes.
    Status,
    /// Run the cluster in the foreground until SIGTERM/SIGINT (what `up` starts).
    Serve(NodeArgs),
}

#[derive(clap::Args, Clone)]
struct NodeArgs {
    /// Number of simulated GPU nodes.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// GPUs per simulated node.
    #[arg(long, default_value_t = 2)]
    gpus: u32,
    /// Image mappings `IMAGE=EXECUTABLE` (repository without tag matches every tag).
    #[arg(long = "image", value_name = "IMAGE=EXECUTABLE")]
    images: Vec<String>,
}

fn state_dir(cli: &Cli) -> PathBuf {
    cli.dir.clone().unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
            .join(".cache/finetune-operator/cluster")
    })
}

fn read_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("serve.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

fn running(dir: &Path) -> bool {
    read_pid(dir).is_some_and(alive) && dir.join("ready").exists()
}

fn kubeconfig(dir: &Path) -> PathBuf {
    dir.join("cluster/kubeconfig")
}

fn node_args(a: &NodeArgs) -> Vec<String> {
    let mut v = vec![format!("--nodes={}", a.nodes), format!("--gpus={}", a.gpus)];
    v.extend(a.images.iter().map(|i| format!("--image={i}")));
    v
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // kube's client logs every refused connection while the API server starts; quiet it.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let dir = state_dir(&cli);
    std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    match &cli.command {
        Cmd::Up(args) => up(&dir, args),
        Cmd::Down => down(&dir),
        Cmd::Env => {
            if !running(&dir) {
                bail!(
                    "no cluster is running (state in {}); run `finetune-cluster up`",
                    dir.display()
                );
            }
            println!("export KUBECONFIG={}", kubeconfig(&dir).display());
            Ok(())
        }
        Cmd::Status => tokio::runtime::Runtime::new()?.block_on(status(&dir)),
        Cmd::Serve(args) => tokio::runtime::Runtime::new()?.block_on(serve(&dir, args)),
    }
}

fn up(dir: &Path, args: &NodeArgs) -> Result<()> {
    if running(dir) {
        eprintln!("cluster already running");
        println!("export KUBECONFIG={}", kubeconfig(dir).display());
        return Ok(());
    }
    let t0 = Instant::now();
    // Build (or find) the binaries in the foreground so progress shows here.
    let bins = finetune_e2e::binaries::ensure(None)?;
    eprintln!("using {} ({})", bins.dir.display(), bins.server_version()?);
    let _ = std::fs::remove_file(dir.join("ready"));
    let log = std::fs::File::create(dir.join("serve.log"))?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new("setsid");
    cmd.arg(exe)
        .arg(format!("--dir={}", dir.display()))
        .arg("serve")
        .args(node_args(args))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut child = cmd.spawn().context("start finetune-cluster serve")?;
    std::fs::write(dir.join("serve.pid"), child.id().to_string())?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !dir.join("ready").exists() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "cluster failed to start ({status}); see {}",
                dir.join("serve.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "cluster not ready after 300 s; see {}",
                dir.join("serve.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "cluster up in {:.1}s; logs in {}",
        t0.elapsed().as_secs_f64(),
        dir.join("cluster/logs").display()
    );
    println!("export KUBECONFIG={}", kubeconfig(dir).display());
    Ok(())
}

fn down(dir: &Path) -> Result<()> {
    let Some(pid) = read_pid(dir) else {
        eprintln!("no cluster recorded in {}", dir.display());
        return Ok(());
    };
    if alive(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        if alive(pid) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    // Belt and braces: every process group the cluster recorded.
    let pids = std::fs::read_to_string(dir.join("cluster/pids")).unwrap_or_default();
    for pgid in pids
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    let _ = std::fs::remove_file(dir.join("ready"));
    let _ = std::fs::remove_file(dir.join("serve.pid"));
    eprintln!("cluster stopped");
    Ok(())
}

async fn status(dir: &Path) -> Result<()> {
    if !running(dir) {
        println!("not running (state in {})", dir.display());
        return Ok(());
    }
    let client = finetune_e2e::cluster::client_from_kubeconfig(&kubeconfig(dir)).await?;
    let version = client.apiserver_version().await?;
    println!(
        "running: Kubernetes {} (KUBECONFIG={})",
        version.git_version,
        kubeconfig(dir).display()
    );
    for node in Api::<Node>::all(client)
        .list(&ListParams::default())
        .await?
    {
        let gpus = node
            .status
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get(finetune_e2e::sim_node::GPU_RESOURCE))
            .map(|q| q.0.clone())
            .unwrap_or_else(|| "0".into());
        let ready = finetune_e2e::sim_node::node_is_ready(&node);
        println!(
            "node {} ready={ready} nvidia.com/gpu={gpus}",
            node.metadata.name.unwrap_or_default()
        );
    }
    Ok(())
}

async fn serve(dir: &Path, args: &NodeArgs) -> Result<()> {
    let work = dir.join("cluster");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut images = ImageMap::default();
    for m in &args.images {
        let (image, exe) = m
            .split_once('=')
            .with_context(|| format!("--image {m}: expected IMAGE=EXECUTABLE"))?;
        images.insert(image, ImageSpec::entrypoint([exe]));
    }
    let nodes = (0..args.nodes.max(1))
        .map(|i| NodeSpec::gpu(format!("sim-gpu-{i}"), args.gpus))
        .collect();
    let cluster = Cluster::start(ClusterOptions {
        nodes,
        images,
        work_dir: Some(work),
        ..ClusterOptions::default()
    })
    .await?;
    std::fs::write(dir.join("ready"), b"")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => continue,
        }
    }
    let _ = std::fs::remove_file(dir.join("ready"));
    cluster.shutdown().await;
    Ok(())
}
