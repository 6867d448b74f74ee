use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Evaluation while training: validation loss, overfitting detection, early stopping,
/// forgetting (retention perplexity) and before/after sample outputs.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EvaluationSpec {
    /// Optimizer steps between evaluations on the validation split (its first `maxRows` rows;
    /// also run at each epoch end).
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub interval_steps: u32,
    /// Validation rows scored at each evaluation (loss and label accuracy): the first `maxRows`
    /// of the validation split, which the dataset seed shuffles once, so every evaluation scores
    /// the same rows. Bounds the time and memory of an evaluation on a large dataset; the split
    /// itself (and what training sees) is unchanged.
    #[serde(default = "default_max_rows")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_rows: u32,
    /// Stop when validation loss has not improved by `minDelta` for `patience` evaluations;
    /// the best checkpoint is kept. Disabled when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStopping>,
    /// When the run is flagged as overfitting (condition `Overfitting`, metric
    /// `finetune_overfitting`).
    #[serde(default)]
    pub overfitting: OverfittingThresholds,
    /// Prompts answered greedily by the base model and by the tuned model, compared side by side
    /// in the report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 2000)))]
    pub sample_prompts: Vec<String>,
    /// New tokens generated per sample prompt.
    #[serde(default = "default_sample_tokens")]
    #[schemars(range(min = 1, max = 512))]
    pub sample_max_new_tokens: u32,
    /// General text whose perplexity is measured before and after training, to show how much
    /// general ability was lost (forgetting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionSpec>,
    /// A held-out labelled file (same format, columns, cleaning and prompt template as the
    /// dataset; never trained on) classified by the base model before training and by the tuned
    /// model after: accuracy, per-class metrics and the confusion matrix go to the report, the
    /// two accuracies to `status.metrics`. Classification datasets (`text` + `label`) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_set: Option<TestSetSpec>,
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        EvaluationSpec {
            interval_steps: default_interval(),
            max_rows: default_max_rows(),
            early_stopping: None,
            overfitting: OverfittingThresholds::default(),
            sample_prompts: Vec::new(),
            sample_max_new_tokens: default_sample_tokens(),
            retention: None,
            test_set: None,
        }
    }
}

fn default_interval() -> u32 {
    50
}
/// Default of `evaluation.maxRows`: enough rows for a validation loss to within about 1 % on
/// typical data, in seconds per evaluation on a GPU.
pub const DEFAULT_EVALUATION_MAX_ROWS: u32 = 500;

fn default_max_rows() -> u32 {
    DEFAULT_EVALUATION_MAX_ROWS
}
fn default_sample_tokens() -> u32 {
    32
}

/// Early stopping on validation loss.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EarlyStopping {
    /// Evaluations without improvement before the run stops.
    #[serde(default = "default_patience")]
    #[schemars(range(min = 1, max = 1000))]
    pub patience: u32,
    /// Smallest decrease of validation loss that counts as an improvement.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub min_delta: f64,
}

impl Default for EarlyStopping {
    fn default() -> Self {
        EarlyStopping {
            patience: default_patience(),
            min_delta: 0.0,
        }
    }
}

fn default_patience() -> u32 {
    3
}

/// Overfitting thresholds. The run is flagged when validation − training loss exceeds `maxGap`,
/// when validation / training loss exceeds `maxRatio`, or when validation loss rises for
/// `risingEvaluations` evaluations in a row while training loss falls.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OverfittingThresholds {
    /// Largest tolerated generalisation gap (validation − training loss, nats per token).
    #[serde(default = "default_max_gap")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub max_gap: f64,
    /// Largest tolerated validation / training loss ratio.
    #[serde(default = "default_max_ratio")]
    #[schemars(range(min = 1.0, max = 1000.0))]
    pub max_ratio: f64,
    /// Consecutive evaluations with rising validation loss and falling training loss that flag
    /// overfitting.
    #[serde(default = "default_rising")]
    #[schemars(range(min = 1, max = 1000))]
    pub rising_evaluations: u32,
}

impl Default for OverfittingThresholds {
    fn default() -> Self {
        OverfittingThresholds {
            max_gap: default_max_gap(),
            max_ratio: default_max_ratio(),
            rising_evaluations: default_rising(),
        }
    }
}

fn default_max_gap() -> f64 {
    0.5
}
fn default_max_ratio() -> f64 {
    2.0
}
fn default_rising() -> u32 {
    3
}

/// General text used to measure forgetting.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// A text file, one passage per line (`pvc://`, `configmap://` or `https://`).
    #[schemars(
        length(min = 1, max = 2048),
        regex(pattern = super::dataset::FILE_SOURCE_PATTERN)
    )]
    pub source: String,
    /// Passages evaluated (the first N lines).
    #[serde(default = "default_retention_rows")]
    #[schemars(range(min = 1, max = 100_000))]
    pub max_rows: u32,
    /// Also measure retention perplexity at every evaluation, not only before and after.
    #[serde(default)]
    pub every_evaluation: bool,
}

/// A held-out test file scored before and after training.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TestSetSpec {
    /// The file (`pvc://claim/path`, `configmap://name/key` or `https://…`).
    #[schemars(
        length(min = 1, max = 2048),
        regex(pattern = super::dataset::FILE_SOURCE_PATTERN)
    )]
    pub source: String,
    /// Expected SHA-256 of the file (hex), checked after download or before reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 64, max = 64), regex(pattern = super::dataset::SHA256_PATTERN))]
    pub sha256: Option<String>,
    /// Rows scored (the first ones the cleaning keeps).
    #[serde(default = "default_test_rows")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_rows: u32,
}

/// Rows of `evaluation.testSet` scored when `maxRows` is not set.
pub const DEFAULT_TEST_SET_MAX_ROWS: u32 = 1000;

fn default_test_rows() -> u32 {
    DEFAULT_TEST_SET_MAX_ROWS
}

/// Passages of the retention text evaluated when `retention.maxRows` is not set.
pub const DEFAULT_RETENTION_MAX_ROWS: u32 = 200;

fn default_retention_rows() -> u32 {
    DEFAULT_RETENTION_MAX_ROWS
}
