//! The hostile corpus (crds/tests/hostile/corpus.rs) against the offline layers: every case
//! must be refused by `validate_document` (CRD schema with unknown fields refused, decoding,
//! `validate()`) or, for a change of an immutable field, by `validate_update`, with the field
//! path of the problem. The same corpus runs against the real API server in
//! tests/tests/security.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "hostile/corpus.rs"]
mod corpus;

use std::collections::BTreeMap;

use corpus::{base, corpus, names_path};
use finetune_api::{FineTuneJob, validate, validate_document, validate_update};

/// Which offline check refused a case, and whether it named the expected path.
fn offline(case: &corpus::Case) -> (Option<&'static str>, bool, String) {
    if let Some(before) = &case.before {
        let old: FineTuneJob = serde_json::from_value(before.clone()).unwrap();
        let new: FineTuneJob = match serde_json::from_value(case.doc.clone()) {
            Ok(j) => j,
            Err(e) => return (Some("decode"), false, e.to_string()),
        };
        return match validate_update(&old.spec, &new.spec) {
            Ok(()) => (None, false, String::new()),
            Err(errs) => (
                Some("validate_update"),
                errs.iter().any(|e| names_path(&e.path, &case.path)),
                format!("{errs:?}"),
            ),
        };
    }
    match validate_document(&case.doc) {
        Ok(_) => (None, false, String::new()),
        Err(errs) => {
            // Which part refused it: the schema mirror, or validate() on the decoded spec.
            let by_validate = serde_json::from_value::<FineTuneJob>(case.doc.clone())
                .ok()
                .is_some_and(|j| validate(&j.spec).is_err());
            (
                Some(if by_validate { "validate()" } else { "schema" }),
                errs.iter().any(|e| names_path(&e.path, &case.path)),
                format!("{:?}", errs.iter().take(3).collect::<Vec<_>>()),
            )
        }
    }
}

#[test]
fn every_hostile_case_is_refused_offline_with_its_field_path() {
    let base_doc = base();
    assert!(
        validate_document(&base_doc).is_ok(),
        "the base must be valid"
    );
    let cases = corpus();
    assert!(cases.len() >= 100, "only {} cases", cases.len());
    let mut names = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    let mut by_layer: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_family: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for case in &cases {
        assert!(
            names.insert(case.name.clone()),
            "duplicate case {}",
            case.name
        );
        let (layer, named, detail) = offline(case);
        let fam = by_family.entry(case.family).or_default();
        fam.0 += 1;
        match layer {
            None => failures.push(format!("ACCEPTED {}: {}", case.name, case.path)),
            Some(l) if !named => failures.push(format!(
                "{}: refused by {l} without naming {}: {detail}",
                case.name, case.path
            )),
            Some(l) => {
                *by_layer.entry(l).or_default() += 1;
                fam.1 += 1;
            }
        }
    }
    let refused: usize = by_layer.values().sum();
    eprintln!(
        "hostile corpus, offline: {refused}/{} refused with the field path; by layer {by_layer:?}",
        cases.len()
    );
    for (family, (total, ok)) in &by_family {
        eprintln!("  {family}: {ok}/{total}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn immutable_rule_allows_only_the_lifecycle_fields() {
    let old: FineTuneJob = serde_json::from_value(base()).unwrap();
    let mut new = old.clone();
    new.spec.suspend = true;
    new.spec.backoff_limit = 9;
    new.spec.active_deadline_seconds = Some(60);
    new.spec.ttl_seconds_after_finished = Some(5);
    assert_eq!(validate_update(&old.spec, &new.spec), Ok(()));
    new.spec.hyperparameters.learning_rate = 0.5;
    new.spec
        .dataset
        .cleaning
        .allowed_labels
        .push("Neutral".into());
    let errs = validate_update(&old.spec, &new.spec).unwrap_err();
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.dataset.cleaning.allowedLabels",
            "spec.hyperparameters.learningRate"
        ]
    );
    assert!(errs[0].message.contains("immutable"));
}
