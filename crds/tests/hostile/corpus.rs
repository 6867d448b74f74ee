//! The hostile FineTuneJob corpus: invalid documents, each with the field path that must be
//! named when it is refused. Shared by `crds/tests/hostile.rs` (offline: `validate_document`,
//! `validate()`, `validate_update`) and `tests/tests/security.rs` (the real API server), which
//! include this file with `#[path]`.
//!
//! Most cases are generated from the CRD schema itself, so a new field is covered the day it is
//! added: every integer field gets `1e300`, `2^53+1`, `-1`, `2.5` and `"NaN"`; every number field
//! `"Infinity"`, `"NaN"`, `1e300` and `-1e300`; every bounded string one character too many;
//! every bounded list one item too many; every enum a value outside it. Hand-written cases add
//! unknown fields, wrong types, path traversal in sources and output paths, URLs, a body over the
//! API server's 3 MiB limit, cross-field errors and changes to immutable fields.
//!
//! Over 500 lines on purpose: it is data, one short entry per hostile document.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};

/// One invalid document.
pub struct Case {
    /// What the case tries.
    pub name: String,
    /// Which family it belongs to (for the per-family figures).
    pub family: &'static str,
    /// For an update: the valid job as it was created first; `doc` is then the update.
    pub before: Option<Value>,
    /// The document sent (create) or the new version (update).
    pub doc: Value,
    /// The JSON path that a rejection must name (`spec.hyperparameters.maxSteps`).
    pub path: String,
}

/// The valid base every case mutates: the tiny LoRA fixture of the validation table.
pub fn base() -> Value {
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(include_str!("../fixtures/tiny-lora.yaml")).unwrap();
    serde_json::to_value(yaml).unwrap()
}

/// Sets the field at a dotted path (`spec.a.b`), creating parent objects.
pub fn set(mut doc: Value, path: &str, value: Value) -> Value {
    let parts: Vec<&str> = path.split('.').collect();
    let mut node = &mut doc;
    for part in &parts[..parts.len() - 1] {
        if !node.get(*part).is_some_and(Value::is_object) {
            node[*part] = json!({});
        }
        node = &mut node[*part];
    }
    node[parts[parts.len() - 1]] = value;
    doc
}

/// Subtrees of the schema that are Kubernetes core types (affinity, tolerations, ...): their
/// own validation is the API server's, and the corpus targets this API's fields.
fn is_core_type(path: &str) -> bool {
    ["affinity", "tolerations", "nodeSelector", "status"]
        .iter()
        .any(|s| path.contains(s))
}

/// A valid single item for a list whose items have this schema.
fn valid_item(items: &Value, i: usize) -> Option<Value> {
    match items["type"].as_str()? {
        "string" => Some(json!(format!("item-{i}"))),
        "integer" => Some(json!(i)),
        _ => None,
    }
}

