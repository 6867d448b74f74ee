//! The one rule for spec changes after a job started: only the lifecycle fields
//! ([`MUTABLE_SPEC_FIELDS`]) may change; any other change is refused. API servers from 1.25
//! refuse such an update at admission ([`immutability_rule`], in the CRD); everywhere (the 1.20
//! server of the tests has no CEL) the operator enforces the rule too: it keeps running the spec
//! it started with and reports `ImmutableFieldChanged`. Clients can check an update with
//! [`validate_update`] before sending it.

use std::collections::BTreeSet;

use crate::v1alpha1::FineTuneJobSpec;
use crate::validate::FieldError;

/// Spec fields (their manifest names) that may change after a job started.
pub const MUTABLE_SPEC_FIELDS: [&str; 4] = [
    "suspend",
    "backoffLimit",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
];

/// The mutable fields as prose: "suspend, backoffLimit, activeDeadlineSeconds and
/// ttlSecondsAfterFinished" (for messages; built from [`MUTABLE_SPEC_FIELDS`]).
pub fn mutable_fields_sentence() -> String {
    match MUTABLE_SPEC_FIELDS.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => MUTABLE_SPEC_FIELDS.join(", "),
    }
}

/// The spec as JSON without its mutable fields: what may not change once the job started.
pub fn immutable_part(spec: &FineTuneJobSpec) -> serde_json::Value {
    let mut value = serde_json::to_value(spec).unwrap_or_default();
    if let Some(obj) = value.as_object_mut() {
        for field in MUTABLE_SPEC_FIELDS {
            obj.remove(field);
        }
    }
    value
}

/// The top-level spec sections outside [`MUTABLE_SPEC_FIELDS`] that differ (`spec.dataset`, …);
/// empty when the update is allowed.
pub fn changed_sections(old: &FineTuneJobSpec, new: &FineTuneJobSpec) -> Vec<String> {
    let (serde_json::Value::Object(a), serde_json::Value::Object(b)) =
        (immutable_part(old), immutable_part(new))
    else {
        return Vec::new();
    };
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("spec.{k}"))
        .collect()
}

/// The CRD's CEL rule for this module's one rule, and its message: once `status.acceptedGeneration`
/// is set, every spec property of `spec_schema` outside [`MUTABLE_SPEC_FIELDS`] must equal its old
/// value, and an optional one may be neither added nor removed. A job that has not started (a
/// spec refused as InvalidSpec, a job created suspended) may still change.
pub fn immutability_rule(spec_schema: &serde_json::Value) -> (String, String) {
    let required: BTreeSet<&str> = spec_schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .collect();
    let unchanged: Vec<String> = spec_schema["properties"]
        .as_object()
        .into_iter()
        .flat_map(|props| props.keys())
        .filter(|k| !MUTABLE_SPEC_FIELDS.contains(&k.as_str()))
        .map(|k| {
            if required.contains(k.as_str()) {
                format!("self.spec.{k} == oldSelf.spec.{k}")
            } else {
                format!(
                    "has(self.spec.{k}) == has(oldSelf.spec.{k}) && \
                     (!has(self.spec.{k}) || self.spec.{k} == oldSelf.spec.{k})"
                )
            }
        })
        .collect();
    let rule = format!(
        "!has(oldSelf.status) || !has(oldSelf.status.acceptedGeneration) || ({})",
        unchanged.join(" && ")
    );
    let message = format!(
        "the spec is immutable once the job started (status.acceptedGeneration); only {} may \
         change (create a new job instead)",
        mutable_fields_sentence()
    );
    (rule, message)
}

impl FineTuneJobSpec {
    /// This spec with the mutable fields taken from `newer`: what runs when an update also
    /// changed something immutable (the refused part is dropped, the lifecycle part applies).
    pub fn with_mutable_fields_of(&self, newer: &FineTuneJobSpec) -> FineTuneJobSpec {
        FineTuneJobSpec {
            suspend: newer.suspend,
            backoff_limit: newer.backoff_limit,
            active_deadline_seconds: newer.active_deadline_seconds,
            ttl_seconds_after_finished: newer.ttl_seconds_after_finished,
            ..self.clone()
        }
    }
}

/// Checks a spec update of a job that already started: every changed field outside
/// [`MUTABLE_SPEC_FIELDS`] is an error with its leaf path (`spec.hyperparameters.learningRate`,
/// `spec.evaluation.samplePrompts[1]`). Values are not echoed (they may be large).
pub fn validate_update(
    old: &FineTuneJobSpec,
    new: &FineTuneJobSpec,
) -> Result<(), Vec<FieldError>> {
    let message = format!(
        "is immutable once the job exists; only {} may change (create a new job instead)",
        mutable_fields_sentence()
    );
    let mut errors = Vec::new();
    diff(
        &immutable_part(old),
        &immutable_part(new),
        "spec",
        &message,
        &mut errors,
    );
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn diff(
    a: &serde_json::Value,
    b: &serde_json::Value,
    path: &str,
    message: &str,
    errors: &mut Vec<FieldError>,
) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = Value::Null;
                diff(
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    &format!("{path}.{k}"),
                    message,
                    errors,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff(p, q, &format!("{path}[{i}]"), message, errors);
            }
        }
        (x, y) if x != y => errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn lifecycle_changed(a: &FineTuneJobSpec) -> FineTuneJobSpec {
        let mut b = a.clone();
        b.suspend = !a.suspend;
        b.backoff_limit = a.backoff_limit + 3;
        b.active_deadline_seconds = Some(60);
        b.ttl_seconds_after_finished = Some(5);
        b
    }

    #[test]
    fn only_the_lifecycle_fields_are_mutable() {
        let a = FineTuneJobSpec::default();
        let mut b = lifecycle_changed(&a);
        assert!(changed_sections(&a, &b).is_empty());
        assert!(validate_update(&a, &b).is_ok());
        b.hyperparameters.learning_rate = 0.5;
        assert_eq!(changed_sections(&a, &b), ["spec.hyperparameters"]);
        let errors = validate_update(&a, &b).unwrap_err();
        assert_eq!(errors[0].path, "spec.hyperparameters.learningRate");
        assert!(errors[0].message.contains("ttlSecondsAfterFinished"));
    }

    #[test]
    fn the_mutable_fields_are_spec_keys_and_exactly_what_with_mutable_fields_of_takes() {
        let a = FineTuneJobSpec::default();
        let mut b = lifecycle_changed(&a);
        b.hyperparameters.learning_rate = 0.5;
        let merged = a.with_mutable_fields_of(&b);
        assert_eq!(immutable_part(&merged), immutable_part(&a));
        let (m, b) = (
            serde_json::to_value(&merged).unwrap(),
            serde_json::to_value(&b).unwrap(),
        );
        for field in MUTABLE_SPEC_FIELDS {
            assert!(b.get(field).is_some(), "{field} is not a spec key");
            assert_eq!(m.get(field), b.get(field), "{field}");
        }
    }

    #[test]
    fn the_sentence_names_every_field() {
        assert_eq!(
            mutable_fields_sentence(),
            "suspend, backoffLimit, activeDeadlineSeconds and ttlSecondsAfterFinished"
        );
    }
}
