use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The schema pattern of every file input (dataset, retention text, test set): a claim path,
/// a ConfigMap key or an https URL (`crate::source::Source` checks the rest).
pub const FILE_SOURCE_PATTERN: &str = r"^(pvc|configmap|https)://.+$";

/// The schema pattern of an expected SHA-256 (lowercase hex) of a file input.
pub const SHA256_PATTERN: &str = r"^[0-9a-f]{64}$";

/// The training data and how it becomes prompts.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSpec {
    /// Where the data is: `pvc://claim/path/file.csv` (an existing claim), `configmap://name/key`
    /// (small inline data) or `https://host/path` (downloaded by an init step; plain http is
    /// refused).
    #[schemars(
        length(min = 1, max = 2048),
        regex(pattern = FILE_SOURCE_PATTERN)
    )]
    pub source: String,
    /// Expected SHA-256 of the file (hex), checked after download or before reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 64, max = 64), regex(pattern = SHA256_PATTERN))]
    pub sha256: Option<String>,
    /// A key of a Secret in the job's namespace holding a bearer token for an `https://` source
    /// (an object store's or an internal server's). Only the download step reads it, and sends it
    /// as `Authorization: Bearer`; it never appears in the spec, a log, an event or the trainer's
    /// environment. (A presigned URL in `source` works without it, but lives in the spec.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<super::SecretKeyRef>,
    /// File format: `csv` (header row, RFC 4180 quoting) or `jsonl` (one JSON object per line).
    #[serde(default)]
    pub format: DatasetFormat,
    /// Which columns (CSV) or keys (JSONL) hold the data. Set exactly one shape: `text` + `label`
    /// (classification), `prompt` + `completion`, or `messages` (chat, JSONL only).
    #[serde(default)]
    pub columns: ColumnMapping,
    /// How each row is rendered into the prompt the model sees.
    #[serde(default)]
    pub prompt_template: PromptTemplate,
    /// Fraction of rows held out for validation (stratified by label, after deduplication).
    #[serde(default = "default_validation_split")]
    #[schemars(range(min = 0.01, max = 0.5))]
    pub validation_split: f64,
    /// Cleaning applied before the split; every dropped row is counted by reason in the report.
    #[serde(default)]
    pub cleaning: CleaningSpec,
    /// Seed of the shuffle and the train/validation split.
    #[serde(default = "default_seed")]
    #[schemars(range(min = 0, max = 4_294_967_295u64))]
    pub seed: u64,
}

/// The serde defaults (what a manifest that leaves the fields out gets), with no source.
impl Default for DatasetSpec {
    fn default() -> Self {
        DatasetSpec {
            source: String::new(),
            sha256: None,
            credentials_secret_ref: None,
            format: DatasetFormat::default(),
            columns: ColumnMapping::default(),
            prompt_template: PromptTemplate::default(),
            validation_split: default_validation_split(),
            cleaning: CleaningSpec::default(),
            seed: default_seed(),
        }
    }
}

pub(crate) fn default_seed() -> u64 {
    42
}

fn default_validation_split() -> f64 {
    0.1
}

/// File format of a dataset.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// Comma-separated values with a header row (RFC 4180 quoting, UTF-8, optional BOM).
    #[default]
    Csv,
    /// JSON Lines: one object per line.
    Jsonl,
}

/// Column (CSV) or key (JSONL) names. Exactly one shape must be set: `text` and `label`;
/// `prompt` and `completion`; or `messages`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ColumnMapping {
    /// Column with the input text of a classification row (e.g. `ReviewText`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub text: Option<String>,
    /// Column with the class label of a classification row (e.g. `SentimentLabel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub label: Option<String>,
    /// Column with the prompt of a prompt/completion row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub prompt: Option<String>,
    /// Column with the completion of a prompt/completion row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub completion: Option<String>,
    /// Key holding a chat transcript: a list of `{role, content}` objects (JSONL only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub messages: Option<String>,
}

/// The shape of a dataset, derived from which columns are mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetTask {
    /// `text` + `label`: the model learns to answer with the label word.
    Classification,
    /// `prompt` + `completion`.
    Completion,
    /// `messages`: multi-turn chat; the loss covers the assistant turns.
    Chat,
}

