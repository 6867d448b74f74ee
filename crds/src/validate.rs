//! Validation of a [`FineTuneJobSpec`] beyond what the OpenAPI schema can express (the test API
//! server is 1.20: no CEL). Pure: the operator calls it before it creates anything, and an
//! invalid spec never produces a pod.

use std::collections::BTreeSet;
use std::fmt;

use crate::quantity::parse_quantity_bytes;
use crate::source::{Source, SourceKind, check_relative_path, is_dns_subdomain};
use crate::v1alpha1::{
    DatasetFormat, DatasetTask, FineTuneJobSpec, GangScheduling, MethodType, Precision,
    SecretKeyRef, Spread,
};
use crate::{cel, fit};

/// One problem with a spec: the JSON path of the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the offending field, e.g. `spec.dataset.source`.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Something legal but risky in a spec, surfaced as a warning condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldWarning {
    /// JSON path of the field.
    pub path: String,
    /// Condition type the operator sets for it.
    pub condition: &'static str,
    /// Explanation.
    pub message: String,
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// The problem a CEL rule of the CRD also refuses, at its field with its message.
    fn refuse(&mut self, rule: cel::CelRule) {
        self.add(rule.field, rule.message);
    }
}

/// Validates a spec. Returns every problem found, each with its field path.
pub fn validate(spec: &FineTuneJobSpec) -> Result<(), Vec<FieldError>> {
    let mut e = Errors(Vec::new());
    validate_model(spec, &mut e);
    validate_dataset(spec, &mut e);
    validate_method(spec, &mut e);
    validate_hyperparameters(spec, &mut e);
    validate_evaluation(spec, &mut e);
    validate_storage(spec, &mut e);
    validate_resources(spec, &mut e);
    for (path, message) in spec.trainer_pod.problems() {
        e.add(&path, message);
    }
    if e.0.is_empty()
        && let Err(msg) = fit::check(spec)
    {
        e.add("spec.resources.gpus", msg);
    }
    if e.0.is_empty() { Ok(()) } else { Err(e.0) }
}

/// Legal but risky settings: each becomes a warning condition on the job.
pub fn warnings(spec: &FineTuneJobSpec) -> Vec<FieldWarning> {
    let mut w = Vec::new();
    if let Some(act) = spec.method.activation
        && spec.model.preset.is_pretrained()
        && act != crate::v1alpha1::Activation::Silu
    {
        w.push(FieldWarning {
            path: "spec.method.activation".into(),
            condition: "ActivationOverride",
            message: format!(
                "{} was pretrained with silu; replacing it with {act:?} changes what every \
                     pretrained layer computes, so expect a large initial loss and more forgetting",
                spec.model.preset
            ),
        });
    }
    w
}

fn validate_model(spec: &FineTuneJobSpec, e: &mut Errors) {
    let m = &spec.model;
    match (&m.source, !m.preset.is_bundled()) {
        (None, true) => e.add(
            "spec.model.source",
            format!(
                "{} needs a source: hf://org/name[@revision] or pvc://claim/path",
                m.preset
            ),
        ),
        (Some(src), _) => {
            if let Err(err) = Source::parse(src, SourceKind::Model) {
                e.add("spec.model.source", err.to_string());
            }
        }
        (None, false) => {}
    }
    if let Some(token) = &m.token_secret_ref {
        let hub = m.source.as_deref().is_some_and(|s| s.starts_with("hf://"));
        let why = (!hub).then_some(cel::MODEL_TOKEN_NEEDS_HUB.message);
        validate_secret_ref("spec.model.tokenSecretRef", token, why, e);
    }
}

/// A Secret reference at `path`: a valid Secret name and a key; `misplaced` says why it may not
/// be set here at all.
fn validate_secret_ref(path: &str, r: &SecretKeyRef, misplaced: Option<&str>, e: &mut Errors) {
    if let Some(why) = misplaced {
        e.add(path, why);
    }
    if !is_dns_subdomain(&r.name) {
        e.add(&format!("{path}.name"), "must be a valid Secret name");
    }
    if r.key.is_empty() {
        e.add(&format!("{path}.key"), "must not be empty");
    }
}

