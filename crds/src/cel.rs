//! The CRD's CEL rules (`x-kubernetes-validations`): the immutability of a started job's spec
//! (built from [`crate::mutability`]) and the cross-field rules of [`crate::validate()`] that CEL
//! can express without the model presets' tables.
//!
//! API servers from 1.25 evaluate them at admission, so `kubectl apply` and Argo CD refuse a bad
//! spec or an immutable change at once, with the message below. Older servers (the 1.20 one the
//! tests run) drop them, and the operator's own checks — the same rules, reported at the same
//! field paths — set InvalidSpec instead. `crds/tests/cel_rules.rs` evaluates the generated CRD
//! with a CEL evaluator (kube-cel) against fixtures: every rule refuses its fixture exactly where
//! `validate()` does, and accepts every sample.

use serde_json::{Value, json};

/// One CEL rule of the CRD schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CelRule {
    /// Where the rule sits: the properties from the object's root, dot-separated
    /// (`spec.method`); the empty string is the root itself.
    pub at: &'static str,
    /// The CEL expression; `self` is the value at `at`.
    pub rule: &'static str,
    /// What the API server answers when the rule is false.
    pub message: &'static str,
    /// The field path [`crate::validate()`] reports for the same problem.
    pub field: &'static str,
}

/// A model token is sent only to the Hugging Face Hub.
pub const MODEL_TOKEN_NEEDS_HUB: CelRule = CelRule {
    at: "spec.model",
    rule: "!has(self.tokenSecretRef) || (has(self.source) && self.source.startsWith('hf://'))",
    message: "a token is only used with an hf:// source",
    field: "spec.model.tokenSecretRef",
};

/// Dataset credentials are sent only to an https:// source.
pub const DATASET_CREDENTIALS_NEED_HTTPS: CelRule = CelRule {
    at: "spec.dataset",
    rule: "!has(self.credentialsSecretRef) || self.source.startsWith('https://')",
    message: "credentials are only sent to an https:// source",
    field: "spec.dataset.credentialsSecretRef",
};

/// The dataset's columns name exactly one shape (`DatasetColumns::task`).
pub const DATASET_ONE_SHAPE: CelRule = CelRule {
    at: "spec.dataset.columns",
    rule: "(has(self.text) && has(self.label) && !has(self.prompt) && !has(self.completion) \
           && !has(self.messages)) \
           || (has(self.prompt) && has(self.completion) && !has(self.text) && !has(self.label) \
           && !has(self.messages)) \
           || (has(self.messages) && !has(self.text) && !has(self.label) && !has(self.prompt) \
           && !has(self.completion))",
    message: "set exactly one shape: text + label, prompt + completion, or messages",
    field: "spec.dataset.columns",
};

/// Chat messages are read from JSON Lines only.
pub const CHAT_NEEDS_JSONL: CelRule = CelRule {
    at: "spec.dataset",
    rule: "!has(self.columns) || !has(self.columns.messages) || self.format == 'jsonl'",
    message: "chat messages need format: jsonl",
    field: "spec.dataset.columns.messages",
};

/// Allowed labels belong to a classification dataset.
pub const ALLOWED_LABELS_NEED_CLASSIFICATION: CelRule = CelRule {
    at: "spec.dataset",
    rule: "!has(self.cleaning) || !has(self.cleaning.allowedLabels) \
           || size(self.cleaning.allowedLabels) == 0 \
           || (has(self.columns) && has(self.columns.text) && has(self.columns.label))",
    message: "only classification datasets (text + label) have labels",
    field: "spec.dataset.cleaning.allowedLabels",
};

/// The shortest kept row is not longer than the longest.
pub const CLEANING_MIN_NOT_ABOVE_MAX: CelRule = CelRule {
    at: "spec.dataset.cleaning",
    rule: "!has(self.minChars) || !has(self.maxChars) || self.minChars <= self.maxChars",
    message: "minChars must not be larger than maxChars",
    field: "spec.dataset.cleaning.minChars",
};

/// LoRA settings belong to a LoRA job.
pub const LORA_SETTINGS_NEED_LORA: CelRule = CelRule {
    at: "spec.method",
    rule: "!has(self.lora) || !has(self.type) || self.type == 'lora'",
    message: "LoRA settings are only used with type: lora",
    field: "spec.method.lora",
};

/// LoRA target modules are named once each.
pub const LORA_MODULES_UNIQUE: CelRule = CelRule {
    at: "spec.method.lora",
    rule: "!has(self.targetModules) \
           || self.targetModules.all(m, self.targetModules.filter(n, n == m).size() == 1)",
    message: "modules repeat",
    field: "spec.method.lora.targetModules",
};

/// Trainable layers are chosen by count or by index, not both.
pub const TRAINABLE_LAYERS_ONE_WAY: CelRule = CelRule {
    at: "spec.method.trainableLayers",
    rule: "has(self.last) != has(self.indices)",
    message: "set exactly one of last and indices",
    field: "spec.method.trainableLayers",
};

