//! `finetune.dev/v1alpha1`: the `FineTuneJob` custom resource.

mod checkpoints;
mod dataset;
mod evaluation;
mod hyperparameters;
mod method;
mod model;
mod resources;
mod status;
mod trainer_pod;

pub use checkpoints::*;
pub use dataset::*;
pub use evaluation::*;
pub use hyperparameters::*;
pub use method::*;
pub use model::*;
pub use resources::*;
pub use status::*;
pub use trainer_pod::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A fine-tuning run of a Llama-family model on one dataset. The operator turns it into a
/// trainer pod with its volumes, resumes it from its latest checkpoint after a failure, and
/// keeps `status` true.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "finetune.dev",
    version = "v1alpha1",
    kind = "FineTuneJob",
    plural = "finetunejobs",
    singular = "finetunejob",
    shortname = "ftj",
    category = "finetune",
    namespaced,
    status = "FineTuneJobStatus",
    derive = "Default",
    derive = "PartialEq",
    doc = "A fine-tuning run of a Llama-family model (LoRA or full) on one dataset.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model.preset"}"#,
    printcolumn = r#"{"name":"Base","type":"string","jsonPath":".status.baseFormat","priority":1}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress.summary"}"#,
    printcolumn = r#"{"name":"Train-Loss","type":"number","jsonPath":".status.metrics.trainLoss"}"#,
    printcolumn = r#"{"name":"Val-Loss","type":"number","jsonPath":".status.metrics.validationLoss"}"#,
    printcolumn = r#"{"name":"Gap","type":"number","jsonPath":".status.metrics.generalizationGap"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FineTuneJobSpec {
    /// The base model to fine-tune.
    pub model: ModelSpec,
    /// The training data, how it is cleaned and split, and how rows become prompts.
    pub dataset: DatasetSpec,
    /// LoRA or full fine-tuning, which layers train, and an optional activation override.
    #[serde(default)]
    pub method: MethodSpec,
    /// Optimiser and schedule settings.
    #[serde(default)]
    pub hyperparameters: Hyperparameters,
    /// Validation, overfitting detection, early stopping, forgetting and before/after samples.
    #[serde(default)]
    pub evaluation: EvaluationSpec,
    /// Where checkpoints are stored, how often they are written and how many are kept.
    #[serde(default)]
    pub checkpoints: CheckpointSpec,
    /// Where the trained adapter (and optionally merged weights) is written.
    #[serde(default)]
    pub output: OutputSpec,
    /// Compute resources and scheduling of the trainer pod.
    #[serde(default)]
    pub resources: ResourcesSpec,
    /// Labels, annotations, ServiceAccount, pull secrets, runtime class and scheduler of the
    /// trainer pod.
    #[serde(default, skip_serializing_if = "is_default")]
    pub trainer_pod: TrainerPodSpec,
    /// When true, the trainer pod is stopped after a checkpoint and the job is Suspended; setting
    /// it back to false resumes from that checkpoint. (Kueue does not toggle it: a job with the
    /// `kueue.x-k8s.io/queue-name` label is queued through its trainer pod; see docs/kueue.md.)
    #[serde(default)]
    pub suspend: bool,
    /// How many trainer failures (non-zero exits, OOM kills) are retried, each resuming from the
    /// latest checkpoint after an exponential backoff. Evictions, preemptions and node losses do
    /// not count.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub backoff_limit: u32,
    /// Wall-clock limit, in seconds, for the time the job spends running (suspended time is not
    /// counted). The job fails with reason DeadlineExceeded when it is reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31_536_000))]
    pub active_deadline_seconds: Option<i64>,
    /// Seconds after the job finished at which its pods, ConfigMaps and Services are deleted. The
    /// FineTuneJob itself and its checkpoint volume are kept, so GitOps tools never see the object
    /// they manage vanish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub ttl_seconds_after_finished: Option<i32>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn default_backoff_limit() -> u32 {
    3
}

/// The CustomResourceDefinition: the schema derived from the types plus the CEL rules of
/// [`crate::cel`] (immutability and cross-field rules).
pub fn crd() -> Result<CustomResourceDefinition, CrdError> {
    let mut value = serde_json::to_value(FineTuneJob::crd())?;
    for version in value["spec"]["versions"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        crate::cel::add_rules(&mut version["schema"]["openAPIV3Schema"])?;
    }
    Ok(serde_json::from_value(value)?)
}

/// Why the CRD could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// A CEL rule names a schema node that does not exist.
    #[error(transparent)]
    Rule(#[from] crate::cel::MissingProperty),
    /// The CRD does not convert to or from JSON.
    #[error("the CRD does not convert: {0}")]
    Json(#[from] serde_json::Error),
    /// The CRD does not render as YAML.
    #[error("the CRD does not render as YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// The CustomResourceDefinition as YAML, exactly as committed in `crds/finetunejob.yaml`.
pub fn crd_yaml() -> Result<String, CrdError> {
    let yaml = serde_yaml::to_string(&crd()?)?;
    Ok(format!(
        "# Generated by `cargo run -p finetune-api --bin crdgen` (make crds). Do not edit.\n{yaml}"
    ))
}

/// The CRD without its CEL rules, as committed in `crds/finetunejob-pre-1.25.yaml`: for API
/// servers older than 1.25, whose clients refuse `x-kubernetes-validations` as an unknown field
/// (the operator enforces the same rules there).
pub fn crd_yaml_without_cel() -> Result<String, CrdError> {
    let yaml = serde_yaml::to_string(&FineTuneJob::crd())?;
    Ok(format!(
        "# Generated by `cargo run -p finetune-api --bin crdgen -- --without-cel` (make crds). Do not\n\
         # edit. For API servers older than 1.25 only: finetunejob.yaml adds the CEL rules.\n{yaml}"
    ))
}