fn validate_dataset(spec: &FineTuneJobSpec, e: &mut Errors) {
    let d = &spec.dataset;
    if let Err(err) = Source::parse(&d.source, SourceKind::Dataset) {
        e.add("spec.dataset.source", err.to_string());
    }
    if let Some(r) = &d.credentials_secret_ref {
        let https = d.source.starts_with("https://");
        let why = (!https).then_some(cel::DATASET_CREDENTIALS_NEED_HTTPS.message);
        validate_secret_ref("spec.dataset.credentialsSecretRef", r, why, e);
    }
    match d.columns.task() {
        None => e.refuse(cel::DATASET_ONE_SHAPE),
        Some(DatasetTask::Chat) if d.format != DatasetFormat::Jsonl => {
            e.refuse(cel::CHAT_NEEDS_JSONL)
        }
        Some(_) => {}
    }
    if !(d.validation_split > 0.0 && d.validation_split <= 0.5) {
        e.add("spec.dataset.validationSplit", "must be in (0, 0.5]");
    }
    let c = &d.cleaning;
    if c.min_chars > c.max_chars {
        e.add(
            "spec.dataset.cleaning.minChars",
            format!("{} is larger than maxChars {}", c.min_chars, c.max_chars),
        );
    }
    if !(0.0..=1.0).contains(&c.max_invalid_fraction) {
        e.add(
            "spec.dataset.cleaning.maxInvalidFraction",
            "must be in [0, 1]",
        );
    }
    if !c.allowed_labels.is_empty() {
        if d.columns.task() != Some(DatasetTask::Classification) {
            e.refuse(cel::ALLOWED_LABELS_NEED_CLASSIFICATION);
        }
        let folded: BTreeSet<String> = c
            .allowed_labels
            .iter()
            .map(|l| l.trim().to_lowercase())
            .collect();
        if folded.len() != c.allowed_labels.len() {
            e.add(
                "spec.dataset.cleaning.allowedLabels",
                "labels repeat (ignoring case)",
            );
        }
        if c.allowed_labels.len() < 2 {
            e.add(
                "spec.dataset.cleaning.allowedLabels",
                "a classifier needs at least 2 labels",
            );
        }
    }
}

fn validate_method(spec: &FineTuneJobSpec, e: &mut Errors) {
    let m = &spec.method;
    let arch = spec.model.preset.architecture();
    if m.method_type == MethodType::Full && m.lora.is_some() {
        e.refuse(cel::LORA_SETTINGS_NEED_LORA);
    }
    if let Some(lora) = &m.lora {
        if lora.rank == 0 || lora.rank > arch.hidden_size {
            e.add(
                "spec.method.lora.rank",
                format!(
                    "must be in 1..={} (the hidden size of {})",
                    arch.hidden_size, spec.model.preset
                ),
            );
        }
        if lora.alpha.is_nan() || lora.alpha <= 0.0 {
            e.add("spec.method.lora.alpha", "must be positive");
        }
        if !(0.0..1.0).contains(&lora.dropout) {
            e.add("spec.method.lora.dropout", "must be in [0, 1)");
        }
        if let Some(kl) = &lora.kl_to_base {
            if !(0.0..=100.0).contains(&kl.weight) {
                e.add("spec.method.lora.klToBase.weight", "must be in [0, 100]");
            }
            if !(1..=64).contains(&kl.position_stride) {
                e.add(
                    "spec.method.lora.klToBase.positionStride",
                    "must be in 1..=64",
                );
            }
        }
        if lora.target_modules.is_empty() {
            e.add(
                "spec.method.lora.targetModules",
                "name at least one projection",
            );
        }
        let unique: BTreeSet<_> = lora.target_modules.iter().collect();
        if unique.len() != lora.target_modules.len() {
            e.refuse(cel::LORA_MODULES_UNIQUE);
        }
        if m.method_type == MethodType::Full && !lora.base_quantization.is_none() {
            e.add(
                "spec.method.lora.baseQuantization",
                "a quantized base stays frozen, and full fine-tuning trains the base weights: \
                 use type: lora, or remove baseQuantization",
            );
        }
        if m.method_type == MethodType::Full && lora.kl_to_base.is_some() {
            e.add(
                "spec.method.lora.klToBase",
                "the base it compares with is the model without its adapters, and full \
                 fine-tuning has none: use type: lora, or remove klToBase",
            );
        }
        if lora.train_label_tokens
            && spec.dataset.columns.task() != Some(DatasetTask::Classification)
        {
            e.add(
                "spec.method.lora.trainLabelTokens",
                "needs a classification dataset (dataset.columns.text and .label): the rows \
                 trained are those of the labels' tokens",
            );
        }
    }
    if let Some(sel) = &m.trainable_layers {
        match (sel.last, &sel.indices) {
            (Some(_), Some(_)) => e.add(
                "spec.method.trainableLayers",
                "set either last or indices, not both",
            ),
            (None, None) => e.add("spec.method.trainableLayers", "set last or indices"),
            (Some(n), None) if n == 0 || n > arch.num_layers => e.add(
                "spec.method.trainableLayers.last",
                format!(
                    "must be in 1..={} ({} has {} layers)",
                    arch.num_layers, spec.model.preset, arch.num_layers
                ),
            ),
            (None, Some(ix)) => {
                if ix.is_empty() {
                    e.add("spec.method.trainableLayers.indices", "must not be empty");
                }
                for (i, layer) in ix.iter().enumerate() {
                    if *layer >= arch.num_layers {
                        e.add(
                            &format!("spec.method.trainableLayers.indices[{i}]"),
                            format!(
                                "layer {layer} does not exist: {} has layers 0..{}",
                                spec.model.preset, arch.num_layers
                            ),
                        );
                    }
                }
                if ix.iter().collect::<BTreeSet<_>>().len() != ix.len() {
                    e.refuse(cel::TRAINABLE_INDICES_UNIQUE);
                }
            }
            _ => {}
        }
    }
}

