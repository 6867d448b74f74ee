//! Pure status helpers: kstatus-style conditions and the mapping from the trainer's progress
//! document to the FineTuneJob's status.

use finetune_api::{
    CheckpointStatus, FineTuneJobStatus, JobPhase, Progress, TrainerProgress, TrainingMetrics,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types the operator sets.
pub mod condition {
    /// The job reached its goal (Succeeded) — kstatus' readiness signal.
    pub const READY: &str = "Ready";
    /// The job is moving towards its goal (pending or training).
    pub const PROGRESSING: &str = "Progressing";
    /// Training finished and the output was written.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The same as [`SUCCEEDED`], under the name batch/v1 Job gives it (`kubectl wait
    /// --for=condition=Complete`, Job-minded tools and workflows).
    pub const COMPLETE: &str = "Complete";
    /// The job failed for good.
    pub const FAILED: &str = "Failed";
    /// The job is suspended.
    pub const SUSPENDED: &str = "Suspended";
    /// The trainer flagged overfitting.
    pub const OVERFITTING: &str = "Overfitting";
    /// The job failed for good: kstatus's (and Flux's) meaning of `Stalled`, set with Failed.
    pub const STALLED: &str = "Stalled";
    /// The trainer's step has not advanced for the stall timeout. Not `Stalled`, which kstatus
    /// readers take as "failed": a slow step is a warning, not a failure.
    pub const STEP_STALLED: &str = "StepStalled";
    /// No node can take the trainer pod.
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    /// The spec is invalid, or a change to it was refused.
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

/// Sets a condition, keeping `lastTransitionTime` when the status value does not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    let status_str = if status { "True" } else { "False" };
    let message: String = message.chars().take(1024).collect();
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status != status_str {
            c.last_transition_time = now.clone();
        }
        c.status = status_str.into();
        c.reason = reason.into();
        c.message = message;
        c.observed_generation = generation;
    } else {
        conditions.push(Condition {
            type_: type_.into(),
            status: status_str.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: now.clone(),
        });
    }
}

/// Removes a condition.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// Whether a condition is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

/// The condition of this type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Sets the phase together with the summary conditions kstatus and Argo CD read (Ready,
/// Progressing, Succeeded, Failed, Suspended).
pub fn set_phase(
    status: &mut FineTuneJobStatus,
    phase: JobPhase,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    status.phase = Some(phase);
    let c = &mut status.conditions;
    let (ready, progressing, succeeded, failed, suspended) = match phase {
        JobPhase::Pending | JobPhase::Running => (false, true, false, false, false),
        JobPhase::Succeeded => (true, false, true, false, false),
        JobPhase::Failed => (false, false, false, true, false),
        JobPhase::Suspended => (false, false, false, false, true),
    };
    set_condition(c, condition::READY, ready, reason, message, generation, now);
    set_condition(
        c,
        condition::PROGRESSING,
        progressing,
        reason,
        message,
        generation,
        now,
    );
    for done in [condition::SUCCEEDED, condition::COMPLETE] {
        if succeeded || is_true(c, done) {
            set_condition(c, done, succeeded, reason, message, generation, now);
        }
    }
    if failed || is_true(c, condition::FAILED) {
        set_condition(
            c,
            condition::FAILED,
            failed,
            reason,
            message,
            generation,
            now,
        );
    }
    if failed {
        // kstatus reads Stalled=True as "failed for good" (Flux, kstatus-based tools).
        set_condition(
            c,
            condition::STALLED,
            true,
            reason,
            message,
            generation,
            now,
        );
    }
    if suspended || is_true(c, condition::SUSPENDED) {
        set_condition(
            c,
            condition::SUSPENDED,
            suspended,
            reason,
            message,
            generation,
            now,
        );
    }
}

/// Round to 4 decimals so that tiny float noise does not cause status writes.
fn round(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite())
        .map(|x| (x * 10_000.0).round() / 10_000.0)
}

