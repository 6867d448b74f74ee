//! Error type of the trainer library.

use std::path::PathBuf;

/// Result alias using [`TrainerError`].
pub type Result<T> = std::result::Result<T, TrainerError>;

/// Everything that can go wrong while preparing data, training, or checkpointing.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// An I/O operation failed on a path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// JSON (de)serialisation failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// The tokenizer failed to load or encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A dataset row is invalid and the policy is to fail.
    #[error("{file}:{line}: invalid row: {reason}")]
    InvalidRow {
        /// Dataset file.
        file: String,
        /// 1-based line number where the row starts.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A required weight is missing or has the wrong shape.
    #[error("weight {name}: {reason}")]
    Weight {
        /// HF tensor name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The metrics registry could not be built.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A foreign checkpoint to import (a llama2.c `model.bin`) is malformed.
    #[error("{path}: {reason}")]
    Import {
        /// The file being imported.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration is inconsistent.
    #[error("configuration: {0}")]
    Config(String),
    /// A checkpoint is missing, partial, or fails verification.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// Checkpoint directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The dataset is empty or unusable after cleaning.
    #[error("data: {0}")]
    Data(String),
    /// A dataset, manifest, safetensors file or input path failed validation (see
    /// `finetune_formats::Error`).
    #[error(transparent)]
    Format(#[from] finetune_formats::Error),
    /// A collective of data-parallel training failed: a rank left, hung, was refused or called
    /// something else (the process exits with `distributed::COLLECTIVE_EXIT_CODE`).
    #[error("collective (rank {rank}): {reason}")]
    Collective {
        /// The rank that saw the failure.
        rank: usize,
        /// What happened, naming the other rank.
        reason: String,
    },
    /// A CPU worker thread of a step could not start or panicked.
    #[error("CPU worker: {0}")]
    Worker(String),
}

impl TrainerError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
