//! Pure lifecycle decisions: how a finished trainer pod is classified, and how long to wait
//! before the next attempt.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

use crate::names::TRAINER_CONTAINER;

/// Why a trainer pod has not started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// Nothing is wrong (yet): being scheduled, pulled or started.
    Starting,
    /// The scheduler cannot place it; its message.
    Unschedulable(String),
    /// Held by scheduling gates (a queue such as Kueue has not admitted it); its message.
    Gated(String),
    /// A container cannot start: the kubelet's reason (`ImagePullBackOff`, `ErrImagePull`,
    /// `InvalidImageName`, `CreateContainerConfigError` for a missing Secret or ConfigMap key,
    /// `CreateContainerError`) and its message.
    Blocked {
        /// The kubelet's reason.
        reason: String,
        /// What it said, with the container's name.
        message: String,
    },
}

/// Why a trainer pod cannot start that will not clear by itself (the label values of
/// `finetune_operator_blocked_jobs`): the kubelet's container waiting reasons, and
/// [`FAILED_MOUNT`].
pub const BLOCKING_WAIT_REASONS: [&str; 6] = [
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    FAILED_MOUNT,
];

/// The kubelet's event reason for a volume it cannot set up. The pod itself only says
/// `ContainerCreating`, so the operator finds the cause by reading the ConfigMaps the pod's
/// volumes name ([`required_config_maps`], [`mount_problem`]).
pub const FAILED_MOUNT: &str = "FailedMount";

/// A ConfigMap a pod's volume needs (not marked optional): the kubelet cannot set the volume
/// up while the ConfigMap, or one of the keys the volume projects, is missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequiredConfigMap {
    /// The pod's volume.
    pub volume: String,
    /// The ConfigMap, in the pod's namespace.
    pub name: String,
    /// The keys the volume projects (`items`); empty when it projects every key.
    pub keys: Vec<String>,
}

/// The ConfigMaps `pod`'s volumes need, in volume order.
pub fn required_config_maps(pod: &Pod) -> Vec<RequiredConfigMap> {
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    volumes
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let cm = v.config_map.as_ref().filter(|c| c.optional != Some(true))?;
            Some(RequiredConfigMap {
                volume: v.name.clone(),
                name: cm.name.clone(),
                keys: cm.items.iter().flatten().map(|i| i.key.clone()).collect(),
            })
        })
        .collect()
}

/// What keeps the kubelet from setting up `required`'s volume, given the ConfigMap found under
/// its name (`None`: there is none), in the kubelet's words; `None` when nothing does.
pub fn mount_problem(
    required: &RequiredConfigMap,
    found: Option<&k8s_openapi::api::core::v1::ConfigMap>,
) -> Option<String> {
    let volume = &required.volume;
    let Some(cm) = found else {
        return Some(format!(
            "MountVolume.SetUp failed for volume \"{volume}\": configmap \"{}\" not found",
            required.name
        ));
    };
    let has = |key: &str| {
        cm.data.as_ref().is_some_and(|d| d.contains_key(key))
            || cm.binary_data.as_ref().is_some_and(|d| d.contains_key(key))
    };
    let missing: Vec<&str> = required
        .keys
        .iter()
        .map(String::as_str)
        .filter(|k| !has(k))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "MountVolume.SetUp failed for volume \"{volume}\": configmap \"{}\" has no key {}",
            required.name,
            missing.join(", ")
        )
    })
}

/// How a trainer pod ended, or where it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodOutcome {
    /// Not yet running, and why.
    Pending(Waiting),
    /// Running.
    Running,
    /// Exited 0; the termination message (the final progress document).
    Succeeded(String),
    /// Failed in a way that counts against `backoffLimit`.
    Failed(Failure),
    /// Ended by an eviction, preemption or node loss: retried without counting.
    Disrupted(String),
}

/// A counted failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Short CamelCase reason (`OOMKilled`, `Error`, ...).
    pub reason: String,
    /// Human-readable message with a hint where one helps.
    pub message: String,
}

/// The pod's scheduling gates, each with what it waits for where the operator knows it.
fn gate_names(pod: &Pod) -> Vec<String> {
    let gates = pod.spec.as_ref().and_then(|s| s.scheduling_gates.as_ref());
    gates
        .into_iter()
        .flatten()
        .map(|g| match g.name.as_str() {
            KUEUE_ADMISSION_GATE => format!(
                "{KUEUE_ADMISSION_GATE} (Kueue admits the pod when its queue's quota allows)"
            ),
            other => other.to_string(),
        })
        .collect()
}

