//! The CRD's CEL rules (`x-kubernetes-validations`), evaluated by a real CEL evaluator (kube-cel,
//! the kube-rs project's port of the API server's CEL libraries) against the committed
//! `crds/finetunejob.yaml`: the 1.20 API server of the e2e tests drops these rules, so this is
//! where they are proven. Each cross-field rule refuses its fixture exactly where `validate()`
//! does, the samples pass every rule, and a started job's spec changes only where
//! `validate_update` allows it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{L7B, TINY, base, with};
use finetune_api::cel::{self, CROSS_FIELD_RULES, CelRule};
use finetune_api::{FineTuneJob, validate, validate_update};
use kube_cel::{ScopeContext, WarningKind, analyze_rule, compile_schema};
use serde_json::{Value, json};

/// The `openAPIV3Schema` of the committed CRD (what users install, not what the types derive).
fn shipped_schema() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("finetunejob.yaml");
    let crd: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_json::to_value(crd).unwrap()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The messages of the rules that refuse `doc` (created when `old` is None, else updated).
fn cel_refusals(doc: &Value, old: Option<&Value>) -> Vec<String> {
    match kube_cel::validate(&shipped_schema(), doc, old) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.message.clone()).collect(),
    }
}

fn validate_paths(doc: &Value) -> Vec<String> {
    let job: FineTuneJob = serde_json::from_value(doc.clone()).unwrap();
    validate(&job.spec)
        .err()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.path)
        .collect()
}

/// One document per cross-field rule that breaks that rule and no other CEL rule.
fn fixtures() -> Vec<(CelRule, Value)> {
    let pvc_model = with(base(L7B), "/model/source", json!("pvc://models/l7b"));
    let full = json!({"type": "full"});
    let completion = json!({"prompt": "Question", "completion": "Answer"});
    vec![
        (
            cel::MODEL_TOKEN_NEEDS_HUB,
            with(
                pvc_model,
                "/model/tokenSecretRef",
                json!({"name": "hf-token", "key": "token"}),
            ),
        ),
        (
            cel::DATASET_CREDENTIALS_NEED_HTTPS,
            with(
                base(L7B),
                "/dataset/credentialsSecretRef",
                json!({"name": "ds", "key": "token"}),
            ),
        ),
        (
            cel::DATASET_ONE_SHAPE,
            with(
                with(
                    base(TINY),
                    "/dataset/columns",
                    json!({"text": "ReviewText"}),
                ),
                "/dataset/cleaning/allowedLabels",
                Value::Null,
            ),
        ),
        (
            cel::CHAT_NEEDS_JSONL,
            with(
                with(
                    base(TINY),
                    "/dataset/columns",
                    json!({"messages": "messages"}),
                ),
                "/dataset/cleaning/allowedLabels",
                Value::Null,
            ),
        ),
        (
            cel::ALLOWED_LABELS_NEED_CLASSIFICATION,
            with(base(TINY), "/dataset/columns", completion.clone()),
        ),
        (
            cel::CLEANING_MIN_NOT_ABOVE_MAX,
            with(base(TINY), "/dataset/cleaning/minChars", json!(700)),
        ),
        (
            cel::LORA_SETTINGS_NEED_LORA,
            with(base(TINY), "/method/type", json!("full")),
        ),
        (
            cel::LORA_MODULES_UNIQUE,
            with(
                base(TINY),
                "/method/lora/targetModules",
                json!(["q_proj", "v_proj", "q_proj"]),
            ),
        ),
        (
            cel::TRAINABLE_LAYERS_ONE_WAY,
            with(
                base(TINY),
                "/method/trainableLayers",
                json!({"last": 1, "indices": [0]}),
            ),
        ),
        (
            cel::TRAINABLE_INDICES_UNIQUE,
            with(
                base(TINY),
                "/method/trainableLayers",
                json!({"indices": [0, 1, 0]}),
            ),
        ),
        (
            cel::WARMUP_BELOW_MAX_STEPS,
            with(base(TINY), "/hyperparameters/warmupSteps", json!(10_000)),
        ),
        (
            cel::EVALUATION_WITHIN_MAX_STEPS,
            with(base(TINY), "/evaluation/intervalSteps", json!(100_000)),
        ),
        (
            cel::TEST_SET_NEEDS_CLASSIFICATION,
            with(
                with(
                    with(base(TINY), "/dataset/columns", completion),
                    "/dataset/cleaning/allowedLabels",
                    Value::Null,
                ),
                "/evaluation/testSet",
                json!({"source": "configmap://reviews/test.csv"}),
            ),
        ),
        (
            cel::MERGE_NEEDS_LORA,
            with(
                with(base(TINY), "/method", full),
                "/output/mergeWeights",
                json!(true),
            ),
        ),
        (
            cel::EXISTING_CLAIM_ALONE,
            with(
                base(TINY),
                "/checkpoints/storage",
                json!({"existingClaim": "ckpt", "size": "10Gi"}),
            ),
        ),
    ]
}

#[test]
fn every_cross_field_rule_refuses_its_fixture_where_validate_does() {
    let fixtures = fixtures();
    for rule in CROSS_FIELD_RULES {
        assert!(
            fixtures.iter().any(|(r, _)| *r == rule),
            "{}: no fixture",
            rule.field
        );
    }
    for (rule, doc) in &fixtures {
        assert_eq!(
            cel_refusals(doc, None),
            [rule.message],
            "{}: the CEL rules refuse this fixture for this rule only",
            rule.field
        );
        let paths = validate_paths(doc);
        assert!(
            paths.iter().any(|p| p == rule.field),
            "{}: validate() refuses the same fixture there, not only at {paths:?}",
            rule.field
        );
    }
}