fn validate_hyperparameters(spec: &FineTuneJobSpec, e: &mut Errors) {
    let h = &spec.hyperparameters;
    let arch = spec.model.preset.architecture();
    if !(h.learning_rate > 0.0 && h.learning_rate <= 1.0) {
        e.add("spec.hyperparameters.learningRate", "must be in (0, 1]");
    }
    if h.epochs == 0 {
        e.add("spec.hyperparameters.epochs", "must be at least 1");
    }
    if let Some(max) = h.max_steps {
        if max == 0 {
            e.add("spec.hyperparameters.maxSteps", "must be at least 1");
        } else if u64::from(h.warmup_steps) >= max {
            e.add(
                "spec.hyperparameters.warmupSteps",
                format!(
                    "{} warmup steps leave no training in maxSteps {max}",
                    h.warmup_steps
                ),
            );
        }
    }
    if h.batch_size == 0 {
        e.add("spec.hyperparameters.batchSize", "must be at least 1");
    }
    if h.gradient_accumulation_steps == 0 {
        e.add(
            "spec.hyperparameters.gradientAccumulationSteps",
            "must be at least 1",
        );
    }
    if h.max_sequence_length > arch.max_position_embeddings {
        e.add(
            "spec.hyperparameters.maxSequenceLength",
            format!(
                "{} exceeds the {} positions {} was trained for",
                h.max_sequence_length, arch.max_position_embeddings, spec.model.preset
            ),
        );
    }
    if h.max_sequence_length < 8 {
        e.add(
            "spec.hyperparameters.maxSequenceLength",
            "must be at least 8",
        );
    }
    if !(0.0..=1.0).contains(&h.weight_decay) {
        e.add("spec.hyperparameters.weightDecay", "must be in [0, 1]");
    }
    if !(h.max_grad_norm >= 0.0 && h.max_grad_norm.is_finite()) {
        e.add(
            "spec.hyperparameters.maxGradNorm",
            "must be a finite number ≥ 0",
        );
    }
    if h.precision == Some(Precision::Bf16) && fit::effective_gpus(spec) == 0 {
        e.add(
            "spec.hyperparameters.precision",
            "bf16 needs GPUs; CPU training (resources.gpus: 0) uses f32",
        );
    }
}

fn validate_evaluation(spec: &FineTuneJobSpec, e: &mut Errors) {
    let ev = &spec.evaluation;
    if ev.interval_steps == 0 {
        e.add("spec.evaluation.intervalSteps", "must be at least 1");
    }
    if let Some(max) = spec.hyperparameters.max_steps
        && u64::from(ev.interval_steps) > max
    {
        e.add(
            "spec.evaluation.intervalSteps",
            format!(
                "{} is beyond maxSteps {max}: no evaluation would run before the end",
                ev.interval_steps
            ),
        );
    }
    if let Some(es) = &ev.early_stopping {
        if es.patience == 0 {
            e.add(
                "spec.evaluation.earlyStopping.patience",
                "must be at least 1",
            );
        }
        if !(es.min_delta >= 0.0 && es.min_delta.is_finite()) {
            e.add(
                "spec.evaluation.earlyStopping.minDelta",
                "must be a finite number ≥ 0",
            );
        }
    }
    let o = &ev.overfitting;
    if !(o.max_gap >= 0.0 && o.max_gap.is_finite()) {
        e.add(
            "spec.evaluation.overfitting.maxGap",
            "must be a finite number ≥ 0",
        );
    }
    if !(o.max_ratio >= 1.0 && o.max_ratio.is_finite()) {
        e.add(
            "spec.evaluation.overfitting.maxRatio",
            "must be ≥ 1 (validation / training loss)",
        );
    }
    for (i, p) in ev.sample_prompts.iter().enumerate() {
        if p.trim().is_empty() {
            e.add(
                &format!("spec.evaluation.samplePrompts[{i}]"),
                "must not be blank",
            );
        }
    }
    if ev.sample_prompts.len() > 16 {
        e.add("spec.evaluation.samplePrompts", "at most 16 prompts");
    }
    if let Some(r) = &ev.retention
        && let Err(err) = Source::parse(&r.source, SourceKind::Dataset)
    {
        e.add("spec.evaluation.retention.source", err.to_string());
    }
    if let Some(t) = &ev.test_set {
        if let Err(err) = Source::parse(&t.source, SourceKind::Dataset) {
            e.add("spec.evaluation.testSet.source", err.to_string());
        }
        if spec.dataset.columns.task() != Some(DatasetTask::Classification) {
            e.add(
                "spec.evaluation.testSet",
                "needs a classification dataset (dataset.columns.text and .label)",
            );
        }
    }
}

