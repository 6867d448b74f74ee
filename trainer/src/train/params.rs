//! The trainer's resolved parameters (independent of the Kubernetes API types; see
//! [`crate::config`] for the mapping from `finetune_api::TrainerConfig`).

use std::path::PathBuf;

use crate::data::clean::{CleaningOptions, Format};
use crate::data::template::PromptTemplate;
use crate::model::TrainableSpec;
use crate::optim::ScheduleKind;

/// Evaluation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalParams {
    /// Evaluate every N optimizer steps (0: only at epoch ends).
    pub interval: usize,
    /// Validation rows scored per evaluation (the first ones of the split).
    pub max_rows: usize,
    /// Stop after this many evaluations without improvement (by more than `min_delta`).
    pub early_stopping_patience: Option<usize>,
    /// Minimum improvement of the validation loss.
    pub min_delta: f64,
    /// Overfitting when validation − training loss exceeds this.
    pub max_gap: f64,
    /// Overfitting when validation / training loss exceeds this.
    pub max_ratio: f64,
    /// Overfitting when validation loss rose this many evaluations in a row while training loss fell.
    pub rising_evaluations: usize,
    /// Prompts to sample before and after training.
    pub sample_prompts: Vec<String>,
    /// New tokens per sample.
    pub sample_max_new_tokens: usize,
    /// Text file (one passage per line) for the retention perplexity.
    pub retention_file: Option<PathBuf>,
    /// Rows of the retention file used.
    pub retention_max_rows: usize,
    /// Also measure retention at each evaluation.
    pub retention_every_evaluation: bool,
}

impl Default for EvalParams {
    fn default() -> Self {
        Self {
            interval: 50,
            max_rows: finetune_api::v1alpha1::DEFAULT_EVALUATION_MAX_ROWS as usize,
            early_stopping_patience: None,
            min_delta: 0.0,
            max_gap: 0.5,
            max_ratio: 1.5,
            rising_evaluations: 3,
            sample_prompts: vec![],
            sample_max_new_tokens: 16,
            retention_file: None,
            retention_max_rows: 200,
            retention_every_evaluation: false,
        }
    }
}

/// Everything one training run needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainParams {
    /// Job name for logs and the report.
    pub job: String,
    /// HF model directory (config.json + safetensors).
    pub model_dir: PathBuf,
    /// tokenizer.json.
    pub tokenizer: PathBuf,
    /// Dataset file.
    pub dataset: PathBuf,
    /// Dataset format (from the extension when `None`).
    pub format: Option<Format>,
    /// Cleaning options and column mapping.
    pub cleaning: CleaningOptions,
    /// Prompt template.
    pub template: PromptTemplate,
    /// Validation fraction.
    pub validation_split: f64,
    /// Seed of the split.
    pub data_seed: u64,
    /// What to train.
    pub method: TrainableSpec,
    /// Activation override written into the model config.
    pub activation: Option<String>,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Schedule shape.
    pub schedule: ScheduleKind,
    /// Warmup steps.
    pub warmup_steps: usize,
    /// Epochs.
    pub epochs: usize,
    /// Cap on optimizer steps.
    pub max_steps: Option<usize>,
    /// Micro-batch size.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Length-grouped micro-batches ([`crate::train::batching`]); a plain shuffle when false.
    pub group_by_length: bool,
    /// Maximum tokens per example.
    pub max_seq_len: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: off).
    pub max_grad_norm: f64,
    /// Seed of initialisation, shuffling and dropout.
    pub seed: u64,
    /// Use bf16 base weights (CUDA); f32 otherwise.
    pub bf16: bool,
    /// Activation checkpointing: keep only each decoder layer's input in the forward and
    /// recompute the layer in the backward.
    pub gradient_checkpointing: bool,
    /// Use the GPU when built with CUDA.
    pub use_gpu: bool,
    /// Evaluation settings.
    pub eval: EvalParams,
    /// Checkpoint directory.
    pub checkpoint_dir: PathBuf,
    /// Checkpoint every N optimizer steps (0: only at the end / on SIGTERM).
    pub checkpoint_interval: usize,
    /// Checkpoints kept.
    pub keep_last: usize,
    /// Keep the best checkpoint too.
    pub keep_best: bool,
    /// Output directory.
    pub output_dir: PathBuf,
    /// Also write merged full weights.
    pub merge_weights: bool,
    /// Metrics/progress server address.
    pub metrics_address: Option<String>,
    /// Termination-message file.
    pub termination_message_file: Option<PathBuf>,
}

impl TrainParams {
    /// Parameters with defaults for a model, tokenizer and dataset, writing under `work_dir`
    /// (`checkpoints/`, `output/`): LoRA r=8 on q/v, lr 2e-4 cosine, 1 epoch, batch 8.
    pub fn with_defaults(
        model_dir: impl Into<PathBuf>,
        tokenizer: impl Into<PathBuf>,
        dataset: impl Into<PathBuf>,
        work_dir: impl Into<PathBuf>,
    ) -> Self {
        let work: PathBuf = work_dir.into();
        Self {
            job: "local".into(),
            model_dir: model_dir.into(),
            tokenizer: tokenizer.into(),
            dataset: dataset.into(),
            format: None,
            cleaning: CleaningOptions::default(),
            template: PromptTemplate::default(),
            validation_split: 0.1,
            data_seed: 42,
            method: TrainableSpec::Lora(crate::model::LoraSettings {
                rank: 8,
                alpha: 16.0,
                dropout: 0.05,
                target_modules: vec!["q_proj".into(), "v_proj".into()],
                layers: None,
            }),
            activation: None,
            learning_rate: 2e-4,
            schedule: ScheduleKind::Cosine,
            warmup_steps: 0,
            epochs: 1,
            max_steps: None,
            batch_size: 8,
            grad_accum: 1,
            group_by_length: true,
            max_seq_len: 128,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            bf16: false,
            gradient_checkpointing: false,
            use_gpu: false,
            eval: EvalParams::default(),
            checkpoint_dir: work.join("checkpoints"),
            checkpoint_interval: 0,
            keep_last: 2,
            keep_best: true,
            output_dir: work.join("output"),
            merge_weights: false,
            metrics_address: None,
            termination_message_file: None,
        }
    }
}
