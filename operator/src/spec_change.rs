//! The rule for spec changes after a job started: only `suspend`, `backoffLimit`,
//! `activeDeadlineSeconds` and `ttlSecondsAfterFinished` may change. Any other change is refused
//! with an `InvalidSpec` condition (reason `ImmutableFieldChanged`) and the running generation
//! continues with the spec it started with, which the trainer ConfigMap records by hash.

use finetune_api::FineTuneJobSpec;
use sha2::{Digest, Sha256};

/// Fields that may change while a job runs.
pub const MUTABLE_FIELDS: [&str; 4] = [
    "suspend",
    "backoffLimit",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
];

/// First 10 hex digits of the SHA-256 of `bytes`.
pub fn short_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// Hash of the parts of a spec that may not change once the job started.
pub fn immutable_hash(spec: &FineTuneJobSpec) -> String {
    let mut value = serde_json::to_value(spec).unwrap_or_default();
    if let Some(obj) = value.as_object_mut() {
        for field in MUTABLE_FIELDS {
            obj.remove(field);
        }
    }
    short_hash(value.to_string().as_bytes())
}

/// The top-level spec sections that differ between two specs (for the condition message).
pub fn changed_sections(old: &FineTuneJobSpec, new: &FineTuneJobSpec) -> Vec<String> {
    let (a, b) = (serde_json::to_value(old), serde_json::to_value(new));
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (a, b) else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !MUTABLE_FIELDS.contains(&k.as_str()) && a.get(*k) != b.get(*k))
        .map(|k| format!("spec.{k}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lifecycle_fields_are_mutable() {
        let a = FineTuneJobSpec::default();
        let mut b = a.clone();
        b.suspend = true;
        b.backoff_limit = 9;
        b.active_deadline_seconds = Some(60);
        b.ttl_seconds_after_finished = Some(5);
        assert_eq!(immutable_hash(&a), immutable_hash(&b));
        assert!(changed_sections(&a, &b).is_empty());
        b.hyperparameters.learning_rate = 0.5;
        assert_ne!(immutable_hash(&a), immutable_hash(&b));
        assert_eq!(
            changed_sections(&a, &b),
            vec!["spec.hyperparameters".to_string()]
        );
    }
}