fn validate_storage(spec: &FineTuneJobSpec, e: &mut Errors) {
    let c = &spec.checkpoints;
    let s = &c.storage;
    if s.existing_claim.is_some() && (s.size.is_some() || s.storage_class_name.is_some()) {
        e.refuse(cel::EXISTING_CLAIM_ALONE);
    }
    if let Some(size) = &s.size
        && parse_quantity_bytes(&size.0).is_none_or(|b| b < 1024.0 * 1024.0)
    {
        e.add(
            "spec.checkpoints.storage.size",
            format!("{:?} is not a size of at least 1Mi", size.0),
        );
    }
    if c.interval_steps == 0 {
        e.add("spec.checkpoints.intervalSteps", "must be at least 1");
    }
    if c.keep_last == 0 {
        e.add(
            "spec.checkpoints.keepLast",
            "must be at least 1 (resume needs a checkpoint)",
        );
    }
    if let Err(err) = check_relative_path(&spec.output.path) {
        e.add("spec.output.path", err.to_string());
    }
    if spec.output.merge_weights && spec.method.method_type == MethodType::Full {
        e.add(
            "spec.output.mergeWeights",
            "full fine-tuning already writes full weights",
        );
    }
    if let Some(t) = spec.ttl_seconds_after_finished
        && t < 0
    {
        e.add("spec.ttlSecondsAfterFinished", "must be ≥ 0");
    }
    if let Some(d) = spec.active_deadline_seconds
        && d <= 0
    {
        e.add("spec.activeDeadlineSeconds", "must be > 0");
    }
}

fn validate_resources(spec: &FineTuneJobSpec, e: &mut Errors) {
    let r = &spec.resources;
    if spec.model.preset.defaults().gpus > 0 && fit::effective_gpus(spec) == 0 {
        e.add(
            "spec.resources.gpus",
            format!(
                "{} cannot be fine-tuned on CPU; request at least one GPU",
                spec.model.preset
            ),
        );
    }
    if r.spread == Spread::Layers {
        let gpus = fit::effective_gpus(spec);
        let layers = spec.model.preset.architecture().num_layers;
        if gpus < 2 {
            e.add(
                "spec.resources.spread",
                format!(
                    "layers splits the decoder layers over the pod's GPUs and needs at least 2 \
                     (resources.gpus is {gpus})"
                ),
            );
        } else if gpus > layers {
            e.add(
                "spec.resources.spread",
                format!(
                    "layers gives every GPU at least one decoder layer: {} has {layers}, fewer \
                     than resources.gpus ({gpus})",
                    spec.model.preset
                ),
            );
        }
    }
    if let Some(g) = &r.gang_scheduling {
        validate_gang_scheduling(g, e);
    }
    if !r.gpu_resource_name.contains('/') {
        e.add(
            "spec.resources.gpuResourceName",
            "must be an extended resource name like nvidia.com/gpu",
        );
    }
    for (field, q) in [("cpu", &r.cpu), ("memory", &r.memory)] {
        if let Some(q) = q
            && parse_quantity_bytes(&q.0).is_none_or(|v| v <= 0.0)
        {
            e.add(
                &format!("spec.resources.{field}"),
                format!("{:?} is not a positive quantity", q.0),
            );
        }
    }
    if let Some(image) = &r.image
        && (image.chars().any(char::is_whitespace) || image.is_empty())
    {
        e.add(
            "spec.resources.image",
            "must be an image reference without spaces",
        );
    }
}

/// The schema says the same (one property); this check serves servers that do not validate it
/// and names the fix.
fn validate_gang_scheduling(g: &GangScheduling, e: &mut Errors) {
    if g.coscheduling.is_some() == g.volcano.is_some() {
        e.add(
            "spec.resources.gangScheduling",
            "set exactly one scheduler: coscheduling or volcano",
        );
    }
    if let Some(queue) = g.volcano.as_ref().and_then(|v| v.queue.as_deref())
        && !is_dns_subdomain(queue)
    {
        e.add(
            "spec.resources.gangScheduling.volcano.queue",
            format!("{queue:?} is not a valid queue name (lowercase DNS subdomain)"),
        );
    }
}
