//! Helpers shared by the API crate's tests: the base documents the tables mutate.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::Path;

use serde_json::{Value, json};

/// The tiny LoRA fixture (`tests/fixtures`), valid, with `maxSteps`.
pub const TINY: &str = "tiny-lora.yaml";
/// The 7B LoRA sample (`manifests/samples`).
pub const L7B: &str = "llama-2-7b-lora-sentiment.yaml";

/// A document as JSON: [`TINY`] from the test fixtures, anything else from `manifests/samples`.
pub fn base(name: &str) -> Value {
    let dir = if name == TINY {
        "tests/fixtures"
    } else {
        "../manifests/samples"
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).join(name);
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_json::to_value(yaml).unwrap()
}

/// Sets (or, with `Value::Null`, removes) the field at a `/`-separated pointer under `spec`.
pub fn with(mut doc: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let mut node = &mut doc["spec"];
    for part in parent.split('/').filter(|p| !p.is_empty()) {
        if node.get(part).is_none() {
            node[part] = json!({});
        }
        node = &mut node[part];
    }
    if value.is_null() {
        node.as_object_mut().unwrap().remove(key);
    } else {
        node[key] = value;
    }
    doc
}

/// Every `.yaml` file under `dir`, recursively.
pub fn sample_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sample_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    out
}
