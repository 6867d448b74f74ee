//! Control-plane faults and teardown: the simulated node agent survives an API-server restart,
//! node fault hooks work, and shutdown leaves no process behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use finetune_e2e::sim_node::node_is_ready;
use finetune_e2e::{Cluster, ClusterOptions, NodeSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

fn gpu_pod(name: &str) -> Pod {
    pod(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 2, "containers": [{
            "name": "main", "image": "busybox", "command": ["/bin/sh", "-c", "echo pid $$$$; exec sleep 600"],
            "resources": {"limits": {"nvidia.com/gpu": "1"}}
        }]}
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_survives_apiserver_restart_node_faults_and_teardown_leaves_nothing() {
    let t0 = Instant::now();
    let cluster = Cluster::start(ClusterOptions {
        nodes: vec![NodeSpec::gpu("sim-a", 1), NodeSpec::gpu("sim-b", 1)],
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    eprintln!("cluster start took {:.1}s", t0.elapsed().as_secs_f64());
    assert!(
        cluster.server_version().contains("v1."),
        "{}",
        cluster.server_version()
    );
    let client = cluster.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let nodes: Api<Node> = Api::all(client.clone());

    // Both nodes registered with GPU capacity, Ready, untainted, with a Lease.
    for name in ["sim-a", "sim-b"] {
        let node = nodes.get(name).await.unwrap();
        assert!(node_is_ready(&node));
        let cap = node.status.unwrap().capacity.unwrap();
        assert_eq!(cap.get("nvidia.com/gpu").unwrap().0, "1");
        let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
        wait_for(LONG, "node lease", || async {
            leases.get_opt(name).await.ok().flatten()
        })
        .await;
    }

    // kubectl works against the kubeconfig.
    match cluster
        .kubectl()
        .args(["get", "nodes", "-o", "name"])
        .output()
        .await
    {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "kubectl failed: {err}");
            assert!(text.contains("node/sim-a"), "{text}");
        }
        Err(e) => eprintln!("kubectl not available ({e}); skipped the kubectl check"),
    }

    // A pod runs, then the API server goes away and comes back.
    pods.create(&PostParams::default(), &gpu_pod("before"))
        .await
        .unwrap();
    let before = wait_phase(&pods, "before", &["Running"]).await;
    let before_node = before.spec.unwrap().node_name.unwrap();
    cluster.stop_apiserver();
    assert!(
        pods.get("before").await.is_err(),
        "API server should be down"
    );
    // While it is down the container dies; the agent must report it once the server is back.
    cluster
        .fail_container("default", "before", "main", 137)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.start_apiserver().await.unwrap();
    let before = wait_phase(&pods, "before", &["Failed"]).await;
    let term = main_status(&before).state.unwrap().terminated.unwrap();
    assert_eq!(term.reason.as_deref(), Some("OOMKilled"));
    // The agent's watch reconnected: new pods still run.
    pods.create(&PostParams::default(), &gpu_pod("after"))
        .await
        .unwrap();
    wait_phase(&pods, "after", &["Running"]).await;
    // Heartbeats continue after the restart.
    let hb = |n: Node| {
        n.status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "Ready")?
            .last_heartbeat_time
    };
    let first = hb(nodes.get(&before_node).await.unwrap()).unwrap();
    wait_for(Duration::from_secs(60), "a newer heartbeat", || async {
        let t = hb(nodes.get(&before_node).await.ok()?)?;
        (t.0 > first.0).then_some(())
    })
    .await;

    // Node NotReady: condition Unknown, tainted; a new GPU pod can only go to the other node.
    let after = pods.get("after").await.unwrap();
    let busy = after.spec.unwrap().node_name.unwrap();
    let other = if busy == "sim-a" { "sim-b" } else { "sim-a" };
    cluster.set_node_ready(other, false).await.unwrap();
    let node = nodes.get(other).await.unwrap();
    assert!(!node_is_ready(&node));
    pods.create(&PostParams::default(), &gpu_pod("waits"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        pods.get("waits")
            .await
            .unwrap()
            .spec
            .unwrap()
            .node_name
            .is_none()
    );
    cluster.set_node_ready(other, true).await.unwrap();
    let waits = wait_phase(&pods, "waits", &["Running"]).await;
    assert_eq!(waits.spec.unwrap().node_name.as_deref(), Some(other));

    // Node deleted: its agent dies with its processes.
    let pid: i32 = wait_for(LONG, "pid in log", || async {
        let log = cluster.pod_log("default", "waits", "main").ok()?;
        log.lines()
            .find_map(|l| l.strip_prefix("pid ")?.trim().parse().ok())
    })
    .await;
    assert!(pid_alive(pid));
    cluster.delete_node(other).await.unwrap();
    wait_for(LONG, "node gone", || async {
        matches!(nodes.get_opt(other).await, Ok(None)).then_some(())
    })
    .await;
    wait_for(LONG, "its pod's process gone", || async {
        (!pid_alive(pid)).then_some(())
    })
    .await;

    // Teardown leaves no process behind.
    let recorded = cluster.recorded_pids();
    assert!(recorded.len() >= 6, "recorded {recorded:?}");
    let dir = cluster.dir().to_path_buf();
    let t1 = Instant::now();
    cluster.shutdown().await;
    eprintln!("shutdown took {:.1}s", t1.elapsed().as_secs_f64());
    for pid in recorded {
        assert!(!pid_alive(pid), "process {pid} survived shutdown");
    }
    assert!(!dir.exists(), "temporary directory kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_cluster_stops_it_too() {
    let cluster = Cluster::start(ClusterOptions {
        nodes: vec![NodeSpec::gpu("sim-drop", 1)],
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    pods.create(&PostParams::default(), &gpu_pod("sleeper"))
        .await
        .unwrap();
    wait_phase(&pods, "sleeper", &["Running"]).await;
    let recorded = cluster.recorded_pids();
    drop(cluster);
    for pid in recorded {
        assert!(!pid_alive(pid), "process {pid} survived drop");
    }
}