/// The scheduling gate Kueue's plain-Pod integration holds a queued pod at until it admits it.
pub const KUEUE_ADMISSION_GATE: &str = "kueue.x-k8s.io/admission";

/// Classifies a trainer pod.
pub fn classify(pod: &Pod) -> PodOutcome {
    let Some(status) = pod.status.as_ref() else {
        return PodOutcome::Pending(Waiting::Starting);
    };
    let pod_reason = status.reason.clone().unwrap_or_default();
    let disrupted = matches!(
        pod_reason.as_str(),
        "Evicted" | "Preempting" | "Preempted" | "NodeLost" | "Terminated"
    ) || status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "DisruptionTarget" && c.status == "True");
    let trainer = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == TRAINER_CONTAINER);
    let terminated = trainer
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    // A pod that is being deleted ended because of the deletion (the kubelet's SIGTERM, which
    // the trainer answers with a checkpoint), not because the trainer failed.
    let deleted = pod.metadata.deletion_timestamp.is_some();
    match status.phase.as_deref() {
        Some("Succeeded") => PodOutcome::Succeeded(
            terminated
                .and_then(|t| t.message.clone())
                .unwrap_or_default(),
        ),
        Some("Failed") if disrupted => PodOutcome::Disrupted(format!(
            "{pod_reason}: {}",
            status.message.clone().unwrap_or_default()
        )),
        Some("Failed") if deleted => PodOutcome::Disrupted(format!(
            "the trainer pod was deleted and stopped on SIGTERM ({})",
            failure(pod).message
        )),
        Some("Failed") => PodOutcome::Failed(failure(pod)),
        Some("Running") => PodOutcome::Running,
        _ => PodOutcome::Pending(waiting(pod, status)),
    }
}

/// Why a pending pod waits: the scheduler's verdict, its gates, or a container the kubelet
/// cannot start (init containers first, as they run first).
fn waiting(pod: &Pod, status: &k8s_openapi::api::core::v1::PodStatus) -> Waiting {
    let scheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False");
    if let Some(c) = scheduled {
        let message = c.message.clone();
        match c.reason.as_deref() {
            Some("Unschedulable") => {
                return Waiting::Unschedulable(
                    message.unwrap_or_else(|| "no node fits the pod".into()),
                );
            }
            Some("SchedulingGated") => {
                let message = message.unwrap_or_else(|| "the pod has scheduling gates".into());
                return Waiting::Gated(match gate_names(pod) {
                    gates if gates.is_empty() => message,
                    gates => format!("{message}: {}", gates.join(", ")),
                });
            }
            _ => {}
        }
    }
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for c in containers {
        let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        if let Some(reason) = w
            .reason
            .as_deref()
            .filter(|r| BLOCKING_WAIT_REASONS.contains(r))
        {
            return Waiting::Blocked {
                reason: reason.to_string(),
                message: format!(
                    "container {}: {}",
                    c.name,
                    w.message.clone().unwrap_or_default()
                ),
            };
        }
    }
    Waiting::Starting
}

fn failure(pod: &Pod) -> Failure {
    let status = pod.status.as_ref();
    let all = status.iter().flat_map(|s| {
        s.init_container_statuses
            .iter()
            .flatten()
            .chain(s.container_statuses.iter().flatten())
    });
    for c in all {
        let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref()) else {
            if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref())
                && let Some(reason) = &w.reason
            {
                return Failure {
                    reason: reason.clone(),
                    message: format!(
                        "container {}: {}",
                        c.name,
                        w.message.clone().unwrap_or_default()
                    ),
                };
            }
            continue;
        };
        if t.exit_code == 0 {
            continue;
        }
        let reason = t.reason.clone().unwrap_or_else(|| "Error".into());
        let detail: String = t
            .message
            .clone()
            .unwrap_or_default()
            .chars()
            .take(600)
            .collect();
        if reason == "OOMKilled" || t.exit_code == 137 && reason != "Error" {
            return Failure {
                reason: "OOMKilled".into(),
                message: format!(
                    "container {} was killed for exceeding its memory limit (exit {}). Hint: lower \
                     hyperparameters.batchSize or maxSequenceLength, use method.type: lora, train \
                     fewer layers, or raise resources.memory. {detail}",
                    c.name, t.exit_code
                ),
            };
        }
        return Failure {
            reason,
            message: format!(
                "container {} exited with code {}: {detail}",
                c.name, t.exit_code
            ),
        };
    }
    Failure {
        reason: "Failed".into(),
        message: status
            .and_then(|s| s.message.clone())
            .unwrap_or_else(|| "pod failed".into()),
    }
}

