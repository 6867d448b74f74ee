//! Names and labels of the objects a FineTuneJob owns.

use std::collections::BTreeMap;

use finetune_api::JOB_LABEL;
use sha2::{Digest, Sha256};

/// Label carrying the attempt number of a trainer pod (0 for the first).
pub const ATTEMPT_LABEL: &str = "finetune.dev/attempt";
/// Label carrying the node rank of a gang's trainer pod (`PET_NODE_RANK`; absent on the pod of
/// a job of one pod).
pub const RANK_LABEL: &str = "finetune.dev/rank";
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

/// The metrics Service of the trainer pod. Service names are DNS-1035 labels (a letter first,
/// no dots), stricter than job names: `70b-chat` or `team.v2` become `j-70b-chat-<hash>` and
/// `team-v2-<hash>` (the hash keeps `a.b` and `a-b` apart).
pub fn metrics_service(job: &str) -> String {
    bounded(&dns_label_base(job), "metrics")
}

/// `job` as the start of a DNS-1035 label: as it is when it already fits (a letter first, no
/// dots), else dashed, prefixed and suffixed with a hash of the whole.
fn dns_label_base(job: &str) -> String {
    let dashed = job.replace('.', "-");
    if dashed == job && job.starts_with(|c: char| c.is_ascii_lowercase()) {
        return job.to_string();
    }
    let prefix = if dashed.starts_with(|c: char| c.is_ascii_lowercase()) {
        ""
    } else {
        "j-"
    };
    format!("{prefix}{dashed}-{}", &short_hash(job.as_bytes())[..6])
}

/// The value of the `finetune.dev/job` label for a job: its name, or (over 63 characters, the
/// limit of a label value) a cut of it with a hash of the whole, so selectors stay unique.
pub fn label_value(job: &str) -> String {
    if job.len() <= 63 {
        return job.to_string();
    }
    let hash = short_hash(job.as_bytes());
    let cut: String = job.chars().take(63 - hash.len() - 1).collect();
    format!("{}-{hash}", cut.trim_end_matches(['-', '.']))
}

/// The NetworkPolicy of the job's trainer pods.
pub fn network_policy(job: &str) -> String {
    bounded(job, "trainer-network")
}

/// The PodGroup of a gang-scheduled job (one for every attempt; also a label value).
pub fn pod_group(job: &str) -> String {
    bounded(job, "gang")
}

/// The trainer pod of one attempt (of a job of one pod; a gang's pods are [`gang_pod`]).
pub fn trainer_pod(job: &str, attempt: u32) -> String {
    bounded(job, &format!("trainer-{attempt}"))
}

/// The trainer pod of node rank `rank` of one attempt of a gang (a job of several pods).
pub fn gang_pod(job: &str, attempt: u32, rank: u32) -> String {
    bounded(job, &format!("trainer-{attempt}-{rank}"))
}

/// The host name of a gang's pod (a DNS label even where the job's name has dots), under which
/// it resolves as `<hostname>.<metrics service>` (the pod's `subdomain`).
pub fn gang_hostname(job: &str, attempt: u32, rank: u32) -> String {
    bounded(&dns_label_base(job), &format!("trainer-{attempt}-{rank}"))
}

/// Labels every child carries.
pub fn common_labels(job: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (JOB_LABEL.to_string(), label_value(job)),
        (
            "app.kubernetes.io/name".to_string(),
            "finetune-trainer".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), label_value(job)),
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
        (JOB_LABEL.to_string(), label_value(job)),
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

    fn is_dns1035(s: &str) -> bool {
        s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    }

    #[test]
    fn every_valid_job_name_gives_a_valid_service_name_and_label() {
        let long = format!("{}.x", "a".repeat(250));
        for job in ["demo", "70b-chat", "team.v2", "a.b", "a-b", long.as_str()] {
            let svc = metrics_service(job);
            assert!(is_dns1035(&svc), "{job} -> {svc}");
            let label = label_value(job);
            assert!(label.len() <= 63, "{job} -> {label}");
            assert!(!label.ends_with(['-', '.']), "{label}");
        }
        for job in ["demo", "70b-chat", "team.v2", long.as_str()] {
            let host = gang_hostname(job, 12, 63);
            assert!(is_dns1035(&host), "{job} -> {host}");
            assert!(gang_pod(job, 12, 63).len() <= 63);
        }
        assert_eq!(gang_pod("demo", 1, 0), "demo-trainer-1-0");
        assert_eq!(gang_hostname("demo", 1, 0), "demo-trainer-1-0");
        assert_ne!(gang_hostname("a.b", 0, 0), gang_hostname("a-b", 0, 0));
        assert_eq!(metrics_service("demo"), "demo-metrics");
        assert_ne!(metrics_service("a.b"), metrics_service("a-b"));
        assert_eq!(label_value("demo"), "demo");
        assert_ne!(label_value(&"a".repeat(70)), label_value(&"a".repeat(71)));
    }
}
