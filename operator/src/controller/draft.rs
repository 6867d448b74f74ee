//! The plan under construction while [`decide`](super::decide::decide) runs: the status being
//! edited, the bookkeeping beside it, and the small edits every rule shares (phase, condition,
//! the end of an Unschedulable episode, overfitting, stall detection, the disruption limit).

use std::time::Duration;

use finetune_api::{FineTuneJobStatus, JobPhase, TrainerProgress};

use super::plan::{Clock, Plan, Requeue, Write};
use crate::context::JobMemory;
use crate::reason::Reason;
use crate::status::{condition, set_condition, set_phase};

/// A plan under construction: the status being edited and the bookkeeping beside it.
pub(super) struct Draft<'a> {
    pub(super) status: FineTuneJobStatus,
    pub(super) memory: JobMemory,
    pub(super) generation: Option<i64>,
    pub(super) clock: &'a Clock,
    pub(super) forget: bool,
    pub(super) restart: Option<&'static str>,
    pub(super) unschedulable_for: Option<Duration>,
}

impl Draft<'_> {
    pub(super) fn phase(&mut self, phase: JobPhase, reason: Reason, message: &str) {
        set_phase(
            &mut self.status,
            phase,
            reason.as_str(),
            message,
            self.generation,
            &self.clock.wall,
        );
    }

    pub(super) fn condition(&mut self, type_: &str, on: bool, reason: Reason, message: &str) {
        set_condition(
            &mut self.status.conditions,
            type_,
            on,
            reason.as_str(),
            message,
            self.generation,
            &self.clock.wall,
        );
    }

    pub(super) fn has_condition(&self, type_: &str, status: Option<&str>) -> bool {
        self.status
            .conditions
            .iter()
            .any(|c| c.type_ == type_ && status.is_none_or(|s| c.status == s))
    }

    /// The trainer pod got a node: close the Unschedulable episode.
    pub(super) fn scheduled(&mut self) {
        if let Some(since) = self.memory.unschedulable_since.take() {
            self.unschedulable_for = Some(self.clock.mono.saturating_duration_since(since));
        }
        if self.has_condition(condition::UNSCHEDULABLE, Some("True")) {
            self.condition(
                condition::UNSCHEDULABLE,
                false,
                Reason::Scheduled,
                "the trainer pod was scheduled",
            );
        }
    }

    pub(super) fn overfitting(&mut self, p: &TrainerProgress) {
        if p.overfitting {
            let why = p
                .overfitting_reason
                .clone()
                .unwrap_or_else(|| "validation loss diverges from training loss".into());
            self.condition(
                condition::OVERFITTING,
                true,
                Reason::GeneralizationGap,
                &why,
            );
        } else if self.has_condition(condition::OVERFITTING, None) {
            self.condition(
                condition::OVERFITTING,
                false,
                Reason::WithinThresholds,
                "validation loss tracks training loss",
            );
        }
    }

    /// Whether the step has not advanced for `timeout` (remembering a new step when it did).
    pub(super) fn stalled(&mut self, step: u64, timeout: Duration) -> bool {
        if self.memory.step != step {
            self.memory.step = step;
            self.memory.since = self.clock.mono;
        }
        self.clock.mono.saturating_duration_since(self.memory.since) >= timeout
    }

    /// The job fails: more disruptions than the cluster should be allowed.
    pub(super) fn too_many_disruptions(mut self, last: &str, limit: u32) -> Plan {
        let msg = format!(
            "{} disruptions exceed the operator's limit of {limit} (--max-disruptions); last: \
             {last}. The cluster keeps evicting, preempting or losing the trainer's node: check \
             node health, the job's priority and the GPU nodes' taints",
            self.status.disruptions
        );
        self.phase(JobPhase::Failed, Reason::DisruptionLimitExceeded, &msg);
        self.status.completion_time = Some(self.clock.wall.clone());
        self.forget = true;
        self.done(vec![Write::Status], Requeue::AwaitChange)
    }

    pub(super) fn done(self, mut writes: Vec<Write>, requeue: Requeue) -> Plan {
        writes.retain(|w| !w.is_empty_delete());
        Plan {
            status: self.status,
            writes,
            requeue,
            memory: self.memory,
            forget: self.forget,
            restart: self.restart,
            unschedulable_for: self.unschedulable_for,
        }
    }
}