/// The delay before attempt `restarts + 1`: `base × 2^(restarts-1)`, capped at `max`.
pub fn backoff(restarts: u32, base: Duration, max: Duration) -> Duration {
    if restarts == 0 {
        return Duration::ZERO;
    }
    let factor = 2u32.saturating_pow(restarts.saturating_sub(1).min(20));
    base.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let base = Duration::from_secs(10);
        let max = Duration::from_secs(300);
        assert_eq!(backoff(0, base, max), Duration::ZERO);
        assert_eq!(backoff(1, base, max), Duration::from_secs(10));
        assert_eq!(backoff(3, base, max), Duration::from_secs(40));
        assert_eq!(backoff(30, base, max), max);
    }

    #[test]
    fn oom_kill_is_named_with_a_hint() {
        let p = pod(include_str!("../tests/fixtures/pod-oomkilled.yaml"));
        match classify(&p) {
            PodOutcome::Failed(f) => {
                assert_eq!(f.reason, "OOMKilled");
                assert!(f.message.contains("batchSize"), "{}", f.message);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn eviction_is_a_disruption() {
        let p = pod(include_str!("../tests/fixtures/pod-evicted.yaml"));
        assert!(
            matches!(classify(&p), PodOutcome::Disrupted(_)),
            "{:?}",
            classify(&p)
        );
    }

    #[test]
    fn a_deleted_pod_that_stopped_on_sigterm_is_a_disruption_not_a_failure() {
        let p = pod(include_str!("../tests/fixtures/pod-deleted-sigterm.yaml"));
        match classify(&p) {
            PodOutcome::Disrupted(m) => assert!(m.contains("deleted") && m.contains("143"), "{m}"),
            other => panic!("{other:?}"),
        }
        // The same pod, not being deleted: the exit is the trainer's own failure.
        let mut kept = p.clone();
        kept.metadata.deletion_timestamp = None;
        assert!(matches!(classify(&kept), PodOutcome::Failed(_)));
    }

    #[test]
    fn unschedulable_carries_the_scheduler_message() {
        let p = pod(include_str!("../tests/fixtures/pod-unschedulable.yaml"));
        match classify(&p) {
            PodOutcome::Pending(Waiting::Unschedulable(m)) => {
                assert!(m.contains("Insufficient nvidia.com/gpu"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_missing_config_map_or_key_is_a_mount_problem_and_optional_ones_are_not_required() {
        let p = pod(include_str!("../tests/fixtures/pod-failed-mount.yaml"));
        let required = required_config_maps(&p);
        let names: Vec<(&str, &str)> = required
            .iter()
            .map(|r| (r.volume.as_str(), r.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [("config", "demo-config"), ("dataset", "reviews")],
            "the optional volume is not required"
        );
        let dataset = &required[1];
        assert_eq!(dataset.keys, ["data.csv"]);
        let missing = mount_problem(dataset, None).unwrap_or_default();
        assert!(
            missing.contains("volume \"dataset\"") && missing.contains("\"reviews\" not found"),
            "{missing}"
        );
        let wrong_key: k8s_openapi::api::core::v1::ConfigMap =
            serde_yaml::from_str("{metadata: {name: reviews}, data: {train.csv: x}}")
                .unwrap_or_else(|e| panic!("{e}"));
        let no_key = mount_problem(dataset, Some(&wrong_key)).unwrap_or_default();
        assert!(no_key.contains("has no key data.csv"), "{no_key}");
        let right: k8s_openapi::api::core::v1::ConfigMap =
            serde_yaml::from_str("{metadata: {name: reviews}, binaryData: {data.csv: eA==}}")
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mount_problem(dataset, Some(&right)), None);
        // The pod itself only says ContainerCreating: nothing blocks it by its status alone.
        assert_eq!(classify(&p), PodOutcome::Pending(Waiting::Starting));
    }

    #[test]
    fn exit_code_is_reported() {
        let p = pod(include_str!("../tests/fixtures/pod-error.yaml"));
        match classify(&p) {
            PodOutcome::Failed(f) => {
                assert_eq!(f.reason, "Error");
                assert!(f.message.contains("exited with code 3"), "{}", f.message);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn success_keeps_the_termination_message() {
        let p = pod(include_str!("../tests/fixtures/pod-succeeded.yaml"));
        match classify(&p) {
            PodOutcome::Succeeded(m) => assert!(m.contains("\"phase\":\"done\""), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
