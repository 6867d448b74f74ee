//! The committed CRD YAML must equal what `crdgen` generates from the types.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn committed_crd_matches_the_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("finetunejob.yaml");
    let committed = std::fs::read_to_string(&path).expect("crds/finetunejob.yaml exists");
    let generated = finetune_api::v1alpha1::crd_yaml().unwrap();
    assert!(
        committed == generated,
        "crds/finetunejob.yaml is stale: run `make crds` and commit the result"
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("finetunejob-pre-1.25.yaml");
    let committed = std::fs::read_to_string(&path).expect("crds/finetunejob-pre-1.25.yaml exists");
    let generated = finetune_api::v1alpha1::crd_yaml_without_cel().unwrap();
    assert!(
        committed == generated,
        "crds/finetunejob-pre-1.25.yaml is stale: run `make crds` and commit the result"
    );
    assert!(!committed.contains("x-kubernetes-validations"));
}

#[test]
fn every_schema_property_has_a_description() {
    // `kubectl explain finetunejob.spec.<path>` shows these; an undocumented field is a bug.
    let crd: serde_json::Value =
        serde_yaml::from_str(&finetune_api::v1alpha1::crd_yaml().unwrap()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut missing = Vec::new();
    walk(schema, "spec", &mut missing);
    assert!(
        missing.is_empty(),
        "fields without description: {missing:#?}"
    );
}

fn walk(node: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
    // Types imported from Kubernetes (tolerations, affinity) carry their own docs upstream.
    if path.contains(".affinity") || path.contains(".tolerations") {
        return;
    }
    if node.get("description").is_none() {
        missing.push(path.to_string());
    }
    if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
        for (k, v) in props {
            walk(v, &format!("{path}.{k}"), missing);
        }
    }
    if let Some(items) = node.get("items")
        && items.get("properties").is_some()
    {
        for (k, v) in items["properties"].as_object().unwrap() {
            walk(v, &format!("{path}[].{k}"), missing);
        }
    }
}

#[test]
fn strings_and_lists_are_bounded() {
    // No object can grow without bound: every string has maxLength or a closed enum, every list
    // maxItems (Kubernetes' own imported types excepted).
    let crd: serde_json::Value =
        serde_yaml::from_str(&finetune_api::v1alpha1::crd_yaml().unwrap()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut unbounded = Vec::new();
    bounds(spec, "spec", &mut unbounded);
    assert!(unbounded.is_empty(), "unbounded fields: {unbounded:#?}");
}

fn bounds(node: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    if path.contains(".affinity") || path.contains(".tolerations[]") {
        return;
    }
    match node.get("type").and_then(|t| t.as_str()) {
        Some("string") if node.get("maxLength").is_none() && node.get("enum").is_none() => {
            out.push(path.to_string())
        }
        Some("array") if node.get("maxItems").is_none() => out.push(path.to_string()),
        Some("integer") | Some("number")
            if node.get("maximum").is_none() && !path.ends_with("status") =>
        {
            out.push(path.to_string())
        }
        _ => {}
    }
    if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
        for (k, v) in props {
            bounds(v, &format!("{path}.{k}"), out);
        }
    }
    if let Some(items) = node.get("items") {
        bounds(items, &format!("{path}[]"), out);
    }
    if let Some(extra) = node.get("additionalProperties").filter(|v| v.is_object()) {
        bounds(extra, &format!("{path}{{}}"), out);
    }
}