/// Copies the trainer's progress document into the status (progress, metrics, checkpoints).
pub fn apply_progress(status: &mut FineTuneJobStatus, p: &TrainerProgress) {
    let percent = (p.step.min(p.total_steps) * 100)
        .checked_div(p.total_steps)
        .map_or(0, |v| u32::try_from(v).unwrap_or(100));
    status.progress = Some(Progress {
        step: p.step,
        total_steps: p.total_steps,
        epoch: p.epoch,
        percent,
        resumed_from_step: p.resumed_from_step,
        eta_seconds: p.eta_seconds.map(|s| s / 10 * 10),
        summary: format!("{}/{} ({percent}%)", p.step, p.total_steps),
        trainer_phase: Some(p.phase.as_str().into()),
    });
    status.metrics = Some(TrainingMetrics {
        train_loss: round(p.train_loss),
        validation_loss: round(p.validation_loss),
        generalization_gap: round(p.generalization_gap),
        best_validation_loss: round(p.best_validation_loss),
        best_step: p.best_step,
        validation_accuracy: round(p.validation_accuracy),
        tokens_per_second: p.tokens_per_second.map(|t| t.round()),
        retention_perplexity_ratio: round(p.retention_perplexity_ratio),
        base_test_accuracy: round(p.base_test_accuracy),
        test_accuracy: round(p.test_accuracy),
    });
    if p.model_commit.is_some() {
        // Kept once known: later attempts download this commit (see the model download step).
        status.model_commit = p.model_commit.clone();
    }
    if p.base_format.is_some() {
        status.base_format = p.base_format.clone();
    }
    if p.latest_checkpoint.is_some() || p.best_checkpoint.is_some() {
        status.checkpoints = Some(CheckpointStatus {
            latest: p.latest_checkpoint.clone(),
            best: p.best_checkpoint.clone(),
            latest_step: p.latest_checkpoint_step,
        });
    }
}

/// Parses a trainer termination message (the final progress document).
pub fn parse_termination_message(message: &str) -> Option<TrainerProgress> {
    serde_json::from_str(message.trim()).ok()
}

/// The JSON merge patch (RFC 7386) that turns `old` into `new`: changed keys with their new
/// value, removed keys as `null` (a plain merge patch of `new` would leave a field the new status
/// no longer has in place, and the write would change nothing). `None` when they are equal.
pub fn merge_diff(old: &serde_json::Value, new: &serde_json::Value) -> Option<serde_json::Value> {
    use serde_json::{Map, Value};
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut patch = Map::new();
            for (key, old_value) in o {
                match n.get(key) {
                    None => {
                        patch.insert(key.clone(), Value::Null);
                    }
                    Some(new_value) => {
                        if let Some(d) = merge_diff(old_value, new_value) {
                            patch.insert(key.clone(), d);
                        }
                    }
                }
            }
            for (key, new_value) in n {
                if !o.contains_key(key) && !new_value.is_null() {
                    patch.insert(key.clone(), new_value.clone());
                }
            }
            (!patch.is_empty()).then_some(Value::Object(patch))
        }
        _ if old == new => None,
        // A JSON merge patch cannot express an object replaced by a scalar key by key; `null`
        // is not a value the status uses, so a changed value is sent whole.
        _ => Some(new.clone()),
    }
}