/// Trainable layer indices are named once each.
pub const TRAINABLE_INDICES_UNIQUE: CelRule = CelRule {
    at: "spec.method.trainableLayers",
    rule: "!has(self.indices) || self.indices.all(i, self.indices.filter(j, j == i).size() == 1)",
    message: "indices repeat",
    field: "spec.method.trainableLayers.indices",
};

/// Warmup leaves some of `maxSteps` for training.
pub const WARMUP_BELOW_MAX_STEPS: CelRule = CelRule {
    at: "spec.hyperparameters",
    rule: "!has(self.maxSteps) || self.maxSteps == 0 || !has(self.warmupSteps) \
           || self.warmupSteps < self.maxSteps",
    message: "warmupSteps must be smaller than maxSteps (warmup would leave no training)",
    field: "spec.hyperparameters.warmupSteps",
};

/// An evaluation runs before `maxSteps` ends.
pub const EVALUATION_WITHIN_MAX_STEPS: CelRule = CelRule {
    at: "spec",
    rule: "!has(self.hyperparameters) || !has(self.hyperparameters.maxSteps) \
           || !has(self.evaluation) || !has(self.evaluation.intervalSteps) \
           || self.evaluation.intervalSteps <= self.hyperparameters.maxSteps",
    message: "evaluation.intervalSteps is beyond hyperparameters.maxSteps: no evaluation would run \
              before the end",
    field: "spec.evaluation.intervalSteps",
};

/// A test set is scored by label, so it needs a classification dataset.
pub const TEST_SET_NEEDS_CLASSIFICATION: CelRule = CelRule {
    at: "spec",
    rule: "!has(self.evaluation) || !has(self.evaluation.testSet) \
           || (has(self.dataset.columns) && has(self.dataset.columns.text) \
           && has(self.dataset.columns.label))",
    message: "evaluation.testSet needs a classification dataset (dataset.columns.text and .label)",
    field: "spec.evaluation.testSet",
};

/// Merging is for adapters: full fine-tuning already writes full weights.
pub const MERGE_NEEDS_LORA: CelRule = CelRule {
    at: "spec",
    rule: "!has(self.output) || !has(self.output.mergeWeights) || !self.output.mergeWeights \
           || !has(self.method) || !has(self.method.type) || self.method.type == 'lora'",
    message: "output.mergeWeights: full fine-tuning already writes full weights",
    field: "spec.output.mergeWeights",
};

/// Size and class describe a claim the operator creates, not an existing one.
pub const EXISTING_CLAIM_ALONE: CelRule = CelRule {
    at: "spec.checkpoints.storage",
    rule: "!has(self.existingClaim) || (!has(self.size) && !has(self.storageClassName))",
    message: "size and storageClassName only apply to a claim the operator creates",
    field: "spec.checkpoints.storage.existingClaim",
};

/// Every cross-field rule, in the order they are added to the schema.
pub const CROSS_FIELD_RULES: [CelRule; 15] = [
    MODEL_TOKEN_NEEDS_HUB,
    DATASET_CREDENTIALS_NEED_HTTPS,
    DATASET_ONE_SHAPE,
    CHAT_NEEDS_JSONL,
    ALLOWED_LABELS_NEED_CLASSIFICATION,
    CLEANING_MIN_NOT_ABOVE_MAX,
    LORA_SETTINGS_NEED_LORA,
    LORA_MODULES_UNIQUE,
    TRAINABLE_LAYERS_ONE_WAY,
    TRAINABLE_INDICES_UNIQUE,
    WARMUP_BELOW_MAX_STEPS,
    EVALUATION_WITHIN_MAX_STEPS,
    TEST_SET_NEEDS_CLASSIFICATION,
    MERGE_NEEDS_LORA,
    EXISTING_CLAIM_ALONE,
];

/// A rule that names a schema node the CRD does not have.
#[derive(Debug, thiserror::Error)]
#[error("the CEL rule for {at} names a property the CRD schema does not have")]
pub struct MissingProperty {
    /// The rule's `at`.
    pub at: String,
}

/// Adds the immutability rule ([`crate::mutability::immutability_rule`]) at the root and every
/// [`CROSS_FIELD_RULES`] entry at its node of an `openAPIV3Schema`.
pub fn add_rules(schema: &mut Value) -> Result<(), MissingProperty> {
    let immutability = crate::mutability::immutability_rule(&schema["properties"]["spec"]);
    push_rule(schema, &immutability.0, &immutability.1);
    for r in CROSS_FIELD_RULES {
        let node = node_at(schema, r.at).ok_or_else(|| MissingProperty { at: r.at.into() })?;
        push_rule(node, r.rule, r.message);
    }
    Ok(())
}

/// The schema node at a dotted property path (`spec.method`), following `properties`.
fn node_at<'a>(schema: &'a mut Value, at: &str) -> Option<&'a mut Value> {
    at.split('.')
        .filter(|p| !p.is_empty())
        .try_fold(schema, |node, part| {
            node.get_mut("properties")?.get_mut(part)
        })
}

fn push_rule(node: &mut Value, rule: &str, message: &str) {
    let entry = json!({"rule": rule, "message": message});
    match node.get_mut("x-kubernetes-validations") {
        Some(Value::Array(rules)) => rules.push(entry),
        _ => node["x-kubernetes-validations"] = json!([entry]),
    }
}