fn walk(schema: &Value, path: &str, out: &mut Vec<Case>) {
    if is_core_type(path) {
        return;
    }
    let mut add = |family: &'static str, what: String, value: Value| {
        out.push(Case {
            name: format!("{path} = {what}"),
            family,
            before: None,
            doc: set(base(), path, value),
            path: path.to_string(),
        });
    };
    if schema["x-kubernetes-int-or-string"].as_bool() == Some(true) {
        add("wrong type", "[list]".into(), json!(["1Gi"]));
        add("wrong type", "{object}".into(), json!({"a": 1}));
        return;
    }
    match schema["type"].as_str() {
        Some("integer") => {
            add("huge number", "1e300".into(), json!(1e300));
            add(
                "huge number",
                "2^53+1".into(),
                json!(9_007_199_254_740_993u64),
            );
            add("huge number", "-1e300".into(), json!(-1e300));
            add("fractional integer", "2.5".into(), json!(2.5));
            add("NaN-like string", "\"NaN\"".into(), json!("NaN"));
            if schema["minimum"].as_f64().is_some_and(|m| m >= 0.0) {
                add("negative", "-1".into(), json!(-1));
            }
        }
        Some("number") => {
            add("NaN-like string", "\"Infinity\"".into(), json!("Infinity"));
            add("NaN-like string", "\"NaN\"".into(), json!("NaN"));
            add("huge number", "1e300".into(), json!(1e300));
            add("huge number", "-1e300".into(), json!(-1e300));
        }
        Some("boolean") => add("wrong type", "\"yes\"".into(), json!("yes")),
        Some("string") => {
            if schema["enum"].is_array() {
                add("bad enum", "\"bogus\"".into(), json!("bogus"));
                add("bad enum", "wrong case".into(), json!("LoRA"));
            }
            if let Some(max) = schema["maxLength"].as_u64() {
                add(
                    "oversized string",
                    format!("{} characters (max {max})", max + 1),
                    json!("a".repeat(max as usize + 1)),
                );
            }
            add("wrong type", "42".into(), json!(42));
        }
        Some("array") => {
            if let Some(max) = schema["maxItems"].as_u64() {
                let items: Option<Vec<Value>> = (0..=max as usize)
                    .map(|i| valid_item(&schema["items"], i))
                    .collect();
                if let Some(items) = items {
                    add(
                        "oversized list",
                        format!("{} items (max {max})", max + 1),
                        Value::Array(items),
                    );
                }
            }
            add("wrong type", "\"a string\"".into(), json!("a string"));
        }
        Some("object") => {
            if let Some(props) = schema["properties"].as_object() {
                if path != "spec" {
                    add("wrong type", "[list]".into(), json!([1, 2]));
                }
                for (k, s) in props {
                    walk(s, &format!("{path}.{k}"), out);
                }
            }
        }
        _ => {}
    }
}

