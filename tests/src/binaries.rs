//! Locating (and on first use building) the Kubernetes control-plane binaries.
//!
//! The build logic lives in `scripts/build-kube.sh`, embedded here: it installs the Debian packages
//! the harness needs (`etcd-server`, `rsync`, `golang-1.19-go`, `golang-github-modern-go-reflect2-dev`)
//! when missing, fetches Debian bookworm's `kubernetes` source package (Kubernetes v1.20.2 with its
//! vendor tree) and builds `kube-apiserver`, `kube-controller-manager` and `kube-scheduler` into
//! `${FINETUNE_CACHE_DIR:-~/.cache/finetune-operator}/k8s-v1.20.2/bin`. A `flock` on
//! `k8s-v1.20.2.lock` makes parallel callers wait for a single build. Progress goes to stderr.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::{Error, Result};

/// The Kubernetes version built by default.
pub const KUBE_VERSION: &str = "v1.20.2";

/// The build script, embedded so the installed `finetune-cluster` binary carries it.
pub const BUILD_SCRIPT: &str = include_str!("../scripts/build-kube.sh");

/// Where the Kubernetes binaries are, and the etcd binary to use.
#[derive(Debug, Clone)]
pub struct KubeBinaries {
    /// Directory holding `kube-apiserver`, `kube-controller-manager` and `kube-scheduler`.
    pub dir: PathBuf,
    /// The etcd executable.
    pub etcd: PathBuf,
}

impl KubeBinaries {
    /// Path of one binary in [`KubeBinaries::dir`].
    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `kube-apiserver --version`, e.g. `Kubernetes v1.20.2`.
    pub fn server_version(&self) -> Result<String> {
        let out = Command::new(self.bin("kube-apiserver"))
            .arg("--version")
            .output()
            .map_err(|e| Error::io("kube-apiserver --version", e))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// Returns the binaries, building them first when they are not cached (blocking; minutes on a cold
/// cache). `KUBE_BIN_DIR` (environment) or `override_dir` selects existing binaries instead.
pub fn ensure(override_dir: Option<PathBuf>) -> Result<KubeBinaries> {
    let mut cmd = Command::new("/bin/bash");
    cmd.arg("-c")
        .arg(BUILD_SCRIPT)
        .arg("build-kube.sh")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(dir) = override_dir {
        cmd.env("KUBE_BIN_DIR", dir);
    }
    let out = cmd
        .output()
        .map_err(|e| Error::io("run build-kube.sh", e))?;
    if !out.status.success() {
        return Err(Error::Binaries(format!(
            "build-kube.sh failed ({}); see its output above",
            out.status
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| Error::Binaries("build-kube.sh printed no directory".into()))?;
    let etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| Error::Binaries("etcd not found (package etcd-server)".into()))?;
    Ok(KubeBinaries {
        dir: PathBuf::from(dir),
        etcd,
    })
}
