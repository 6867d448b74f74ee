use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a FineTuneJob, written only by the operator.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FineTuneJobStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The `metadata.generation` whose spec the job started with (the operator accepted it and
    /// created the trainer's configuration). From then on only suspend, backoffLimit,
    /// activeDeadlineSeconds and ttlSecondsAfterFinished may change: the CRD's CEL rule refuses
    /// other changes on API servers that evaluate it (1.25+), and the operator keeps running the
    /// accepted spec on every server. Unset while a job has not started, so a spec refused as InvalidSpec
    /// can still be corrected in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_generation: Option<i64>,
    /// Summary of the lifecycle: Pending, Running, Succeeded, Failed or Suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// kstatus-style conditions: Ready, Progressing, Succeeded (and Complete, batch/v1 Job's name
    /// for it), Failed, Suspended, Overfitting, Stalled, StepStalled, Unschedulable, InvalidSpec,
    /// ActivationOverride.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub conditions: Vec<Condition>,
    /// Training progress reported by the trainer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Latest training and evaluation metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<TrainingMetrics>,
    /// Latest and best checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<CheckpointStatus>,
    /// Trainer pods replaced after a failure that counted against `backoffLimit`.
    #[serde(default)]
    pub restarts: u32,
    /// Trainer pods replaced after an eviction, preemption or node loss (not counted).
    #[serde(default)]
    pub disruptions: u32,
    /// When the trainer started running; cleared when the job is suspended and set again on
    /// resume (as batch/v1 Job does), so `activeDeadlineSeconds` counts running time only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Where the results are, once written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputStatus>,
    /// The commit of the base model's hub repository the job trains on: what `model.source`'s
    /// revision resolved to at the first download. Later attempts download this commit, so a
    /// branch that moves meanwhile cannot change the weights under the checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_commit: Option<String>,
    /// The format the base model's frozen weights were held in while training: the compute
    /// dtype (`bf16` on a GPU, `f32` on a CPU), or `int8` / `int4` when a LoRA job's projections
    /// were quantized (`method.lora.baseQuantization`; the embeddings, norms and LM head stay in
    /// the compute dtype).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_format: Option<String>,
    /// Where the current attempt's trainer pods stand, for a job of several pods (a gang,
    /// `resources.nodes` > 1); which rank failed and why is in the Ready condition's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<GangStatus>,
}

/// The current attempt's trainer pods of a gang, counted by state.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GangStatus {
    /// Pods of the gang (`resources.nodes`).
    pub pods: u32,
    /// Not created, or not yet running.
    pub pending: u32,
    /// Running.
    pub running: u32,
    /// Exited 0.
    pub succeeded: u32,
    /// Failed, disrupted or gone.
    pub failed: u32,
}

/// Lifecycle phase.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum JobPhase {
    /// Accepted; waiting for the trainer pod to be scheduled or to start.
    #[default]
    Pending,
    /// The trainer is running.
    Running,
    /// Training finished and the output was written.
    Succeeded,
    /// The job failed for good (invalid spec, backoff limit, deadline).
    Failed,
    /// Stopped by `suspend: true`; resumes from its checkpoint when unsuspended.
    Suspended,
}

impl JobPhase {
    /// Every phase, for metrics with one series per phase.
    pub const ALL: [JobPhase; 5] = [
        JobPhase::Pending,
        JobPhase::Running,
        JobPhase::Succeeded,
        JobPhase::Failed,
        JobPhase::Suspended,
    ];

    /// The phase's name as written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Pending => "Pending",
            JobPhase::Running => "Running",
            JobPhase::Succeeded => "Succeeded",
            JobPhase::Failed => "Failed",
            JobPhase::Suspended => "Suspended",
        }
    }

    /// Whether the job has finished for good.
    pub fn is_finished(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed)
    }
}

/// Training progress.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Optimizer steps done.
    pub step: u64,
    /// Optimizer steps planned.
    pub total_steps: u64,
    /// Current epoch (1-based).
    pub epoch: u32,
    /// Percent of the planned steps done (0-100).
    pub percent: u32,
    /// Step the current trainer resumed from (0: started fresh).
    #[serde(default)]
    pub resumed_from_step: u64,
    /// Estimated seconds to completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// Human-readable summary shown by `kubectl get ftj`, e.g. `120/400 (30%)`.
    pub summary: String,
    /// The trainer's own phase (loading, preparing-data, training, evaluating, checkpointing,
    /// exporting, done, failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer_phase: Option<String>,
}

/// Latest metrics. Losses are mean cross-entropy per response token (nats).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainingMetrics {
    /// Training loss, smoothed over the last evaluation interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    /// Loss on the whole validation split at the last evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_loss: Option<f64>,
    /// Validation minus training loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generalization_gap: Option<f64>,
    /// Lowest validation loss so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_validation_loss: Option<f64>,
    /// Step of the lowest validation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_step: Option<u64>,
    /// Validation accuracy of a classification dataset (0-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_accuracy: Option<f64>,
    /// Training throughput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Retention perplexity after / before training (forgetting; 1.0 means none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_perplexity_ratio: Option<f64>,
    /// Accuracy of the base model on `evaluation.testSet` (0-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_test_accuracy: Option<f64>,
    /// Accuracy of the tuned model on `evaluation.testSet` (0-1), once training ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
}

/// Checkpoints on the checkpoint volume.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    /// Newest verified checkpoint (directory name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<String>,
    /// Checkpoint with the best validation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<String>,
    /// Step of the newest checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_step: Option<u64>,
}

/// Where the results were written.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputStatus {
    /// Claim holding the output.
    pub claim_name: String,
    /// Directory of the output inside the claim.
    pub path: String,
    /// The LoRA adapter directory (PEFT layout), when LoRA was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// The merged-weights directory, when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<String>,
    /// The report (`report.md`) path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
}