#[test]
fn every_sample_passes_every_rule() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/samples");
    let mut docs: Vec<(String, Value)> = common::sample_files(&dir)
        .into_iter()
        .map(|path| {
            let yaml: serde_yaml::Value =
                serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            (
                path.display().to_string(),
                serde_json::to_value(yaml).unwrap(),
            )
        })
        .collect();
    docs.push((TINY.into(), base(TINY)));
    assert!(docs.len() >= 5, "the samples and the fixture");
    for (name, doc) in docs {
        assert_eq!(cel_refusals(&doc, None), Vec::<String>::new(), "{name}");
    }
}

#[test]
fn every_rule_compiles_in_scope_and_within_the_cost_budget() {
    let schema = shipped_schema();
    let mut rules = Vec::new();
    collect_rules(&schema, "", &mut rules);
    assert_eq!(
        rules.len(),
        CROSS_FIELD_RULES.len() + 1,
        "the cross-field rules and the immutability rule: {rules:?}"
    );
    for (path, node, rule) in rules {
        let compiled = compile_schema(node);
        assert!(!compiled.has_errors(), "{path}: {rule}");
        let trouble: Vec<_> = analyze_rule(&rule, &compiled, ScopeContext::CrdValidation)
            .into_iter()
            .filter(|w| w.kind != WarningKind::MissingBounds && !comprehension_variable(w))
            .collect();
        assert!(trouble.is_empty(), "{path}: {trouble:?}");
    }
}

/// The analyser's scope check does not know the variables a macro binds (`all(m, ...)`).
fn comprehension_variable(w: &kube_cel::AnalysisWarning) -> bool {
    let variable = w.message.split('\'').nth(1).unwrap_or_default();
    w.kind == WarningKind::WrongScope
        && [".all(", ".exists(", ".filter(", ".map("]
            .iter()
            .any(|m| w.rule.contains(&format!("{m}{variable},")))
}

fn collect_rules<'a>(node: &'a Value, path: &str, out: &mut Vec<(String, &'a Value, String)>) {
    for r in node["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push((path.into(), node, r["rule"].as_str().unwrap().into()));
    }
    for (key, child) in node["properties"].as_object().into_iter().flatten() {
        collect_rules(child, &format!("{path}.{key}"), out);
    }
    if let Some(items) = node.get("items") {
        collect_rules(items, &format!("{path}[]"), out);
    }
}

/// A job as the API server stores it once the operator started it.
fn started(doc: Value) -> Value {
    let mut doc = doc;
    doc["metadata"]["generation"] = json!(1);
    doc["status"] = json!({"phase": "Running", "acceptedGeneration": 1});
    doc
}

fn spec_of(doc: &Value) -> finetune_api::FineTuneJobSpec {
    serde_json::from_value::<FineTuneJob>(doc.clone())
        .unwrap()
        .spec
}

#[test]
fn a_started_jobs_spec_changes_only_where_validate_update_allows() {
    let (immutability, _) =
        finetune_api::mutability::immutability_rule(&shipped_schema()["properties"]["spec"]);
    let refused = |old: &Value, new: &Value| {
        let messages = cel_refusals(new, Some(old));
        let operator = validate_update(&spec_of(old), &spec_of(new)).is_err();
        assert!(messages.len() <= 1, "{messages:?}");
        let cel = !messages.is_empty();
        assert_eq!(
            cel, operator,
            "the CRD and the operator agree: {messages:?}"
        );
        if cel {
            assert!(messages[0].contains("immutable"), "{messages:?}");
        }
        cel
    };
    assert!(immutability.contains("oldSelf.status.acceptedGeneration"));
    let old = started(base(TINY));
    // The lifecycle fields may change.
    for (pointer, value) in [
        ("/suspend", json!(true)),
        ("/backoffLimit", json!(9)),
        ("/activeDeadlineSeconds", json!(3600)),
        ("/ttlSecondsAfterFinished", json!(60)),
    ] {
        assert!(
            !refused(&old, &with(old.clone(), pointer, value)),
            "{pointer}"
        );
    }
    // A status update (the spec as it was) passes.
    let mut status_update = old.clone();
    status_update["status"]["phase"] = json!("Succeeded");
    assert!(!refused(&old, &status_update));
    // Anything else may not: a value, a whole section added or removed, a list item.
    for (pointer, value) in [
        ("/hyperparameters/learningRate", json!(0.5)),
        ("/dataset/source", json!("configmap://other/reviews.csv")),
        ("/trainerPod", json!({"labels": {"team": "ml"}})),
        ("/evaluation", Value::Null),
        ("/method/lora/targetModules", json!(["q_proj"])),
        ("/resources/gpus", json!(1)),
    ] {
        assert!(
            refused(&old, &with(old.clone(), pointer, value)),
            "{pointer}"
        );
    }
    // Before the operator accepted it (no acceptedGeneration), the spec may still be corrected.
    let mut pending = old.clone();
    pending["status"] = json!({"phase": "Failed"});
    let corrected = with(
        pending.clone(),
        "/hyperparameters/learningRate",
        json!(0.001),
    );
    assert_eq!(
        cel_refusals(&corrected, Some(&pending)),
        Vec::<String>::new()
    );
    let mut unsaved = old.clone();
    unsaved.as_object_mut().unwrap().remove("status");
    let corrected = with(unsaved.clone(), "/dataset/seed", json!(1));
    assert_eq!(
        cel_refusals(&corrected, Some(&unsaved)),
        Vec::<String>::new()
    );
}
