//! The trainer's resolved parameters (independent of the Kubernetes API types; see
//! [`crate::config`] for the mapping from `finetune_api::TrainerConfig`).

use std::path::PathBuf;

use crate::data::clean::{CleaningOptions, Format};
use crate::data::template::PromptTemplate;
use crate::model::TrainableSpec;
use finetune_api::LrScheduler;

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
    /// Held-out labelled file classified before and after training (`evaluation.testSet`).
    pub test_set_file: Option<PathBuf>,
    /// Rows of the test file scored.
    pub test_set_max_rows: usize,
}

impl EvalParams {
    /// The settings of the API's evaluation section, with the resolved retention and test
    /// files.
    pub fn from_spec(
        e: &finetune_api::EvaluationSpec,
        retention_file: Option<PathBuf>,
        test_set_file: Option<PathBuf>,
    ) -> Self {
        Self {
            interval: e.interval_steps as usize,
            max_rows: e.max_rows as usize,
            early_stopping_patience: e.early_stopping.as_ref().map(|s| s.patience as usize),
            min_delta: e.early_stopping.as_ref().map_or(0.0, |s| s.min_delta),
            max_gap: e.overfitting.max_gap,
            max_ratio: e.overfitting.max_ratio,
            rising_evaluations: e.overfitting.rising_evaluations as usize,
            sample_prompts: e.sample_prompts.clone(),
            sample_max_new_tokens: e.sample_max_new_tokens as usize,
            retention_file,
            retention_max_rows: e
                .retention
                .as_ref()
                .map_or(finetune_api::v1alpha1::DEFAULT_RETENTION_MAX_ROWS, |r| {
                    r.max_rows
                }) as usize,
            retention_every_evaluation: e.retention.as_ref().is_some_and(|r| r.every_evaluation),
            test_set_file,
            test_set_max_rows: e
                .test_set
                .as_ref()
                .map_or(finetune_api::v1alpha1::DEFAULT_TEST_SET_MAX_ROWS, |t| {
                    t.max_rows
                }) as usize,
        }
    }
}

impl Default for EvalParams {
    /// The API's defaults (`evaluation` left out of the spec).
    fn default() -> Self {
        Self::from_spec(&finetune_api::EvaluationSpec::default(), None, None)
    }
}

/// Everything one training run needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainParams {
    /// Job name for logs and the report.
    pub job: String,
    /// The job's UID and training fingerprint, recorded in every checkpoint and compared on
    /// resume.
    pub run: crate::checkpoint::RunIdentity,
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
    pub schedule: LrScheduler,
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
    /// The KL-to-base penalty (`method.lora.klToBase`); `None`: the targets' loss alone.
    pub base_kl: Option<crate::train::base_kl::BaseKl>,
    /// Seed of initialisation, shuffling and dropout.
    pub seed: u64,
    /// Use bf16 base weights (CUDA); f32 otherwise.
    pub bf16: bool,
    /// Activation checkpointing: keep only each decoder layer's input in the forward and
    /// recompute the layer in the backward.
    pub gradient_checkpointing: bool,
    /// Use the GPU when built with CUDA.
    pub use_gpu: bool,
    /// Which of the visible GPUs (a data-parallel rank's `LOCAL_RANK`; 0 alone).
    pub gpu_ordinal: usize,
    /// The decoder layers split over the visible GPUs: the GPU of each layer (the trainer
    /// configuration's `layerGpus`). Empty: the whole model on `gpu_ordinal`.
    pub layer_gpus: Vec<usize>,
    /// Evaluation settings.
    pub eval: EvalParams,
    /// Checkpoint directory.
    pub checkpoint_dir: PathBuf,
    /// Directory of the quantized base cache (`None`: the base is quantized at every start).
    pub quantized_cache_dir: Option<PathBuf>,
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
    /// Parameters for a model, tokenizer and dataset, writing under `work_dir` (`checkpoints/`,
    /// `output/`), with the API's defaults: what a FineTuneJob gets when it leaves a field out
    /// (LoRA on q/v, the default hyperparameters and evaluation), on the CPU in f32.
    pub fn with_defaults(
        model_dir: impl Into<PathBuf>,
        tokenizer: impl Into<PathBuf>,
        dataset: impl Into<PathBuf>,
        work_dir: impl Into<PathBuf>,
    ) -> Self {
        let work: PathBuf = work_dir.into();
        let checkpoints = finetune_api::CheckpointSpec::default();
        let dataset_spec = finetune_api::DatasetSpec::default();
        Self {
            job: "local".into(),
            model_dir: model_dir.into(),
            tokenizer: tokenizer.into(),
            dataset: dataset.into(),
            format: None,
            cleaning: CleaningOptions::default(),
            template: PromptTemplate::default(),
            validation_split: dataset_spec.validation_split,
            data_seed: dataset_spec.seed,
            method: TrainableSpec::Lora(crate::model::LoraSettings::from_spec(
                &finetune_api::LoraSpec::default(),
                None,
            )),
            activation: None,
            bf16: false,
            gradient_checkpointing: false,
            use_gpu: false,
            gpu_ordinal: 0,
            layer_gpus: Vec::new(),
            eval: EvalParams::default(),
            checkpoint_dir: work.join("checkpoints"),
            quantized_cache_dir: None,
            checkpoint_interval: checkpoints.interval_steps as usize,
            keep_last: checkpoints.keep_last as usize,
            keep_best: checkpoints.keep_best,
            output_dir: work.join("output"),
            merge_weights: false,
            metrics_address: None,
            termination_message_file: None,
            ..Self::from_hyperparameters(&finetune_api::Hyperparameters::default())
        }
    }

    /// The optimisation settings of the API's `hyperparameters` section; everything else is
    /// empty (paths) or off, for [`Self::with_defaults`] and `config::to_params` to fill in.
    pub fn from_hyperparameters(h: &finetune_api::Hyperparameters) -> Self {
        Self {
            job: String::new(),
            run: crate::checkpoint::RunIdentity::default(),
            model_dir: PathBuf::new(),
            tokenizer: PathBuf::new(),
            dataset: PathBuf::new(),
            format: None,
            cleaning: CleaningOptions::default(),
            template: PromptTemplate::default(),
            validation_split: 0.0,
            data_seed: h.seed,
            method: TrainableSpec::Frozen,
            activation: None,
            learning_rate: h.learning_rate,
            schedule: h.scheduler,
            warmup_steps: h.warmup_steps as usize,
            epochs: h.epochs as usize,
            max_steps: h.max_steps.map(|m| m as usize),
            batch_size: h.batch_size as usize,
            grad_accum: h.gradient_accumulation_steps as usize,
            group_by_length: h.group_by_length,
            max_seq_len: h.max_sequence_length as usize,
            weight_decay: h.weight_decay,
            max_grad_norm: h.max_grad_norm,
            base_kl: None,
            seed: h.seed,
            bf16: false,
            gradient_checkpointing: false,
            use_gpu: false,
            gpu_ordinal: 0,
            layer_gpus: Vec::new(),
            eval: EvalParams::default(),
            checkpoint_dir: PathBuf::new(),
            quantized_cache_dir: None,
            checkpoint_interval: 0,
            keep_last: 0,
            keep_best: false,
            output_dir: PathBuf::new(),
            merge_weights: false,
            metrics_address: None,
            termination_message_file: None,
        }
    }
}
