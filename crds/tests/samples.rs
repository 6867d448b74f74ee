//! Every sample under `manifests/samples/` deserialises into a FineTuneJob without unknown
//! fields and passes `validate()`, the fit check included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::sample_files;

use finetune_api::{FineTuneJob, ModelPreset, validate};

fn sample(name: &str) -> FineTuneJob {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/samples")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_runnable_samples_are_valid() {
    for (file, preset) in [
        ("tiny-sentiment-cpu.yaml", ModelPreset::Tiny),
        ("stories-sentiment-lora-cpu.yaml", ModelPreset::Stories15m),
        ("llama-2-7b-lora-sentiment.yaml", ModelPreset::Llama2_7b),
        ("llama-2-13b-lora.yaml", ModelPreset::Llama2_13b),
        ("llama-2-70b-qlora-one-gpu.yaml", ModelPreset::Llama2_70b),
    ] {
        let job = sample(file);
        assert_eq!(job.spec.model.preset, preset, "{file}");
        if let Err(errors) = validate(&job.spec) {
            panic!("{file} is invalid: {errors:#?}");
        }
    }
}

#[test]
fn every_file_in_samples_is_checked() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/samples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") {
            let job = sample(&name);
            assert!(validate(&job.spec).is_ok(), "{name}");
            n += 1;
        }
    }
    assert!(n >= 3, "expected at least three samples, found {n}");
}

/// Every key written in a sample must survive a round trip through the types: a misspelt field
/// would otherwise be dropped silently (and pruned by the API server).
#[test]
fn samples_hold_no_unknown_fields() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/samples");
    for path in sample_files(&dir) {
        let text = std::fs::read_to_string(&path).unwrap();
        let original: serde_json::Value =
            serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(&text).unwrap())
                .unwrap();
        let job: FineTuneJob = serde_json::from_value(original.clone()).unwrap();
        let round_trip = serde_json::to_value(&job).unwrap();
        let mut lost = Vec::new();
        missing_keys(&original["spec"], &round_trip["spec"], "spec", &mut lost);
        assert!(
            lost.is_empty(),
            "{}: unknown fields {lost:?}",
            path.display()
        );
    }
}

/// The `.yaml` files of `dir` and of its subdirectories (the samples that wait for a feature).
fn missing_keys(a: &serde_json::Value, b: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => missing_keys(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (serde_json::Value::Array(a), serde_json::Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                missing_keys(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_demo_sample_trains_on_cpu_and_70b_splits_its_layers_over_four_gpus() {
    let tiny = sample("tiny-sentiment-cpu.yaml");
    assert_eq!(finetune_api::fit::effective_gpus(&tiny.spec), 0);
    let big = sample("llama-2-70b-lora-four-gpus.yaml");
    assert_eq!(big.spec.model.preset, ModelPreset::Llama2_70b);
    assert_eq!(finetune_api::fit::effective_gpus(&big.spec), 4);
    assert_eq!(finetune_api::fit::processes_per_pod(&big.spec), 1);
    let plan = finetune_api::fit::check(&big.spec).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.devices.len(), 4, "{plan:?}");
    assert!(plan.per_gpu_bytes < 80 * finetune_api::memory::GIB);
    // Over a 4-bit base, 70B LoRA fits one 141 GB GPU.
    let one = sample("llama-2-70b-qlora-one-gpu.yaml");
    assert_eq!(finetune_api::fit::effective_gpus(&one.spec), 1);
    let plan = finetune_api::fit::check(&one.spec).unwrap_or_else(|e| panic!("{e}"));
    assert!(plan.per_gpu_bytes < 141 * finetune_api::memory::GIB);
}
