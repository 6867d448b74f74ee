use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Checkpointing.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// The volume checkpoints (and, by default, the output) are written to.
    #[serde(default)]
    pub storage: CheckpointStorage,
    /// Optimizer steps between checkpoints. A checkpoint is also written on SIGTERM (suspend,
    /// eviction, deletion) within the pod's grace period.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub interval_steps: u32,
    /// Newest checkpoints kept; older ones are deleted.
    #[serde(default = "default_keep_last")]
    #[schemars(range(min = 1, max = 100))]
    pub keep_last: u32,
    /// Also keep the checkpoint with the best validation loss, however old.
    #[serde(default = "super::dataset::default_true")]
    pub keep_best: bool,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            storage: CheckpointStorage::default(),
            interval_steps: default_interval(),
            keep_last: default_keep_last(),
            keep_best: true,
        }
    }
}

fn default_interval() -> u32 {
    100
}
fn default_keep_last() -> u32 {
    2
}

/// Checkpoint volume: a new PersistentVolumeClaim created for the job, or an existing one.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[derive(Default)]
pub struct CheckpointStorage {
    /// Use this existing claim instead of creating one (`size` and `storageClassName` must then
    /// be unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub existing_claim: Option<String>,
    /// Size of the claim the operator creates. Default 10Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// Storage class of the claim the operator creates; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
    /// Keep the created claim when the FineTuneJob is deleted (it is then no longer owned by it).
    #[serde(default)]
    pub retain: bool,
}

/// Where the results go.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// An existing claim for the output; the checkpoint volume when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub claim_name: Option<String>,
    /// Directory inside the output volume (relative, no `..`).
    #[serde(default = "default_output_path")]
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// Also write merged full weights in Hugging Face layout (config, safetensors, tokenizer).
    #[serde(default)]
    pub merge_weights: bool,
}

impl Default for OutputSpec {
    fn default() -> Self {
        OutputSpec {
            claim_name: None,
            path: default_output_path(),
            merge_weights: false,
        }
    }
}

fn default_output_path() -> String {
    "output".into()
}