impl ColumnMapping {
    /// The task these columns describe, or `None` when they do not form exactly one shape.
    pub fn task(&self) -> Option<DatasetTask> {
        let shapes = [
            (
                self.text.is_some() && self.label.is_some(),
                DatasetTask::Classification,
            ),
            (
                self.prompt.is_some() && self.completion.is_some(),
                DatasetTask::Completion,
            ),
            (self.messages.is_some(), DatasetTask::Chat),
        ];
        let set = [
            self.text.is_some(),
            self.label.is_some(),
            self.prompt.is_some(),
            self.completion.is_some(),
            self.messages.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        let complete: Vec<_> = shapes
            .iter()
            .filter(|(ok, _)| *ok)
            .map(|(_, t)| *t)
            .collect();
        let expected = match complete.as_slice() {
            [DatasetTask::Chat] => 1,
            [_] => 2,
            _ => return None,
        };
        (set == expected).then(|| complete[0])
    }
}

/// How a row is rendered into the text the model is trained on. The loss covers only the
/// response (the label word or completion, plus end-of-sequence).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PromptTemplate {
    /// `llama2-chat` (`<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{instruction}{text} [/INST] {response} </s>`)
    /// or `plain` (`{instruction}{text}\n{response}`).
    #[serde(default)]
    pub style: PromptStyle,
    /// System prompt placed in the `<<SYS>>` block (llama2-chat only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub system: Option<String>,
    /// Text placed before each row's text or prompt, e.g. `Classify the sentiment of this review: `.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub instruction: Option<String>,
}

/// Prompt rendering style.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum PromptStyle {
    /// Meta's Llama 2 chat format with `[INST]` and an optional `<<SYS>>` block.
    #[default]
    #[serde(rename = "llama2-chat")]
    Llama2Chat,
    /// The instruction, the text and the response separated by a newline.
    #[serde(rename = "plain")]
    Plain,
}

/// Data cleaning rules.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CleaningSpec {
    /// Drop rows whose normalised text (case, whitespace) repeats an earlier row; duplicates
    /// never straddle the train/validation split.
    #[serde(default = "default_true")]
    pub dedupe: bool,
    /// Drop rows whose text or label is empty after trimming.
    #[serde(default = "default_true")]
    pub drop_empty: bool,
    /// Rows whose text is shorter than this many characters are dropped.
    #[serde(default = "default_min_chars")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub min_chars: u32,
    /// Rows whose text is longer than this many characters are dropped.
    #[serde(default = "default_max_chars")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_chars: u32,
    /// Normalise labels (trim, case-fold, e.g. `positive ` → `Positive`) before counting classes.
    #[serde(default = "default_true")]
    pub normalize_labels: bool,
    /// What a malformed row (wrong column count, bad quoting, invalid UTF-8 or JSON, unknown
    /// label) does: `skip` counts it in the report, `fail` stops the job naming file, line and
    /// reason.
    #[serde(default)]
    pub on_invalid_row: OnInvalidRow,
    /// Fail the job when more than this fraction of rows is invalid, even with `skip`.
    #[serde(default = "default_max_invalid_fraction")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_invalid_fraction: f64,
    /// The allowed labels of a classification dataset; rows with another label are invalid.
    /// Empty: every label seen is a class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 64)))]
    pub allowed_labels: Vec<String>,
}

impl Default for CleaningSpec {
    fn default() -> Self {
        CleaningSpec {
            dedupe: true,
            drop_empty: true,
            min_chars: default_min_chars(),
            max_chars: default_max_chars(),
            normalize_labels: true,
            on_invalid_row: OnInvalidRow::default(),
            max_invalid_fraction: default_max_invalid_fraction(),
            allowed_labels: Vec::new(),
        }
    }
}

pub(crate) fn default_true() -> bool {
    true
}
fn default_min_chars() -> u32 {
    1
}
fn default_max_chars() -> u32 {
    20_000
}
fn default_max_invalid_fraction() -> f64 {
    0.1
}

/// What an invalid row does.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnInvalidRow {
    /// Count the row by reason in the data report and go on.
    #[default]
    Skip,
    /// Stop with an error naming the file, line and reason.
    Fail,
}