/// The status after the API server refused a write of the job's children: `Ready=False` with
/// reason `ApplyFailed` and `message` (the write and the server's words), everything else as it
/// was (the phase is still what the pods say; the next successful reconcile sets `Ready` again).
pub fn with_failed_write(
    old: &FineTuneJobStatus,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> FineTuneJobStatus {
    let mut status = old.clone();
    set_condition(
        &mut status.conditions,
        condition::READY,
        false,
        crate::reason::Reason::ApplyFailed.as_str(),
        message,
        generation,
        now,
    );
    status
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH))
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut c = Vec::new();
        set_condition(&mut c, "Ready", false, "A", "m", Some(1), &t(10));
        set_condition(&mut c, "Ready", false, "B", "m2", Some(2), &t(20));
        assert_eq!(c[0].last_transition_time, t(10));
        assert_eq!(c[0].reason, "B");
        set_condition(&mut c, "Ready", true, "C", "m3", Some(2), &t(30));
        assert_eq!(c[0].last_transition_time, t(30));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn phases_set_kstatus_conditions() {
        let mut s = FineTuneJobStatus::default();
        set_phase(&mut s, JobPhase::Running, "Training", "", Some(1), &t(1));
        assert!(is_true(&s.conditions, "Progressing"));
        assert!(!is_true(&s.conditions, "Ready"));
        set_phase(&mut s, JobPhase::Succeeded, "Completed", "", Some(1), &t(2));
        assert!(is_true(&s.conditions, "Ready"));
        assert!(is_true(&s.conditions, "Succeeded"));
        assert!(
            is_true(&s.conditions, "Complete"),
            "batch/v1 Job's name for it"
        );
        assert!(!is_true(&s.conditions, "Progressing"));
        assert!(s.conditions.iter().all(|c| c.type_ != "Failed"));
        let mut f = FineTuneJobStatus::default();
        set_phase(
            &mut f,
            JobPhase::Failed,
            "BackoffLimitExceeded",
            "",
            Some(1),
            &t(3),
        );
        assert!(is_true(&f.conditions, "Failed") && is_true(&f.conditions, "Stalled"));
        assert!(f.conditions.iter().all(|c| c.type_ != "Complete"));
    }

    #[test]
    fn progress_maps_to_status() {
        let p = TrainerProgress {
            step: 30,
            total_steps: 120,
            epoch: 1,
            train_loss: Some(0.123456789),
            validation_loss: Some(0.2),
            latest_checkpoint: Some("step-00000025".into()),
            latest_checkpoint_step: Some(25),
            ..TrainerProgress::default()
        };
        let mut s = FineTuneJobStatus::default();
        apply_progress(&mut s, &p);
        let progress = s.progress.clone().unwrap_or_default();
        assert_eq!(progress.percent, 25);
        assert_eq!(progress.summary, "30/120 (25%)");
        assert_eq!(s.metrics.as_ref().and_then(|m| m.train_loss), Some(0.1235));
        assert_eq!(s.checkpoints.as_ref().and_then(|c| c.latest_step), Some(25));
        assert_eq!(s.model_commit, None);
        let downloaded = TrainerProgress {
            model_commit: Some("4b2a0c9e".into()),
            ..p.clone()
        };
        apply_progress(&mut s, &downloaded);
        assert_eq!(s.model_commit.as_deref(), Some("4b2a0c9e"));
        // A progress document without it (a later process that lost it) keeps the known commit.
        apply_progress(&mut s, &p);
        assert_eq!(s.model_commit.as_deref(), Some("4b2a0c9e"));
        // The base's format, once the weights are loaded, stays through later documents.
        assert_eq!(s.base_format, None);
        let loaded = TrainerProgress {
            base_format: Some("int4".into()),
            ..p.clone()
        };
        apply_progress(&mut s, &loaded);
        assert_eq!(s.base_format.as_deref(), Some("int4"));
        apply_progress(&mut s, &p);
        assert_eq!(s.base_format.as_deref(), Some("int4"));
    }

    #[test]
    fn merge_diff_nulls_removed_fields_and_skips_equal_ones() {
        let old = serde_json::json!({
            "phase": "Running",
            "progress": {"step": 5, "etaSeconds": 30, "summary": "5/10"},
            "conditions": [{"type": "Ready", "status": "False"}],
            "restarts": 0
        });
        let new = serde_json::json!({
            "phase": "Running",
            "progress": {"step": 0, "summary": "loading"},
            "conditions": [{"type": "Ready", "status": "False"}],
            "restarts": 0
        });
        assert_eq!(
            merge_diff(&old, &new),
            Some(
                serde_json::json!({"progress": {"step": 0, "etaSeconds": null, "summary": "loading"}})
            )
        );
        assert_eq!(merge_diff(&old, &old), None);
        let added = serde_json::json!({"phase": "Running", "restarts": 1, "output": {"path": "x"}});
        let base = serde_json::json!({"phase": "Running", "restarts": 0});
        assert_eq!(
            merge_diff(&base, &added),
            Some(serde_json::json!({"restarts": 1, "output": {"path": "x"}}))
        );
        // Lists are replaced whole (a merge patch cannot edit one element).
        let fewer = serde_json::json!({"conditions": [{"type": "Ready"}]});
        let more = serde_json::json!({"conditions": [{"type": "Ready"}, {"type": "Stalled"}]});
        assert_eq!(merge_diff(&more, &fewer), Some(fewer.clone()));
    }

    #[test]
    fn a_refused_write_shows_in_ready_and_leaves_the_rest() {
        let t = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut old = FineTuneJobStatus::default();
        set_phase(
            &mut old,
            JobPhase::Pending,
            "PodPending",
            "waiting",
            Some(1),
            &t,
        );
        let message = "apply children (pod x): pods \"x\" is forbidden: exceeded quota";
        let new = with_failed_write(&old, message, Some(2), &t);
        let ready = find_condition(&new.conditions, condition::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ApplyFailed")
        );
        assert_eq!(ready.message, message);
        assert_eq!(new.phase, Some(JobPhase::Pending));
        assert_eq!(new.observed_generation, old.observed_generation);
        let progressing =
            |s: &FineTuneJobStatus| find_condition(&s.conditions, condition::PROGRESSING).cloned();
        assert_eq!(progressing(&new), progressing(&old));
    }
}
