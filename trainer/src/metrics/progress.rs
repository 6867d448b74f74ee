//! The progress document the operator polls.

use serde::{Deserialize, Serialize};

/// Trainer phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Loading the model.
    #[default]
    Loading,
    /// Reading and tokenising the dataset.
    PreparingData,
    /// Training.
    Training,
    /// Evaluating.
    Evaluating,
    /// Writing a checkpoint.
    Checkpointing,
    /// Writing outputs.
    Exporting,
    /// Finished.
    Done,
    /// Failed.
    Failed,
}

/// `/progress` JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Phase.
    pub phase: Phase,
    /// Optimizer steps done.
    pub step: usize,
    /// Total optimizer steps.
    pub total_steps: usize,
    /// Fractional epoch.
    pub epoch: f64,
    /// Latest (smoothed) training loss.
    pub train_loss: Option<f64>,
    /// Latest validation loss.
    pub validation_loss: Option<f64>,
    /// Generalisation gap.
    pub generalization_gap: Option<f64>,
    /// Latest validation accuracy.
    pub validation_accuracy: Option<f64>,
    /// Whether overfitting is flagged.
    pub overfitting: bool,
    /// Seconds to completion (estimate).
    pub eta_seconds: Option<f64>,
    /// Latest checkpoint directory.
    pub latest_checkpoint: Option<String>,
    /// Best checkpoint directory.
    pub best_checkpoint: Option<String>,
    /// Human-readable message (e.g. why it stopped, or the error).
    pub message: Option<String>,
}
