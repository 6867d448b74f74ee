//! Errors of the harness.

use std::path::PathBuf;

/// Everything that can go wrong while starting, driving or stopping a local cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Building or locating the Kubernetes binaries failed.
    #[error("kubernetes binaries: {0}")]
    Binaries(String),
    /// A control-plane component did not become ready in time or exited.
    #[error("control plane: {0}")]
    ControlPlane(String),
    /// A Kubernetes API call failed.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// The kubeconfig could not be read or turned into a client configuration.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A fault hook or helper was pointed at something that does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A wait ran past its deadline.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A signal could not be delivered.
    #[error("signal: {0}")]
    Signal(#[from] nix::Error),
}

impl Error {
    /// An [`Error::Io`] with context.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Whether `e` is an API error with HTTP status `code`.
pub(crate) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}
