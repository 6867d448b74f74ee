//! The FineTuneJob operator.
//!
//! Reconcile is a pipeline: [`validate`](finetune_api::validate) (pure) → [`build`] the desired
//! children (pure) → apply them with server-side apply under one field manager → derive the
//! [`status`] from the pods and the trainer's `/progress` document and write it only when it
//! changed. Pure stages are unit-tested without a cluster; the end-to-end tests run the whole
//! loop against a real API server.

pub mod args;
pub mod build;
pub mod context;
pub mod controller;
pub mod failpoints;
pub mod fetch;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod names;
pub mod progress;
pub mod server;
pub mod status;
pub mod telemetry;

pub use args::Args;
pub use context::Context;

/// Everything that can go wrong while reconciling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object could not be serialised.
    #[error("serialisation: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The trainer configuration could not be rendered.
    #[error("rendering trainer configuration: {0}")]
    Render(String),
    /// The object lacks something the API server always sets (namespace, uid).
    #[error("object is missing {0}")]
    MissingField(&'static str),
    /// The child caches were dropped before they were filled.
    #[error("the child caches stopped before their first full list")]
    Cache,
    /// Leader election failed.
    #[error("leader election: {0}")]
    Leader(String),
    /// An I/O error (metrics server, progress polling).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The field manager of every server-side apply and status patch the operator makes.
pub const FIELD_MANAGER: &str = "finetune-operator";
