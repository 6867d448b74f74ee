//! Locating the Kubernetes binaries: the cache is used once built, and `KUBE_BIN_DIR`-style
//! overrides are honoured or rejected with a clear error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use finetune_e2e::binaries;

#[test]
fn cached_binaries_are_found_and_report_their_version() {
    let t0 = std::time::Instant::now();
    let bins = binaries::ensure(None).unwrap();
    for b in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        assert!(
            bins.bin(b).exists(),
            "{b} missing in {}",
            bins.dir.display()
        );
    }
    assert!(bins.etcd.exists());
    let version = bins.server_version().unwrap();
    assert!(version.starts_with("Kubernetes v1."), "{version}");
    eprintln!(
        "binaries ready in {:.1}s: {version}",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn an_override_directory_is_used_as_is_or_rejected() {
    let bins = binaries::ensure(None).unwrap();
    let same = binaries::ensure(Some(bins.dir.clone())).unwrap();
    assert_eq!(same.dir, bins.dir);
    let empty = std::env::temp_dir().join(format!("no-kube-bins-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let err = binaries::ensure(Some(empty.clone())).unwrap_err();
    assert!(err.to_string().contains("build-kube.sh failed"), "{err}");
    std::fs::remove_dir_all(&empty).unwrap();
}
