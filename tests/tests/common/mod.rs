//! Helpers shared by the end-to-end tests: polling with deadlines and pod builders.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod job;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;

/// Generous deadline for anything on a noisy 2-core machine.
pub const LONG: Duration = Duration::from_secs(120);

/// Polls `f` every 250 ms until it returns `Some`, panicking with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the pod's phase is one of `phases`, returning the pod; on timeout the panic shows
/// the pod's last status.
pub async fn wait_phase(pods: &Api<Pod>, name: &str, phases: &[&str]) -> Pod {
    let deadline = Instant::now() + LONG;
    loop {
        let pod = pods.get_opt(name).await.ok().flatten();
        let phase = pod
            .as_ref()
            .and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.clone());
        if let (Some(pod), Some(phase)) = (&pod, phase)
            && phases.contains(&phase.as_str())
        {
            return pod.clone();
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for pod {name} in phase {phases:?}; last seen: {}",
                serde_json::to_string_pretty(&pod).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the pod no longer exists.
pub async fn wait_gone(pods: &Api<Pod>, name: &str) {
    wait_for(LONG, &format!("pod {name} deleted"), || async {
        matches!(pods.get_opt(name).await, Ok(None)).then_some(())
    })
    .await
}

/// A pod from JSON.
pub fn pod(value: serde_json::Value) -> Pod {
    serde_json::from_value(value).unwrap()
}

/// A `busybox` pod running `sh -c script` with restart policy Never.
pub fn shell_pod(name: &str, script: &str) -> Pod {
    pod(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": "busybox:1.36", "command": ["/bin/sh", "-c", script]}]
        }
    }))
}

/// The first container's status of a pod.
pub fn main_status(pod: &Pod) -> k8s_openapi::api::core::v1::ContainerStatus {
    try_main_status(pod).expect("pod has a container status")
}

/// The first container's status of a pod, if reported yet.
pub fn try_main_status(pod: &Pod) -> Option<k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()
        .cloned()
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}