/// Hand-written cases: one `(family, name, path, value)` each, set on the base.
fn hand_written() -> Vec<(&'static str, &'static str, &'static str, Value)> {
    let ds = "spec.dataset.source";
    let out = "spec.output.path";
    let model = "spec.model.source";
    let ret = "spec.evaluation.retention.source";
    vec![
        // Unknown fields (the API server prunes them silently).
        (
            "unknown field",
            "typo learningrate",
            "spec.hyperparameters.learningrate",
            json!(0.1),
        ),
        ("unknown field", "spec.extra", "spec.extra", json!("x")),
        (
            "unknown field",
            "model.token (literal)",
            "spec.model.token",
            json!("hf_literal"),
        ),
        (
            "unknown field",
            "lora.rnak",
            "spec.method.lora.rnak",
            json!(8),
        ),
        (
            "unknown field",
            "resources.privileged",
            "spec.resources.privileged",
            json!(true),
        ),
        (
            "unknown field",
            "top-level status-like",
            "spec.status",
            json!({"phase": "Succeeded"}),
        ),
        // Path traversal and bad URIs in dataset, model and retention sources.
        (
            "path traversal",
            "dataset ..",
            ds,
            json!("pvc://data/../../etc/passwd"),
        ),
        (
            "path traversal",
            "dataset .. at end",
            ds,
            json!("pvc://data/a/.."),
        ),
        (
            "path traversal",
            "dataset absolute",
            ds,
            json!("pvc://data//etc/passwd"),
        ),
        (
            "path traversal",
            "dataset NUL",
            ds,
            json!("pvc://data/r.csv\u{0}.txt"),
        ),
        (
            "path traversal",
            "dataset newline",
            ds,
            json!("pvc://data/r.csv\nx"),
        ),
        (
            "path traversal",
            "dataset backslashes",
            ds,
            json!("pvc://data/..\\..\\etc"),
        ),
        (
            "path traversal",
            "dataset %2e%2e",
            ds,
            json!("pvc://data/%2e%2e/%2e%2e/etc"),
        ),
        (
            "path traversal",
            "dataset %2F",
            ds,
            json!("pvc://data/a%2F..%2Fb"),
        ),
        (
            "path traversal",
            "dataset double-encoded",
            ds,
            json!("pvc://data/%252e%252e/x"),
        ),
        (
            "path traversal",
            "dataset claim ..",
            ds,
            json!("pvc://../etc"),
        ),
        (
            "path traversal",
            "configmap key ..",
            ds,
            json!("configmap://cm/../x"),
        ),
        (
            "path traversal",
            "configmap key slash",
            ds,
            json!("configmap://cm/a/b"),
        ),
        (
            "bad URL",
            "http dataset",
            ds,
            json!("http://example.com/r.csv"),
        ),
        (
            "bad URL",
            "ftp dataset",
            ds,
            json!("ftp://example.com/r.csv"),
        ),
        ("bad URL", "file dataset", ds, json!("file:///etc/passwd")),
        ("bad URL", "no scheme", ds, json!("/etc/passwd")),
        (
            "bad URL",
            "userinfo",
            ds,
            json!("https://user:pw@example.com/r.csv"),
        ),
        (
            "bad URL",
            "user only",
            ds,
            json!("https://token@example.com/r.csv"),
        ),
        (
            "bad URL",
            "metadata IP",
            ds,
            json!("https://169.254.169.254/latest/meta-data"),
        ),
        (
            "bad URL",
            "IPv6 literal",
            ds,
            json!("https://[::1]:443/r.csv"),
        ),
        ("bad URL", "localhost", ds, json!("https://localhost/r.csv")),
        (
            "bad URL",
            "https ..",
            ds,
            json!("https://example.com/a/../../r.csv"),
        ),
        (
            "bad URL",
            "https %2e%2e",
            ds,
            json!("https://example.com/%2e%2e/r.csv"),
        ),
        (
            "bad URL",
            "https backslash",
            ds,
            json!("https://example.com\\@evil.com/r.csv"),
        ),
        (
            "bad URL",
            "port 0",
            ds,
            json!("https://example.com:0/r.csv"),
        ),
        ("bad URL", "hf:// for a dataset", ds, json!("hf://org/name")),
        ("path traversal", "output ..", out, json!("../../etc")),
        (
            "path traversal",
            "output absolute",
            out,
            json!("/etc/cron.d"),
        ),
        ("path traversal", "output NUL", out, json!("out\u{0}put")),
        (
            "path traversal",
            "output backslash",
            out,
            json!("..\\..\\x"),
        ),
        (
            "path traversal",
            "output %2e%2e",
            out,
            json!("%2e%2e/%2e%2e/x"),
        ),
        ("path traversal", "output ./", out, json!("a/./b")),
        ("path traversal", "output //", out, json!("a//b")),
        (
            "path traversal",
            "model pvc ..",
            model,
            json!("pvc://models/../../etc"),
        ),
        (
            "path traversal",
            "model pvc %2e%2e",
            model,
            json!("pvc://models/%2e%2e/x"),
        ),
        (
            "bad URL",
            "model https",
            model,
            json!("https://example.com/model"),
        ),
        (
            "bad URL",
            "model hf revision ..",
            model,
            json!("hf://org/name@../../x"),
        ),
        (
            "path traversal",
            "retention ..",
            ret,
            json!("pvc://data/../x"),
        ),
        (
            "bad URL",
            "retention http",
            ret,
            json!("http://example.com/x"),
        ),
        // Wrong shapes.
        ("wrong type", "model as string", "spec.model", json!("tiny")),
        ("wrong type", "spec as list", "spec", json!([1])),
        (
            "wrong type",
            "samplePrompts item object",
            "spec.evaluation.samplePrompts",
            json!([{"a": 1}]),
        ),
        (
            "wrong type",
            "targetModules item number",
            "spec.method.lora.targetModules",
            json!([1]),
        ),
        (
            "wrong type",
            "gpus as \"1\"",
            "spec.resources.gpus",
            json!("1"),
        ),
        (
            "wrong type",
            "suspend as \"true\"",
            "spec.suspend",
            json!("true"),
        ),
        (
            "wrong type",
            "memory as boolean",
            "spec.resources.memory",
            json!(true),
        ),
        // Names.
        (
            "bad name",
            "token secret name",
            "spec.model.tokenSecretRef",
            json!({"name": "../x", "key": "token"}),
        ),
        (
            "bad name",
            "existing claim",
            "spec.checkpoints.storage.existingClaim",
            json!("Bad_Claim"),
        ),
        (
            "bad name",
            "gpu resource name",
            "spec.resources.gpuResourceName",
            json!("gpu"),
        ),
        (
            "bad name",
            "image with spaces",
            "spec.resources.image",
            json!("img:1 ; rm -rf /"),
        ),
        // Cross-field.
        (
            "cross-field",
            "warmup beyond maxSteps",
            "spec.hyperparameters.warmupSteps",
            json!(150),
        ),
        (
            "cross-field",
            "minChars above maxChars",
            "spec.dataset.cleaning.minChars",
            json!(601),
        ),
        (
            "cross-field",
            "one allowed label",
            "spec.dataset.cleaning.allowedLabels",
            json!(["Positive"]),
        ),
        (
            "cross-field",
            "labels repeat",
            "spec.dataset.cleaning.allowedLabels",
            json!(["a", "A"]),
        ),
        (
            "cross-field",
            "bf16 on CPU",
            "spec.hyperparameters.precision",
            json!("bf16"),
        ),
        (
            "cross-field",
            "eval interval beyond maxSteps",
            "spec.evaluation.intervalSteps",
            json!(151),
        ),
        (
            "cross-field",
            "lora rank above hidden size",
            "spec.method.lora.rank",
            json!(1024),
        ),
        (
            "cross-field",
            "layer index beyond the model",
            "spec.method.trainableLayers.indices",
            json!([0, 79]),
        ),
        (
            "cross-field",
            "tiny size below 1Mi",
            "spec.checkpoints.storage.size",
            json!("1Ki"),
        ),
        (
            "cross-field",
            "cpu as garbage quantity",
            "spec.resources.cpu",
            json!("lots"),
        ),
    ]
}

