//! The reasons the operator writes into a job's conditions and events. Each is spelled and
//! documented once here, and whether it is a warning is decided once ([`Reason::is_warning`]);
//! reasons that the kubelet or the trainer reported pass through as [`Reason::Reported`].

use std::fmt;

use crate::lifecycle::BLOCKING_WAIT_REASONS;

/// Why a job is in its phase, or why one of its conditions has its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The trainer pod got a node (closes an Unschedulable episode).
    Scheduled,
    /// No node can take the trainer pod.
    Unschedulable,
    /// The trainer pod waits for scheduling gates (e.g. a queue's admission).
    SchedulingGated,
    /// The trainer pod exists and waits to start.
    PodPending,
    /// The trainer pod was created.
    PodCreated,
    /// Children of an earlier job with the same name (deleted and re-created) are still being
    /// deleted; the pod is created once they are gone.
    WaitingForPreviousJob,
    /// The trainer runs and its steps advance.
    Training,
    /// The trainer runs but its step has not advanced for the stall timeout.
    Stalled,
    /// The Stalled condition's reason while the step does not advance.
    NoProgress,
    /// The Stalled condition's reason once steps advance again.
    Progressing,
    /// Validation loss diverges from training loss (the Overfitting condition).
    GeneralizationGap,
    /// Validation loss tracks training loss again.
    WithinThresholds,
    /// The trainer finished.
    Completed,
    /// The spec does not validate.
    InvalidSpec,
    /// A change to an immutable field after the job started was refused.
    ImmutableFieldChanged,
    /// A spec setting is allowed but not recommended.
    NotRecommended,
    /// The job ran longer than `activeDeadlineSeconds`.
    DeadlineExceeded,
    /// `spec.suspend` is true and the trainer is stopped.
    Suspended,
    /// `spec.suspend` is true and the trainer is being stopped.
    Suspending,
    /// Waiting out the backoff after a failure before the next attempt.
    BackoffAfterFailure,
    /// More failures than `backoffLimit`.
    BackoffLimitExceeded,
    /// The trainer's node is gone; the job reschedules.
    NodeLost,
    /// The trainer pod was evicted or preempted; the job reschedules.
    Disrupted,
    /// More disruptions than the operator's `--max-disruptions`.
    DisruptionLimitExceeded,
    /// The API server refused a write of the job's children (the message says which and why);
    /// the operator retries with exponential backoff.
    ApplyFailed,
    /// A reason reported by the kubelet or the trainer, as written (e.g. `OOMKilled`, `Error`,
    /// `ImagePullBackOff`, `CreateContainerConfigError`).
    Reported(String),
}

/// Reported reasons, besides the pod's blocking wait reasons, that are warnings: the trainer
/// failed.
const FAILURE_REPORTS: [&str; 2] = ["OOMKilled", "Error"];

impl Reason {
    /// Every reason the operator itself decides (all but [`Reason::Reported`]).
    pub const OWN: &[Reason] = &[
        Reason::Scheduled,
        Reason::Unschedulable,
        Reason::SchedulingGated,
        Reason::PodPending,
        Reason::PodCreated,
        Reason::WaitingForPreviousJob,
        Reason::Training,
        Reason::Stalled,
        Reason::NoProgress,
        Reason::Progressing,
        Reason::GeneralizationGap,
        Reason::WithinThresholds,
        Reason::Completed,
        Reason::InvalidSpec,
        Reason::ImmutableFieldChanged,
        Reason::NotRecommended,
        Reason::DeadlineExceeded,
        Reason::Suspended,
        Reason::Suspending,
        Reason::BackoffAfterFailure,
        Reason::BackoffLimitExceeded,
        Reason::NodeLost,
        Reason::Disrupted,
        Reason::DisruptionLimitExceeded,
        Reason::ApplyFailed,
    ];

    /// The reason as written into conditions and events (UpperCamelCase).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Scheduled => "Scheduled",
            Self::Unschedulable => "Unschedulable",
            Self::SchedulingGated => "SchedulingGated",
            Self::PodPending => "PodPending",
            Self::PodCreated => "PodCreated",
            Self::WaitingForPreviousJob => "WaitingForPreviousJob",
            Self::Training => "Training",
            Self::Stalled => "Stalled",
            Self::NoProgress => "NoProgress",
            Self::Progressing => "Progressing",
            Self::GeneralizationGap => "GeneralizationGap",
            Self::WithinThresholds => "WithinThresholds",
            Self::Completed => "Completed",
            Self::InvalidSpec => "InvalidSpec",
            Self::ImmutableFieldChanged => "ImmutableFieldChanged",
            Self::NotRecommended => "NotRecommended",
            Self::DeadlineExceeded => "DeadlineExceeded",
            Self::Suspended => "Suspended",
            Self::Suspending => "Suspending",
            Self::BackoffAfterFailure => "BackoffAfterFailure",
            Self::BackoffLimitExceeded => "BackoffLimitExceeded",
            Self::NodeLost => "NodeLost",
            Self::Disrupted => "Disrupted",
            Self::DisruptionLimitExceeded => "DisruptionLimitExceeded",
            Self::ApplyFailed => "ApplyFailed",
            Self::Reported(r) => r,
        }
    }

    /// The reason a condition or event carries, as a value: one of the operator's own, or
    /// [`Reason::Reported`].
    pub fn parse(s: &str) -> Self {
        Self::OWN
            .iter()
            .find(|r| r.as_str() == s)
            .cloned()
            .unwrap_or_else(|| Self::Reported(s.to_string()))
    }

    /// Whether the job's event for this reason is a Warning (the job cannot make progress
    /// without attention, lost work or failed) rather than Normal.
    pub fn is_warning(&self) -> bool {
        match self {
            Self::Unschedulable
            | Self::Stalled
            | Self::NodeLost
            | Self::Disrupted
            | Self::InvalidSpec
            | Self::DeadlineExceeded
            | Self::BackoffLimitExceeded
            | Self::DisruptionLimitExceeded
            | Self::ApplyFailed => true,
            Self::Reported(r) => {
                FAILURE_REPORTS.contains(&r.as_str()) || BLOCKING_WAIT_REASONS.contains(&r.as_str())
            }
            _ => false,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_own_reason_parses_back_to_itself() {
        for r in Reason::OWN {
            assert_eq!(&Reason::parse(r.as_str()), r);
            assert!(!r.as_str().is_empty() && r.as_str().chars().all(char::is_alphanumeric));
        }
        assert_eq!(
            Reason::parse("OOMKilled"),
            Reason::Reported("OOMKilled".into())
        );
    }

    #[test]
    fn warnings_are_the_reasons_that_need_attention() {
        assert!(Reason::Unschedulable.is_warning());
        assert!(Reason::parse("OOMKilled").is_warning());
        assert!(Reason::parse("CreateContainerConfigError").is_warning());
        assert!(!Reason::Training.is_warning());
        assert!(!Reason::Completed.is_warning());
        assert!(!Reason::parse("SomethingNew").is_warning());
    }
}
