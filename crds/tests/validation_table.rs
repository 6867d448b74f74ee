//! Table-driven tests of `validate()`: each invalid spec must be refused with the exact field
//! path of the problem.
//!
//! Over 500 lines on purpose: it is a table, one short row per refused field.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{L7B, TINY, base, with};
use finetune_api::{FineTuneJob, validate, warnings};
use serde_json::{Value, json};

#[test]
fn invalid_specs_are_refused_with_the_field_path() {
    for name in [TINY, L7B] {
        let job: FineTuneJob = serde_json::from_value(base(name)).unwrap();
        assert_eq!(validate(&job.spec), Ok(()), "the base {name} must be valid");
        // A gang of pods (one per node) is a valid way to train either.
        let gang: FineTuneJob =
            serde_json::from_value(with(base(name), "/resources/nodes", json!(2))).unwrap();
        assert_eq!(validate(&gang.spec), Ok(()), "{name} on two nodes");
    }
    let cases: Vec<(&str, Value, &str)> = vec![
        // model
        (
            "7B without source",
            with(base(L7B), "/model/source", Value::Null),
            "spec.model.source",
        ),
        (
            "http scheme for a model",
            with(base(L7B), "/model/source", json!("https://x.io/m")),
            "spec.model.source",
        ),
        (
            "hf without org",
            with(base(L7B), "/model/source", json!("hf://llama")),
            "spec.model.source",
        ),
        (
            "pvc path escapes",
            with(base(L7B), "/model/source", json!("pvc://models/../../etc")),
            "spec.model.source",
        ),
        (
            "token without hf",
            with(
                with(base(L7B), "/model/source", json!("pvc://models/l7b")),
                "/model/tokenSecretRef",
                json!({"name": "hf-token", "key": "token"}),
            ),
            "spec.model.tokenSecretRef",
        ),
        (
            "token secret name invalid",
            with(base(L7B), "/model/tokenSecretRef/name", json!("Bad_Name")),
            "spec.model.tokenSecretRef.name",
        ),
        (
            "dataset credentials without https",
            with(
                base(TINY),
                "/dataset/credentialsSecretRef",
                json!({"name": "bucket-token", "key": "token"}),
            ),
            "spec.dataset.credentialsSecretRef",
        ),
        (
            "dataset credentials secret name invalid",
            with(
                with(
                    base(TINY),
                    "/dataset/source",
                    json!("https://data.example.com/r.csv"),
                ),
                "/dataset/credentialsSecretRef",
                json!({"name": "Bad_Name", "key": "token"}),
            ),
            "spec.dataset.credentialsSecretRef.name",
        ),
        // evaluation.testSet
        (
            "plain http test set",
            with(
                base(TINY),
                "/evaluation/testSet",
                json!({"source": "http://example.com/test.csv"}),
            ),
            "spec.evaluation.testSet.source",
        ),
        (
            "test set of a prompt/completion dataset",
            with(
                with(
                    base(TINY),
                    "/dataset/columns",
                    json!({"prompt": "q", "completion": "a"}),
                ),
                "/evaluation/testSet",
                json!({"source": "configmap://held-out/test.csv"}),
            ),
            "spec.evaluation.testSet",
        ),
        (
            "label tokens of a prompt/completion dataset",
            with(
                with(
                    with(
                        base(TINY),
                        "/dataset/columns",
                        json!({"prompt": "q", "completion": "a"}),
                    ),
                    "/method",
                    json!({"type": "lora", "lora": {"trainLabelTokens": true}}),
                ),
                "/dataset/cleaning/allowedLabels",
                json!([]),
            ),
            "spec.method.lora.trainLabelTokens",
        ),
        (
            "full fine-tuning of a quantized base",
            with(
                base(TINY),
                "/method",
                json!({"type": "full", "lora": {"baseQuantization": "int4"}}),
            ),
            "spec.method.lora.baseQuantization",
        ),
        (
            "a KL-to-base penalty on full fine-tuning (no adapters to leave out)",
            with(
                base(TINY),
                "/method",
                json!({"type": "full", "lora": {"klToBase": {"weight": 1.0}}}),
            ),
            "spec.method.lora.klToBase",
        ),
        (
            "a KL-to-base stride of zero",
            with(
                base(TINY),
                "/method",
                json!({"type": "lora", "lora": {"klToBase": {"positionStride": 0}}}),
            ),
            "spec.method.lora.klToBase.positionStride",
        ),
        // dataset
        (
            "plain http dataset",
            with(
                base(TINY),
                "/dataset/source",
                json!("http://example.com/r.csv"),
            ),
            "spec.dataset.source",
        ),
        (
            "absolute pvc path",
            with(
                base(TINY),
                "/dataset/source",
                json!("pvc://data//etc/passwd"),
            ),
            "spec.dataset.source",
        ),
        (
            "NUL in dataset path",
            with(base(TINY), "/dataset/source", json!("pvc://data/a\u{0}b")),
            "spec.dataset.source",
        ),
        (
            "url with credentials",
            with(
                base(TINY),
                "/dataset/source",
                json!("https://u:p@example.com/r.csv"),
            ),
            "spec.dataset.source",
        ),
        (
            "text without label",
            with(base(TINY), "/dataset/columns/label", Value::Null),
            "spec.dataset.columns",
        ),
        (
            "two shapes at once",
            with(base(TINY), "/dataset/columns/prompt", json!("q")),
            "spec.dataset.columns",
        ),
        (
            "chat messages in csv",
            with(
                base(TINY),
                "/dataset/columns",
                json!({"messages": "messages"}),
            ),
            "spec.dataset.columns.messages",
        ),
        (
            "validation split zero",
            with(base(TINY), "/dataset/validationSplit", json!(0.0)),
            "spec.dataset.validationSplit",
        ),
        (
            "validation split too big",
            with(base(TINY), "/dataset/validationSplit", json!(0.9)),
            "spec.dataset.validationSplit",
        ),
        (
            "min above max chars",
            with(base(TINY), "/dataset/cleaning/minChars", json!(1000)),
            "spec.dataset.cleaning.minChars",
        ),
        (
            "one allowed label",
            with(
                base(TINY),
                "/dataset/cleaning/allowedLabels",
                json!(["Positive"]),
            ),
            "spec.dataset.cleaning.allowedLabels",
        ),
        (
            "labels repeat by case",
            with(
                base(TINY),
                "/dataset/cleaning/allowedLabels",
                json!(["Positive", "positive"]),
            ),
            "spec.dataset.cleaning.allowedLabels",
        ),
        // method
        (
            "lora settings with full",
            with(base(TINY), "/method/type", json!("full")),
            "spec.method.lora",
        ),
        (
            "rank above hidden size",
            with(base(TINY), "/method/lora/rank", json!(512)),
            "spec.method.lora.rank",
        ),
        (
            "negative alpha",
            with(base(TINY), "/method/lora/alpha", json!(-1.0)),
            "spec.method.lora.alpha",
        ),
        (
            "dropout of one",
            with(base(TINY), "/method/lora/dropout", json!(1.0)),
            "spec.method.lora.dropout",
        ),
        (
            "no target modules",
            with(base(TINY), "/method/lora/targetModules", json!([])),
            "spec.method.lora.targetModules",
        ),
        (
            "repeated target modules",
            with(
                base(TINY),
                "/method/lora/targetModules",
                json!(["q_proj", "q_proj"]),
            ),
            "spec.method.lora.targetModules",
        ),
        (
            "last and indices",
            with(
                base(TINY),
                "/method/trainableLayers",
                json!({"last": 1, "indices": [0]}),
            ),
            "spec.method.trainableLayers",
        ),
        (
            "more layers than the model",
            with(base(TINY), "/method/trainableLayers", json!({"last": 40})),
            "spec.method.trainableLayers.last",
        ),
        (
            "layer index out of range",
            with(
                base(L7B),
                "/method/trainableLayers",
                json!({"indices": [0, 32]}),
            ),
            "spec.method.trainableLayers.indices[1]",
        ),
        // hyperparameters
        (
            "zero learning rate",
            with(base(TINY), "/hyperparameters/learningRate", json!(0.0)),
            "spec.hyperparameters.learningRate",
        ),
        (
            "warmup eats all steps",
            with(base(TINY), "/hyperparameters/warmupSteps", json!(150)),
            "spec.hyperparameters.warmupSteps",
        ),
        (
            "zero batch",
            with(base(TINY), "/hyperparameters/batchSize", json!(0)),
            "spec.hyperparameters.batchSize",
        ),
        (
            "zero accumulation",
            with(
                base(TINY),
                "/hyperparameters/gradientAccumulationSteps",
                json!(0),
            ),
            "spec.hyperparameters.gradientAccumulationSteps",
        ),
        (
            "sequence beyond positions",
            with(base(L7B), "/hyperparameters/maxSequenceLength", json!(8192)),
            "spec.hyperparameters.maxSequenceLength",
        ),
        (
            "bf16 on cpu",
            with(base(TINY), "/hyperparameters/precision", json!("bf16")),
            "spec.hyperparameters.precision",
        ),
        (
            "weight decay above one",
            with(base(TINY), "/hyperparameters/weightDecay", json!(2.0)),
            "spec.hyperparameters.weightDecay",
        ),
        // evaluation
        (
            "evaluation after the end",
            with(base(TINY), "/evaluation/intervalSteps", json!(1000)),
            "spec.evaluation.intervalSteps",
        ),
        (
            "zero patience",
            with(base(TINY), "/evaluation/earlyStopping/patience", json!(0)),
            "spec.evaluation.earlyStopping.patience",
        ),
        (
            "ratio below one",
            with(base(TINY), "/evaluation/overfitting/maxRatio", json!(0.5)),
            "spec.evaluation.overfitting.maxRatio",
        ),
        (
            "blank sample prompt",
            with(base(TINY), "/evaluation/samplePrompts", json!(["ok", "  "])),
            "spec.evaluation.samplePrompts[1]",
        ),
        (
            "retention over http",
            with(
                base(TINY),
                "/evaluation/retention/source",
                json!("http://x/y.txt"),
            ),
            "spec.evaluation.retention.source",
        ),
        // checkpoints and output
        (
            "existing claim with size",
            with(
                base(TINY),
                "/checkpoints/storage/existingClaim",
                json!("ckpt"),
            ),
            "spec.checkpoints.storage.existingClaim",
        ),
        (
            "size not a quantity",
            with(base(TINY), "/checkpoints/storage/size", json!("lots")),
            "spec.checkpoints.storage.size",
        ),
        (
            "keep no checkpoint",
            with(base(TINY), "/checkpoints/keepLast", json!(0)),
            "spec.checkpoints.keepLast",
        ),
        (
            "output escapes",
            with(base(TINY), "/output/path", json!("../../etc")),
            "spec.output.path",
        ),
        (
            "absolute output",
            with(base(TINY), "/output/path", json!("/tmp/out")),
            "spec.output.path",
        ),
        (
            "merge with full",
            with(
                with(
                    with(base(TINY), "/method/lora", Value::Null),
                    "/method/type",
                    json!("full"),
                ),
                "/output/mergeWeights",
                json!(true),
            ),
            "spec.output.mergeWeights",
        ),
        // resources and lifecycle
        (
            "7B on cpu",
            with(base(L7B), "/resources/gpus", json!(0)),
            "spec.resources.gpus",
        ),
        (
            "layers split over one GPU",
            with(base(L7B), "/resources/spread", json!("layers")),
            "spec.resources.spread",
        ),
        (
            "layers split over more GPUs than layers",
            with(
                with(base(TINY), "/resources/gpus", json!(8)),
                "/resources/spread",
                json!("layers"),
            ),
            "spec.resources.spread",
        ),
        (
            "gpu resource without domain",
            with(base(L7B), "/resources/gpuResourceName", json!("gpu")),
            "spec.resources.gpuResourceName",
        ),
        (
            "memory not a quantity",
            with(base(TINY), "/resources/memory", json!("4 gigs")),
            "spec.resources.memory",
        ),
        (
            "image with spaces",
            with(base(TINY), "/resources/image", json!("trainer image")),
            "spec.resources.image",
        ),
        (
            "a trainer pod label under the operator's prefix",
            with(
                base(TINY),
                "/trainerPod",
                json!({"labels": {"finetune.dev/job": "other"}}),
            ),
            r#"spec.trainerPod.labels["finetune.dev/job"]"#,
        ),
        (
            "a trainer pod ServiceAccount that is no name",
            with(
                base(TINY),
                "/trainerPod",
                json!({"serviceAccountName": "Trainer SA"}),
            ),
            "spec.trainerPod.serviceAccountName",
        ),
        (
            "zero deadline",
            with(base(TINY), "/activeDeadlineSeconds", json!(0)),
            "spec.activeDeadlineSeconds",
        ),
        (
            "negative ttl",
            with(base(TINY), "/ttlSecondsAfterFinished", json!(-5)),
            "spec.ttlSecondsAfterFinished",
        ),
        // fit check
        (
            "70B full on one GPU",
            with(
                with(
                    with(base(L7B), "/model/preset", json!("llama-2-70b")),
                    "/method",
                    json!({"type": "full"}),
                ),
                "/output/mergeWeights",
                json!(false),
            ),
            "spec.resources.gpus",
        ),
        (
            "13B full on one GPU",
            with(
                with(
                    with(base(L7B), "/model/preset", json!("llama-2-13b")),
                    "/method",
                    json!({"type": "full"}),
                ),
                "/output/mergeWeights",
                json!(false),
            ),
            "spec.resources.gpus",
        ),
        (
            "7B LoRA on a 16 GiB GPU",
            with(base(L7B), "/resources/gpuMemoryGiB", json!(16)),
            "spec.resources.gpus",
        ),
    ];
    assert!(cases.len() >= 30, "the table must hold at least 30 cases");
    let mut failures = Vec::new();
    for (name, doc, path) in cases {
        let job: FineTuneJob = match serde_json::from_value(doc) {
            Ok(job) => job,
            Err(e) => {
                failures.push(format!("{name}: did not deserialise: {e}"));
                continue;
            }
        };
        match validate(&job.spec) {
            Ok(()) => failures.push(format!("{name}: accepted")),
            Err(errors) if !errors.iter().any(|e| e.path == path) => {
                failures.push(format!("{name}: expected {path}, got {errors:?}"))
            }
            Err(errors) => {
                for e in &errors {
                    assert!(
                        !e.message.is_empty(),
                        "{name}: empty message for {}",
                        e.path
                    );
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_fit_check_message_names_estimate_and_shortfall() {
    let doc = with(
        with(
            with(base(L7B), "/model/preset", json!("llama-2-70b")),
            "/method",
            json!({"type": "full"}),
        ),
        "/output/mergeWeights",
        json!(false),
    );
    let job: FineTuneJob = serde_json::from_value(doc).unwrap();
    let errors = validate(&job.spec).unwrap_err();
    let msg = &errors
        .iter()
        .find(|e| e.path == "spec.resources.gpus")
        .unwrap()
        .message;
    assert!(
        msg.contains("needs an estimated") && msg.contains("short by"),
        "{msg}"
    );
    assert!(msg.contains("a GPU has 80 GiB"), "{msg}");
}

#[test]
fn activation_override_on_a_pretrained_base_warns() {
    let doc = with(base(L7B), "/method/activation", json!("gelu"));
    let job: FineTuneJob = serde_json::from_value(doc).unwrap();
    assert!(validate(&job.spec).is_ok());
    let w = warnings(&job.spec);
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].path, "spec.method.activation");
    assert_eq!(w[0].condition, "ActivationOverride");
    let tiny: FineTuneJob =
        serde_json::from_value(with(base(TINY), "/method/activation", json!("gelu"))).unwrap();
    assert!(
        warnings(&tiny.spec).is_empty(),
        "tiny is trained from scratch: no warning"
    );
}

#[test]
fn unknown_enum_values_do_not_deserialise() {
    for (pointer, value) in [
        ("/model/preset", json!("llama-3-8b")),
        ("/method/type", json!("qlora")),
        ("/hyperparameters/scheduler", json!("step")),
        ("/dataset/format", json!("parquet")),
        ("/dataset/cleaning/onInvalidRow", json!("ignore")),
    ] {
        let doc = with(base(TINY), pointer, value);
        assert!(
            serde_json::from_value::<FineTuneJob>(doc).is_err(),
            "{pointer} accepted"
        );
    }
}