/// Changes of immutable fields on an existing job: `(name, path, new value)`.
fn immutable() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "learning rate",
            "spec.hyperparameters.learningRate",
            json!(0.01),
        ),
        (
            "dataset source",
            "spec.dataset.source",
            json!("configmap://other/reviews.csv"),
        ),
        ("model preset", "spec.model.preset", json!("llama-2-7b")),
        ("lora rank", "spec.method.lora.rank", json!(8)),
        ("output path", "spec.output.path", json!("elsewhere")),
        ("gpus", "spec.resources.gpus", json!(1)),
        ("keepLast", "spec.checkpoints.keepLast", json!(5)),
        ("dataset seed", "spec.dataset.seed", json!(8)),
        (
            "one sample prompt",
            "spec.evaluation.samplePrompts",
            json!([
                "Review: changed.",
                "Review: Works exactly as described, I would buy it again."
            ]),
        ),
        ("memory", "spec.resources.memory", json!("8Gi")),
    ]
}

/// The whole corpus.
pub fn corpus() -> Vec<Case> {
    let crd = serde_json::to_value(finetune_api::v1alpha1::crd().unwrap()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut cases = Vec::new();
    walk(schema, "spec", &mut cases);
    for (family, name, path, value) in hand_written() {
        cases.push(Case {
            name: name.to_string(),
            family,
            before: None,
            doc: set(base(), path, value),
            path: path.to_string(),
        });
    }
    // A body over the API server's 3 MiB request limit (and over etcd's 1.5 MiB value limit).
    cases.push(Case {
        name: "4 MiB system prompt (body over the 3 MiB request limit)".into(),
        family: "oversized body",
        before: None,
        doc: set(
            base(),
            "spec.dataset.promptTemplate.system",
            json!("x".repeat(4 << 20)),
        ),
        path: "spec.dataset.promptTemplate.system".into(),
    });
    cases.push(Case {
        name: "10,000 sample prompts (body over the 3 MiB request limit)".into(),
        family: "oversized body",
        before: None,
        doc: set(
            base(),
            "spec.evaluation.samplePrompts",
            json!(vec!["y".repeat(400); 10_000]),
        ),
        path: "spec.evaluation.samplePrompts".into(),
    });
    for (name, path, value) in immutable() {
        cases.push(Case {
            name: format!("change {name} after creation"),
            family: "immutable change",
            before: Some(base()),
            doc: set(base(), path, value),
            path: path.to_string(),
        });
    }
    cases
}

/// Whether a validation error path names the case's field (or something beneath it).
pub fn names_path(error_path: &str, expected: &str) -> bool {
    error_path == expected
        || error_path.starts_with(&format!("{expected}."))
        || error_path.starts_with(&format!("{expected}["))
}
