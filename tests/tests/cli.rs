//! `finetune-cluster up|env|status|down`, as a person uses it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use k8s_openapi::api::core::v1::Node;
use kube::Api;

fn cli(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_finetune-cluster"))
        .args(args)
        .env("FINETUNE_CLUSTER_DIR", dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_prints_kubeconfig_and_down_stops_everything() {
    let dir = std::env::temp_dir().join(format!("finetune-cluster-cli-{}", std::process::id()));
    let up = cli(&dir, &["up", "--gpus", "3"]);
    let stdout = String::from_utf8_lossy(&up.stdout).to_string();
    assert!(
        up.status.success(),
        "up failed: {stdout}\n{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let kubeconfig = dir.join("cluster/kubeconfig");
    assert_eq!(
        stdout.trim(),
        format!("export KUBECONFIG={}", kubeconfig.display())
    );
    let env = cli(&dir, &["env"]);
    assert_eq!(String::from_utf8_lossy(&env.stdout).trim(), stdout.trim());

    let client = finetune_e2e::cluster::client_from_kubeconfig(&kubeconfig)
        .await
        .unwrap();
    let node = Api::<Node>::all(client).get("sim-gpu-0").await.unwrap();
    let cap = node.status.unwrap().capacity.unwrap();
    assert_eq!(cap.get("nvidia.com/gpu").unwrap().0, "3");
    let status = cli(&dir, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("v1.") && text.contains("nvidia.com/gpu=3"),
        "{text}"
    );

    let pids: Vec<i32> = std::fs::read_to_string(dir.join("cluster/pids"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let serve: i32 = std::fs::read_to_string(dir.join("serve.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pids.len() >= 4, "{pids:?}");
    let down = cli(&dir, &["down"]);
    assert!(down.status.success());
    for pid in pids.into_iter().chain([serve]) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let running = !stat.is_empty()
            && !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z');
        assert!(!running, "process {pid} survived `down`");
    }
    let status = cli(&dir, &["status"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("not running"));
    let env = cli(&dir, &["env"]);
    assert!(!env.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}
