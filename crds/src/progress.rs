//! The trainer's `/progress` document: how the operator learns a run's state. Trainer pods get
//! no Kubernetes credentials; the operator polls this JSON on the pod IP and copies it into the
//! FineTuneJob's status. The same document, trimmed to under 4 KiB, is the trainer container's
//! termination message, so the final state survives the pod.

use serde::{Deserialize, Serialize};

/// Port of the trainer's metrics and progress server.
pub const TRAINER_METRICS_PORT: u16 = 9090;
/// Path of the progress document on the trainer's server.
pub const PROGRESS_PATH: &str = "/progress";

/// What the trainer is doing.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TrainerPhase {
    /// Loading the model and tokenizer.
    #[default]
    Loading,
    /// Reading, cleaning and tokenising the dataset.
    PreparingData,
    /// Training steps.
    Training,
    /// Running validation, retention or sample evaluation.
    Evaluating,
    /// Writing a checkpoint.
    Checkpointing,
    /// Writing the adapter, merged weights and report.
    Exporting,
    /// Finished successfully.
    Done,
    /// Stopped with an error.
    Failed,
}

impl TrainerPhase {
    /// The phase as written in JSON (`preparing-data`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TrainerPhase::Loading => "loading",
            TrainerPhase::PreparingData => "preparing-data",
            TrainerPhase::Training => "training",
            TrainerPhase::Evaluating => "evaluating",
            TrainerPhase::Checkpointing => "checkpointing",
            TrainerPhase::Exporting => "exporting",
            TrainerPhase::Done => "done",
            TrainerPhase::Failed => "failed",
        }
    }
}

/// The progress document.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerProgress {
    /// What the trainer is doing now.
    pub phase: TrainerPhase,
    /// Optimizer steps done.
    pub step: u64,
    /// Optimizer steps planned.
    pub total_steps: u64,
    /// Current epoch (1-based; 0 before training starts).
    pub epoch: u32,
    /// Step this process resumed from (0 for a fresh start).
    #[serde(default)]
    pub resumed_from_step: u64,
    /// Training loss smoothed over the last evaluation interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    /// Validation loss at the last evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_loss: Option<f64>,
    /// Validation − training loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generalization_gap: Option<f64>,
    /// Lowest validation loss so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_validation_loss: Option<f64>,
    /// Step of the lowest validation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_step: Option<u64>,
    /// Validation accuracy (classification datasets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_accuracy: Option<f64>,
    /// Recent training throughput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Estimated seconds to completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// Newest verified checkpoint (directory name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_checkpoint: Option<String>,
    /// Step of the newest checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_checkpoint_step: Option<u64>,
    /// Checkpoint with the best validation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_checkpoint: Option<String>,
    /// Whether the run is flagged as overfitting.
    #[serde(default)]
    pub overfitting: bool,
    /// Why it is flagged (gap, ratio, or rising validation loss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overfitting_reason: Option<String>,
    /// Whether early stopping ended the run.
    #[serde(default)]
    pub early_stopped: bool,
    /// Why training stopped (max steps, epochs, early stopping, signal, error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Retention perplexity after / before training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_perplexity_ratio: Option<f64>,
    /// Accuracy of the base model on the test set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_test_accuracy: Option<f64>,
    /// Accuracy of the tuned model on the test set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    /// The commit of the base model's hub repository the weights were downloaded from (from
    /// the download step's record beside them; absent for other sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_commit: Option<String>,
    /// The format the base model's frozen weights were held in while training: the compute
    /// dtype (`bf16` on a GPU, `f32` on a CPU), or `int8` / `int4` when a LoRA job's projections
    /// were quantized (`method.lora.baseQuantization`; the embeddings, norms and LM head stay in
    /// the compute dtype).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_format: Option<String>,
    /// Output directory (relative to the output volume) once exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_dir: Option<String>,
    /// Error message when `phase` is `failed` (never contains secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
