//! `Default` of each spec section is what a manifest that leaves the section's fields out gets
//! (serde's field defaults): the trainer's own defaults are built from these, so a derived
//! `Default` with zeros where serde has a value would silently give tests and tools other
//! settings than users get.
#![allow(clippy::unwrap_used)]

use finetune_api::{
    CheckpointSpec, CleaningSpec, DatasetSpec, EvaluationSpec, Hyperparameters, LoraSpec,
    MethodSpec,
};
use serde::de::DeserializeOwned;
use serde_json::json;

fn from_manifest<T: DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

#[test]
fn each_sections_default_is_its_manifest_default() {
    assert_eq!(Hyperparameters::default(), from_manifest(json!({})));
    assert_eq!(EvaluationSpec::default(), from_manifest(json!({})));
    assert_eq!(LoraSpec::default(), from_manifest(json!({})));
    assert_eq!(CheckpointSpec::default(), from_manifest(json!({})));
    assert_eq!(CleaningSpec::default(), from_manifest(json!({})));
    assert_eq!(MethodSpec::default(), from_manifest(json!({})));
    assert_eq!(DatasetSpec::default(), from_manifest(json!({"source": ""})));
}
