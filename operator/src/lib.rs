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
pub mod gang;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod names;
pub mod progress;
pub mod reason;
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
    /// The cluster does not serve an API a job asks for (a scheduler's PodGroup CRD).
    #[error("the cluster has no {api} API: {hint}")]
    MissingApi {
        /// The API (`group/version kind`).
        api: String,
        /// What to install or change.
        hint: &'static str,
    },
    /// The child caches were dropped before they were filled.
    #[error("the child caches stopped before their first full list")]
    Cache,
    /// Leader election failed.
    #[error("leader election: {0}")]
    Leader(String),
    /// An I/O error (metrics server, progress polling).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// One write of a reconcile's plan failed (the writes before it were made).
    #[error("{write} failed: {source}")]
    Write {
        /// The write, as `controller::plan::Write::describe` names it.
        write: String,
        /// Why.
        source: Box<Error>,
    },
}

impl Error {
    /// What the API server said, when it refused a request (its `Status` message, which names
    /// the object and the rule, e.g. `pods "x" is forbidden: exceeded quota: ...`); otherwise
    /// the error itself.
    pub fn api_message(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(status)) if !status.message.is_empty() => {
                status.message.clone()
            }
            Error::Write { source, .. } => source.api_message(),
            other => other.to_string(),
        }
    }

    /// How a reconcile that failed with this error is retried (see
    /// `controller::retry_delay`): API conflicts, throttling and server errors can pass, and so
    /// can transport errors; a request the API server refuses as invalid or forbidden, or an
    /// object the operator cannot render, stays refused until the job or the cluster changes
    /// (which triggers a reconcile by itself).
    pub fn retry_class(&self) -> RetryClass {
        match self {
            Error::Kube(kube::Error::Api(status))
                if matches!(status.code, 409 | 429) || status.code >= 500 =>
            {
                RetryClass::Congested
            }
            Error::Kube(kube::Error::Api(_)) => RetryClass::Refused,
            Error::Kube(_) | Error::Io(_) | Error::Cache | Error::Leader(_) => {
                RetryClass::Unreachable
            }
            Error::Serialize(_)
            | Error::Render(_)
            | Error::MissingField(_)
            | Error::MissingApi { .. } => RetryClass::Refused,
            Error::Write { source, .. } => source.retry_class(),
        }
    }
}

/// Why a reconcile failed, as far as retrying it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryClass {
    /// No answer from the API server (connection refused or reset, timeout, TLS): retried at a
    /// short fixed interval, so the operator is back within seconds of the server (a failed
    /// connection costs the server nothing).
    Unreachable,
    /// The server answered that it is busy or conflicted (409, 429, 5xx): exponential backoff.
    Congested,
    /// The server refused the request, or the object cannot be rendered: stays so until
    /// something changes; exponential backoff from a longer start.
    Refused,
}

impl RetryClass {
    /// Every class, for the metric's label values.
    pub const ALL: [RetryClass; 3] = [
        RetryClass::Unreachable,
        RetryClass::Congested,
        RetryClass::Refused,
    ];

    /// The class's name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryClass::Unreachable => "unreachable",
            RetryClass::Congested => "congested",
            RetryClass::Refused => "refused",
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The field manager of every server-side apply and status patch the operator makes.
pub const FIELD_MANAGER: &str = "finetune-operator";

#[cfg(test)]
mod tests {
    use super::Error;

    fn api(code: u16) -> Error {
        Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..Default::default()
        })))
    }

    #[test]
    fn refusals_are_permanent_and_congestion_is_transient() {
        use super::RetryClass::{Congested, Refused};
        for code in [409, 429, 500, 503] {
            assert_eq!(api(code).retry_class(), Congested, "{code}");
        }
        for code in [400, 403, 404, 422] {
            assert_eq!(api(code).retry_class(), Refused, "{code}");
        }
        assert_eq!(Error::Render("bad name".into()).retry_class(), Refused);
        assert_eq!(
            Error::Io(std::io::Error::other("connection refused")).retry_class(),
            super::RetryClass::Unreachable
        );
        let quota = Error::Write {
            write: "apply children (pod x)".into(),
            source: Box::new(Error::Kube(kube::Error::Api(Box::new(
                kube::core::Status {
                    code: 403,
                    message: "pods \"x\" is forbidden: exceeded quota: none".into(),
                    ..Default::default()
                },
            )))),
        };
        assert_eq!(
            quota.api_message(),
            "pods \"x\" is forbidden: exceeded quota: none"
        );
        assert_eq!(Error::Cache.api_message(), Error::Cache.to_string());
        let wrapped = Error::Write {
            write: "apply children (pod x)".into(),
            source: Box::new(api(422)),
        };
        assert_eq!(wrapped.retry_class(), Refused);
        assert!(
            wrapped
                .to_string()
                .starts_with("apply children (pod x) failed: ")
        );
    }
}
