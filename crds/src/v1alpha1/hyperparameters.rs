use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Optimiser (AdamW) and schedule settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Hyperparameters {
    /// Peak learning rate.
    #[serde(default = "default_learning_rate")]
    #[schemars(range(min = 1e-9, max = 1.0))]
    pub learning_rate: f64,
    /// Learning-rate schedule after warmup.
    #[serde(default)]
    pub scheduler: LrScheduler,
    /// Optimizer steps of linear warmup from 0 to the peak learning rate.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub warmup_steps: u32,
    /// Passes over the training split. Training stops at whichever of `epochs` and `maxSteps`
    /// comes first.
    #[serde(default = "default_epochs")]
    #[schemars(range(min = 1, max = 1000))]
    pub epochs: u32,
    /// Upper bound on optimizer steps; unset means `epochs` decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_steps: Option<u64>,
    /// Sequences per micro-batch.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 1024))]
    pub batch_size: u32,
    /// Micro-batches accumulated per optimizer step (effective batch = batchSize × this).
    #[serde(default = "default_accumulation")]
    #[schemars(range(min = 1, max = 1024))]
    pub gradient_accumulation_steps: u32,
    /// Micro-batches of rows of similar length (the epoch's shuffled rows cut into buckets of 50
    /// micro-batches, each sorted by length, the micro-batches shuffled again; the longest
    /// first, so a batch that does not fit fails at the first step): little padding, and memory
    /// bounded by the bucket rather than the epoch's longest row. `false`: a plain shuffle.
    #[serde(default = "default_group_by_length")]
    pub group_by_length: bool,
    /// Longest tokenised sequence; longer examples are truncated (and counted in the report).
    #[serde(default = "default_max_sequence_length")]
    #[schemars(range(min = 8, max = 32768))]
    pub max_sequence_length: u32,
    /// AdamW decoupled weight decay.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub weight_decay: f64,
    /// Global gradient-norm clipping threshold; 0 disables clipping.
    #[serde(default = "default_max_grad_norm")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub max_grad_norm: f64,
    /// Numeric precision of the frozen weights and activations: `bf16` (GPUs) or `f32` (CPU).
    /// Trainable parameters and optimizer state are always f32. Default: bf16 with GPUs, f32
    /// without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// Activation (gradient) checkpointing: the forward keeps only each decoder layer's input
    /// and the backward recomputes the layer, trading one more forward of the trained layers
    /// for activation memory that no longer grows with the number of layers. Default: on with
    /// GPUs, off without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    /// Seed of weight initialisation, dropout and data order.
    #[serde(default = "super::dataset::default_seed")]
    #[schemars(range(min = 0, max = 4_294_967_295u64))]
    pub seed: u64,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Hyperparameters {
            learning_rate: default_learning_rate(),
            scheduler: LrScheduler::default(),
            warmup_steps: 0,
            epochs: default_epochs(),
            max_steps: None,
            batch_size: default_batch_size(),
            gradient_accumulation_steps: default_accumulation(),
            group_by_length: default_group_by_length(),
            max_sequence_length: default_max_sequence_length(),
            weight_decay: 0.0,
            max_grad_norm: default_max_grad_norm(),
            precision: None,
            gradient_checkpointing: None,
            seed: super::dataset::default_seed(),
        }
    }
}

fn default_learning_rate() -> f64 {
    2e-4
}
fn default_epochs() -> u32 {
    1
}
fn default_batch_size() -> u32 {
    8
}
fn default_accumulation() -> u32 {
    1
}
fn default_group_by_length() -> bool {
    true
}
fn default_max_sequence_length() -> u32 {
    512
}
fn default_max_grad_norm() -> f64 {
    1.0
}

/// Learning-rate schedule.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    /// The peak rate throughout (after warmup).
    Constant,
    /// Linear decay to zero at the last step.
    Linear,
    /// Cosine decay to zero at the last step.
    #[default]
    Cosine,
}

/// Numeric precision.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bfloat16 weights and activations (GPUs).
    Bf16,
    /// 32-bit floats everywhere.
    F32,
}

impl Precision {
    /// Bytes per weight element.
    pub fn bytes(self) -> u64 {
        match self {
            Precision::Bf16 => 2,
            Precision::F32 => 4,
        }
    }
}
