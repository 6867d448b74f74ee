//! Names and labels of the objects a FineTuneJob owns.

use std::collections::BTreeMap;

use finetune_api::JOB_LABEL;
use sha2::{Digest, Sha256};

/// Label carrying the attempt number of a trainer pod (0 for the first).
pub const ATTEMPT_LABEL: &str = "finetune.dev/attempt";
/// Annotation on the trainer ConfigMap holding the hash of the spec it was rendered from.
pub const SPEC_HASH_ANNOTATION: &str = "finetune.dev/spec-hash";
/// Name of the trainer container.
pub const TRAINER_CONTAINER: &str = "trainer";

/// First 10 hex digits of the SHA-256 of `bytes`.
pub fn short_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// Kubernetes names are at most 63 characters where they become labels or DNS names; long job
/// names are cut and suffixed with a short hash so children stay unique.
fn bounded(base: &str, suffix: &str) -> String {
    let full = format!("{base}-{suffix}");
    if full.len() <= 63 {
        return full;
    }
    let hash = short_hash(base.as_bytes());
    let keep = 63 - suffix.len() - hash.len() - 2;
    let cut: String = base.chars().take(keep).collect();
    format!("{}-{hash}-{suffix}", cut.trim_end_matches('-'))
}

/// The trainer ConfigMap.
pub fn config_map(job: &str) -> String {
    bounded(job, "trainer-config")
}

/// The checkpoint PVC the operator creates.
pub fn checkpoint_claim(job: &str) -> String {
    bounded(job, "checkpoints")
}

/// The metrics Service of the trainer pod.
pub fn metrics_service(job: &str) -> String {
    bounded(job, "metrics")
}

/// The NetworkPolicy of the job's trainer pods.
pub fn network_policy(job: &str) -> String {
    bounded(job, "trainer-network")
}

/// The trainer pod of one attempt.
pub fn trainer_pod(job: &str, attempt: u32) -> String {
    bounded(job, &format!("trainer-{attempt}"))
}

/// Labels every child carries.
pub fn common_labels(job: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (JOB_LABEL.to_string(), job.to_string()),
        (
            "app.kubernetes.io/name".to_string(),
            "finetune-trainer".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), job.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "finetune-operator".to_string(),
        ),
        (
            "app.kubernetes.io/part-of".to_string(),
            "finetune-operator".to_string(),
        ),
    ])
}

/// Labels of a trainer pod (selects it from the metrics Service).
pub fn trainer_selector(job: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (JOB_LABEL.to_string(), job.to_string()),
        (
            "app.kubernetes.io/component".to_string(),
            "trainer".to_string(),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_stay_short_and_unique() {
        let a = "a".repeat(70);
        let b = format!("{}b", "a".repeat(69));
        assert!(trainer_pod(&a, 12).len() <= 63);
        assert_ne!(trainer_pod(&a, 0), trainer_pod(&b, 0));
        assert_eq!(trainer_pod("demo", 2), "demo-trainer-2");
    }
}
