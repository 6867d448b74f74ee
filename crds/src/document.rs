//! Validation of a whole FineTuneJob document as the user wrote it (JSON or YAML turned into a
//! [`serde_json::Value`]), before it is decoded into the typed [`FineTuneJob`].
//!
//! The API server checks the OpenAPI schema of the CRD, but it silently *prunes* unknown fields
//! (a misspelt `learningrate` vanishes and the default applies) and answers a body over its
//! 3 MiB limit with `413` and no field path. [`validate_document`] checks the same schema
//! offline — unknown fields, types (an integer field refuses `1e300`, `2.5` and `"NaN"`), enums,
//! numeric bounds, string lengths and list sizes — each problem with its JSON path, then decodes
//! the document and runs [`validate()`](crate::validate()). It is what a client (or a test)
//! runs to refuse everything the API server and the operator would refuse, with a field path.

use serde_json::Value;

use crate::v1alpha1::FineTuneJob;
use crate::validate::FieldError;

/// The `openAPIV3Schema` of the CRD, as JSON (generated once).
fn crd_schema() -> &'static Value {
    static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        let crd = crate::v1alpha1::crd()
            .ok()
            .and_then(|crd| serde_json::to_value(crd).ok())
            .unwrap_or_default();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    })
}

/// Checks a whole document against the CRD schema (with unknown fields refused rather than
/// pruned), decodes it, and validates the spec. Returns the typed job or every problem found,
/// each with its JSON path (`spec.hyperparameters.maxSteps`, `spec.evaluation.samplePrompts[3]`).
pub fn validate_document(doc: &Value) -> Result<FineTuneJob, Vec<FieldError>> {
    let mut errors = Vec::new();
    let schema = crd_schema();
    if let Some(props) = schema.get("properties") {
        for field in ["spec"] {
            match (doc.get(field), props.get(field)) {
                (Some(v), Some(s)) => check(s, v, field, &mut errors),
                (None, _) => errors.push(err(field, "is required")),
                (Some(_), None) => {}
            }
        }
        if let Some(obj) = doc.as_object() {
            for key in obj.keys() {
                if props.get(key).is_none()
                    && !["apiVersion", "kind", "metadata"].contains(&key.as_str())
                {
                    errors.push(err(key, "unknown field (the API server would drop it)"));
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let job: FineTuneJob = match serde_json::from_value(doc.clone()) {
        Ok(job) => job,
        Err(e) => return Err(vec![err("spec", &format!("does not decode: {e}"))]),
    };
    crate::validate(&job.spec)?;
    Ok(job)
}

fn err(path: &str, message: &str) -> FieldError {
    FieldError {
        path: path.into(),
        message: message.into(),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks `value` at `path` against one schema node (the subset of OpenAPI v3 that kube's
/// derive emits: type, properties, additionalProperties, required, items, enum, minimum,
/// maximum, minLength, maxLength, minItems, maxItems, nullable, x-kubernetes-int-or-string,
/// x-kubernetes-preserve-unknown-fields). Patterns are left to [`crate::validate()`], which
/// checks the same names and URIs with clearer messages.
fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if value.is_null() {
        if schema["nullable"].as_bool() != Some(true) {
            errors.push(err(path, "must not be null"));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"].as_bool() == Some(true) {
        if !matches!(kind_of(value), "integer" | "string") {
            errors.push(err(
                path,
                &format!("must be an integer or a string; got {}", kind_of(value)),
            ));
        }
        return;
    }
    let got = kind_of(value);
    let ty = schema["type"].as_str().unwrap_or("");
    let type_ok = match ty {
        "" => true,
        "number" => matches!(got, "number" | "integer"),
        t => t == got,
    };
    if !type_ok {
        errors.push(err(path, &format!("must be of type {ty}; got {got}")));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let names: Vec<String> = allowed.iter().map(Value::to_string).collect();
        errors.push(err(
            path,
            &format!("unsupported value {value}; one of {}", names.join(", ")),
        ));
    }
    match value {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if let Some(min) = schema["minimum"].as_f64()
                && (x < min || x.is_nan())
            {
                errors.push(err(path, &format!("{n} is below the minimum {min}")));
            }
            if let Some(max) = schema["maximum"].as_f64()
                && (x > max || x.is_nan())
            {
                errors.push(err(path, &format!("{n} is above the maximum {max}")));
            }
        }
        Value::String(s) => {
            let len = s.chars().count();
            if let Some(max) = schema["maxLength"].as_u64()
                && len as u64 > max
            {
                errors.push(err(
                    path,
                    &format!("is {len} characters long; at most {max} are allowed"),
                ));
            }
            if let Some(min) = schema["minLength"].as_u64()
                && (len as u64) < min
            {
                errors.push(err(
                    path,
                    &format!("is {len} characters long; at least {min} are needed"),
                ));
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema["maxItems"].as_u64()
                && items.len() as u64 > max
            {
                errors.push(err(
                    path,
                    &format!("has {} items; at most {max} are allowed", items.len()),
                ));
                return;
            }
            if let Some(min) = schema["minItems"].as_u64()
                && (items.len() as u64) < min
            {
                errors.push(err(
                    path,
                    &format!("has {} items; at least {min} are needed", items.len()),
                ));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(obj) => {
            if schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true) {
                return;
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            if let Some(required) = schema["required"].as_array() {
                for r in required.iter().filter_map(Value::as_str) {
                    if !obj.contains_key(r) {
                        errors.push(err(&format!("{path}.{r}"), "is required"));
                    }
                }
            }
            for (key, v) in obj {
                let child = format!("{path}.{key}");
                match (props.and_then(|p| p.get(key)), additional) {
                    (Some(s), _) => check(s, v, &child, errors),
                    (None, Some(s)) if s.is_object() => check(s, v, &child, errors),
                    (None, Some(Value::Bool(true))) => {}
                    _ if props.is_none() && additional.is_none() => {}
                    _ => errors.push(err(
                        &child,
                        "unknown field (the API server would drop it silently)",
                    )),
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tiny() -> Value {
        json!({
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "t"},
            "spec": {
                "model": {"preset": "tiny"},
                "dataset": {
                    "source": "configmap://reviews/reviews.csv",
                    "format": "csv",
                    "columns": {"text": "t", "label": "l"}
                },
                "resources": {"gpus": 0}
            }
        })
    }

    #[test]
    fn a_valid_document_decodes() {
        let r = validate_document(&tiny());
        assert!(r.is_ok(), "{:?}", r.err());
    }

    #[test]
    fn schema_problems_carry_their_path() {
        let cases = [
            json!({"maxSteps": 1e300}),
            json!({"maxSteps": 2.5}),
            json!({"maxSteps": "NaN"}),
            json!({"maxSteps": 0}),
            json!({"learningrate": 0.1}),
        ];
        for v in cases {
            let mut doc = tiny();
            doc["spec"]["hyperparameters"] = v.clone();
            let errors = validate_document(&doc).err().unwrap_or_default();
            assert!(
                errors
                    .iter()
                    .any(|e| e.path.starts_with("spec.hyperparameters.")),
                "{v}: {errors:?}"
            );
        }
    }
}
