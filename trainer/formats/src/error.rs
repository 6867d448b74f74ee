//! Error type of the file-format crate.

use std::path::PathBuf;

/// Result alias using [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// What can be wrong with a dataset, a checkpoint manifest, a safetensors file or a path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    /// The dataset cannot be read as text at all (binary, UTF-16, a line over the limit).
    #[error("{file}:{line}: {reason}")]
    Unreadable {
        /// Dataset file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The dataset is empty or unusable after cleaning.
    #[error("data: {0}")]
    Data(String),
    /// An I/O operation failed on a path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint manifest is malformed.
    #[error("manifest: {0}")]
    Manifest(String),
    /// A safetensors file is inconsistent.
    #[error("{path}: invalid safetensors file: {reason}")]
    Safetensors {
        /// The file (or `<buffer>`).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A path leaves its mount root or is otherwise refused.
    #[error("{path}: refused: {reason}")]
    PathRefused {
        /// The path as configured.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
