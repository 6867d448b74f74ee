//! Decide: the pure heart of the reconciler. From the job, what was observed (its accepted spec,
//! its pods, node loss, the trainer's progress, what is remembered of it), the settings and the
//! clock, to a [`Plan`]: the status, the ordered writes, the requeue and what to remember. No
//! I/O, so every rule (validation, immutable fields, deadline, suspend, backoff, scheduling, node
//! loss, stall, success, failure and `backoffLimit`, disruption, TTL) is tested from YAML fixtures
//! (`operator/tests/decide.rs`).

use std::time::Duration;

use finetune_api::fit::{effective_gpus, effective_nodes};
use finetune_api::mutability::{changed_sections, mutable_fields_sentence};
use finetune_api::{FineTuneJob, FineTuneJobSpec, JobPhase, MethodType, OutputStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Unit};
use kube::ResourceExt;

use super::draft::Draft;
pub use super::plan::{Clock, Observed, Plan, Requeue, Settings, Write};
use crate::Result;
use crate::build;
use crate::gang;
use crate::lifecycle::{FAILED_MOUNT, PodOutcome, Waiting, backoff, classify};
use crate::names::ATTEMPT_LABEL;
use crate::reason::Reason;
use crate::status::{
    apply_progress, condition, find_condition, parse_termination_message, remove_condition,
};

/// How long a gang released for being partly placed waits before it is created again the first
/// time; the wait doubles with each release in a row, up to [`MAX_GANG_RETRY`].
pub const GANG_RETRY: Duration = Duration::from_secs(30);
/// The longest wait between a gang's release and its next try.
pub const MAX_GANG_RETRY: Duration = Duration::from_secs(300);

/// The wait after a gang's `releases`-th release in a row (1 for the first): [`GANG_RETRY`]
/// doubled with each release after the first, at most [`MAX_GANG_RETRY`]. A gang that can never
/// fit (without a gang scheduler) costs the scheduler and the API server one try every 5
/// minutes, not every 30 s.
pub fn gang_retry_wait(releases: u32) -> Duration {
    backoff(releases.max(1), GANG_RETRY, MAX_GANG_RETRY)
}

/// The wall-clock time `secs` after `clock`'s, to the second (RFC 3339, UTC).
fn seconds_after(clock: &Clock, secs: u64) -> String {
    let later = clock
        .wall
        .0
        .checked_add(SignedDuration::from_secs(secs.min(i64::MAX as u64) as i64))
        .unwrap_or(clock.wall.0);
    later.round(Unit::Second).unwrap_or(later).to_string()
}

/// The attempt number of a trainer pod.
pub fn pod_attempt(pod: &Pod) -> Option<u32> {
    pod.labels().get(ATTEMPT_LABEL).and_then(|a| a.parse().ok())
}

fn is_active(pod: &Pod) -> bool {
    matches!(classify(pod), PodOutcome::Pending(_) | PodOutcome::Running)
}

fn not_deleting<'a>(pods: impl Iterator<Item = &'a Pod>) -> Vec<String> {
    pods.filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.name_any())
        .collect()
}

/// The node a pod was bound to.
fn pod_node(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// When the trainer container of a pod terminated (seconds since the epoch).
fn finished_at(pod: &Pod) -> Option<i64> {
    pod.status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|t| t.0.as_second())
        .max()
}

/// The spec the job runs with: the one it started with plus any change to a mutable field, and
/// the sections of a refused change; the current spec for a job that has not started.
pub fn effective_spec(
    job: &FineTuneJob,
    accepted: Option<FineTuneJobSpec>,
) -> (FineTuneJobSpec, Option<Vec<String>>) {
    let Some(acc) = accepted else {
        return (job.spec.clone(), None);
    };
    let sections = changed_sections(&acc, &job.spec);
    if sections.is_empty() {
        (job.spec.clone(), None)
    } else {
        (acc.with_mutable_fields_of(&job.spec), Some(sections))
    }
}

/// Decides what a reconcile of `job` does.
pub fn decide(job: &FineTuneJob, obs: &Observed, s: &Settings, clock: &Clock) -> Result<Plan> {
    let mut status = job.status.clone().unwrap_or_default();
    let generation = job.metadata.generation;
    status.observed_generation = generation;
    let mut d = Draft {
        status,
        memory: obs.memory.clone(),
        generation,
        clock,
        forget: false,
        restart: None,
        unschedulable_for: None,
    };
    let started = obs.accepted.is_some();
    let (spec, refused) = effective_spec(job, obs.accepted.clone());
    let mut effective = job.clone();
    effective.spec = spec;
    let spec = &effective.spec;

    // Finished jobs: only the TTL remains to be honoured, and their spec is not judged again (a
    // stricter validation after an upgrade must not turn a Succeeded job into a Failed one).
    // The exception is a job refused as InvalidSpec before it started: once its spec validates
    // (fixed in Git, say), it starts as a new job.
    if d.status.phase.is_some_and(JobPhase::is_finished) {
        let refused_at_start = !started
            && d.status.phase == Some(JobPhase::Failed)
            && d.has_condition(condition::INVALID_SPEC, Some("True"))
            && finetune_api::validate(spec).is_ok();
        if !refused_at_start {
            return Ok(finished(d, job, &obs.pods));
        }
        d.status.phase = None;
        d.status.completion_time = None;
        remove_condition(&mut d.status.conditions, condition::INVALID_SPEC);
    }

    // Validate. An invalid spec never creates a pod. A refused change is also Stalled: kstatus
    // readers (Flux) see that what Git says cannot be reached, not a healthy job.
    match &refused {
        Some(sections) => {
            let message = format!(
                "changes to {} are refused after the job started (only {} may change); the job \
                 continues with the spec it started with",
                sections.join(", "),
                mutable_fields_sentence()
            );
            d.condition(
                condition::INVALID_SPEC,
                true,
                Reason::ImmutableFieldChanged,
                &message,
            );
            d.condition(
                condition::STALLED,
                true,
                Reason::ImmutableFieldChanged,
                &message,
            );
        }
        None => {
            let refusal_over = find_condition(&d.status.conditions, condition::STALLED)
                .is_some_and(|c| c.reason == Reason::ImmutableFieldChanged.as_str());
            if refusal_over {
                remove_condition(&mut d.status.conditions, condition::STALLED);
            }
            match finetune_api::validate(spec) {
                Err(errors) => {
                    let message = errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ");
                    d.condition(condition::INVALID_SPEC, true, Reason::InvalidSpec, &message);
                    if !started {
                        d.phase(JobPhase::Failed, Reason::InvalidSpec, &message);
                        d.status.completion_time.get_or_insert(clock.wall.clone());
                        return Ok(d.done(vec![Write::Status], Requeue::AwaitChange));
                    }
                }
                Ok(()) => remove_condition(&mut d.status.conditions, condition::INVALID_SPEC),
            }
        }
    }
    // A started job's spec is the accepted one; recorded for the CRD's immutability rule (jobs
    // started by an operator without the field get it here).
    if started && refused.is_none() && d.status.accepted_generation.is_none() {
        d.status.accepted_generation = generation;
    }
    for w in finetune_api::warnings(spec) {
        d.condition(
            w.condition,
            true,
            Reason::NotRecommended,
            &format!("{}: {}", w.path, w.message),
        );
    }

    let pods = &obs.pods;
    let attempt = d.status.restarts + d.status.disruptions;
    let ranks = effective_nodes(spec);
    let of_attempt: Vec<&Pod> = pods
        .iter()
        .filter(|p| pod_attempt(p) == Some(attempt))
        .collect();
    let gang = gang::judge(&of_attempt, ranks);
    d.status.gang = gang.status.clone();
    // Every write that ends an attempt ends all of its pods: a gang restarts whole.
    let end_attempt = |grace: Option<u32>| Write::DeletePods {
        names: not_deleting(of_attempt.iter().copied().filter(|p| is_active(p))),
        grace,
    };

    // Deadline.
    if let (Some(limit), Some(start)) = (spec.active_deadline_seconds, &d.status.start_time) {
        let elapsed = clock.wall.0.as_second() - start.0.as_second();
        if elapsed >= limit {
            let active = pods.iter().filter(|p| is_active(p)).map(|p| p.name_any());
            let delete = Write::DeletePods {
                names: active.collect(),
                grace: Some(0),
            };
            let msg = format!("ran {elapsed}s, longer than activeDeadlineSeconds {limit}");
            d.phase(JobPhase::Failed, Reason::DeadlineExceeded, &msg);
            d.status.completion_time = Some(clock.wall.clone());
            return Ok(d.done(vec![delete, Write::Status], Requeue::AwaitChange));
        }
    }

    // Suspend: stop the trainer (it checkpoints on SIGTERM), then report Suspended.
    if spec.suspend {
        let active: Vec<&Pod> = pods.iter().filter(|p| is_active(p)).collect();
        let delete = Write::DeletePods {
            names: not_deleting(active.iter().copied()),
            grace: None,
        };
        if active.is_empty() {
            // As batch/v1 Job does: the running time restarts on resume, so
            // activeDeadlineSeconds never counts suspended time.
            d.status.start_time = None;
            d.phase(
                JobPhase::Suspended,
                Reason::Suspended,
                "suspended; resumes from its latest checkpoint when spec.suspend is false",
            );
            return Ok(d.done(vec![delete, Write::Status], Requeue::AwaitChange));
        }
        d.phase(
            JobPhase::Running,
            Reason::Suspending,
            "stopping the trainer after a checkpoint",
        );
        return Ok(d.done(
            vec![delete, Write::Status],
            Requeue::After(Duration::from_secs(2)),
        ));
    }

    let plan = match gang.outcome.clone() {
        None => {
            // A gang released for being partly placed waits before it is created again.
            if let Some(at) = d.memory.gang_retry_at.filter(|at| *at > clock.mono) {
                let left = at.duration_since(clock.mono).as_secs().max(1);
                // The time, not a countdown: the message stays true until the next try.
                let msg = format!(
                    "the gang's {ranks} pods could not all be placed (release {} in a row); \
                     creating them again at {}",
                    d.memory.gang_releases.max(1),
                    seconds_after(clock, left)
                );
                d.phase(JobPhase::Pending, Reason::Unschedulable, &msg);
                return Ok(d.done(
                    vec![Write::Status],
                    Requeue::After(Duration::from_secs(left)),
                ));
            }
            // Wait out the backoff after a counted failure, measured from when it ended.
            if d.status.restarts > 0 {
                let wait = backoff(d.status.restarts, s.base_backoff, s.max_backoff);
                let ended = pods
                    .iter()
                    .filter(|p| pod_attempt(p) == attempt.checked_sub(1))
                    .filter_map(finished_at)
                    .max();
                if let Some(ended) = ended {
                    let ready_at = ended + wait.as_secs() as i64;
                    let now = clock.wall.0.as_second();
                    if now < ready_at {
                        let left = (ready_at - now).max(1) as u64;
                        let msg = format!(
                            "retrying in {left}s (restart {} of {})",
                            d.status.restarts, spec.backoff_limit
                        );
                        d.phase(JobPhase::Pending, Reason::BackoffAfterFailure, &msg);
                        return Ok(d.done(
                            vec![Write::Status],
                            Requeue::After(Duration::from_secs(left)),
                        ));
                    }
                }
            }
            if !obs.leftovers.is_empty() {
                let msg = format!(
                    "waiting for {} of an earlier job with this name to be deleted",
                    obs.leftovers.join(", ")
                );
                d.phase(JobPhase::Pending, Reason::WaitingForPreviousJob, &msg);
                return Ok(d.done(vec![Write::Status], Requeue::After(Duration::from_secs(2))));
            }
            let children = build::children(&effective, &s.build, attempt)?;
            if d.status.accepted_generation.is_none() {
                d.status.accepted_generation = generation;
            }
            // Old attempts' pods are kept only for the previous attempt (for its logs), and none
            // of them keeps running (a gang's survivors).
            let stale = pods.iter().filter(|p| {
                pod_attempt(p).is_some_and(|a| a + 1 < attempt || a < attempt && is_active(p))
            });
            let what = if ranks > 1 {
                format!("{ranks} trainer pods (a gang)")
            } else {
                "trainer pod".to_string()
            };
            let msg = if attempt == 0 {
                format!("{what} created")
            } else {
                format!("{what} for attempt {attempt} created; resuming from the latest checkpoint")
            };
            d.phase(JobPhase::Pending, Reason::PodCreated, &msg);
            // The pod's own events (created, scheduled, started) trigger the next reconcile.
            d.done(
                vec![
                    Write::ApplyChildren(Box::new(children)),
                    Write::DeletePods {
                        names: not_deleting(stale),
                        grace: None,
                    },
                    Write::Status,
                ],
                Requeue::AwaitChange,
            )
        }
        Some((_, PodOutcome::Pending(Waiting::Unschedulable(msg)))) if gang.partially_placed => {
            // Without a gang scheduler the default scheduler places a gang's pods one by one:
            // ranks that got a node would hold its GPUs, waiting for one that cannot get any.
            // The whole gang is released and created again later.
            d.memory.unschedulable_since.get_or_insert(clock.mono);
            d.memory.gang_releases = d.memory.gang_releases.saturating_add(1);
            let wait = gang_retry_wait(d.memory.gang_releases);
            d.memory.gang_retry_at = Some(clock.mono + wait);
            d.condition(condition::UNSCHEDULABLE, true, Reason::Unschedulable, &msg);
            let msg = format!(
                "the gang cannot be placed whole ({msg}); its placed pods were released so they \
                 hold no GPUs, and it is created again in {}s (release {} in a row; the wait \
                 doubles with each, up to {}s; a gang scheduler avoids this: see \
                 docs/distributed.md)",
                wait.as_secs(),
                d.memory.gang_releases,
                MAX_GANG_RETRY.as_secs()
            );
            d.phase(JobPhase::Pending, Reason::Unschedulable, &msg);
            d.done(
                vec![end_attempt(Some(0)), Write::Status],
                Requeue::After(wait),
            )
        }
        Some((_, PodOutcome::Pending(waiting))) => {
            // A pod the kubelet cannot set up says only ContainerCreating; observe found why.
            let waiting = match waiting {
                Waiting::Starting if !obs.unmountable.is_empty() => Waiting::Blocked {
                    reason: FAILED_MOUNT.to_string(),
                    message: obs.unmountable.join("; "),
                },
                other => other,
            };
            match waiting {
                Waiting::Unschedulable(msg) => {
                    d.memory.unschedulable_since.get_or_insert(clock.mono);
                    d.condition(condition::UNSCHEDULABLE, true, Reason::Unschedulable, &msg);
                    let gpus = effective_gpus(spec);
                    d.phase(
                        JobPhase::Pending,
                        Reason::Unschedulable,
                        &format!(
                            "no node can take the trainer pod ({gpus} GPU(s) requested): {msg}"
                        ),
                    );
                }
                Waiting::Gated(msg) => d.phase(
                    JobPhase::Pending,
                    Reason::SchedulingGated,
                    &format!("the trainer pod waits for admission (scheduling gates): {msg}"),
                ),
                Waiting::Blocked { reason, message } => {
                    let hint = match reason.as_str() {
                        "CreateContainerConfigError" => {
                            " (a Secret or ConfigMap the pod names is missing: check \
                             model.tokenSecretRef and the dataset's ConfigMap)"
                        }
                        FAILED_MOUNT => {
                            " (a ConfigMap a volume names is missing or lacks the key: the \
                             dataset's, retention set's or test set's configMap source, or \
                             caBundle; the pod starts once it exists)"
                        }
                        "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" => {
                            " (the trainer image cannot be pulled: check the operator's \
                             --trainer-image and the registry's pull secret)"
                        }
                        _ => "",
                    };
                    d.phase(
                        JobPhase::Pending,
                        Reason::Reported(reason),
                        &format!("the trainer pod cannot start: {message}{hint}"),
                    );
                }
                Waiting::Starting => d.phase(
                    JobPhase::Pending,
                    Reason::PodPending,
                    "waiting for the trainer pod to start",
                ),
            }
            // A waiting pod costs nothing: its next change (scheduled, started) triggers the
            // next reconcile through the pod watch.
            d.done(vec![Write::Status], Requeue::AwaitChange)
        }
        Some((pod, PodOutcome::Running)) => {
            d.scheduled();
            // Placed whole: a later release starts the waits from the first again.
            d.memory.gang_releases = 0;
            if obs.node_lost {
                d.status.disruptions += 1;
                d.restart = Some("disruption");
                if d.status.disruptions > s.max_disruptions {
                    let lost = format!("node {} is gone", pod_node(pod));
                    let mut plan = d.too_many_disruptions(&lost, s.max_disruptions);
                    plan.writes.insert(0, end_attempt(Some(0)));
                    plan.writes.retain(|w| !w.is_empty_delete());
                    return Ok(plan);
                }
                let node = pod_node(pod);
                let msg = format!(
                    "node {node} is gone; rescheduling from the latest checkpoint (not counted against backoffLimit)"
                );
                d.phase(JobPhase::Pending, Reason::NodeLost, &msg);
                return Ok(d.done(
                    vec![end_attempt(Some(0)), Write::Status],
                    Requeue::After(Duration::from_secs(1)),
                ));
            }
            d.status
                .start_time
                .get_or_insert_with(|| clock.wall.clone());
            let mut reason = Reason::Training;
            if let Some(p) = &obs.progress {
                apply_progress(&mut d.status, p);
                d.overfitting(p);
                if d.stalled(p.step, s.stall_timeout) {
                    reason = Reason::Stalled;
                    d.condition(
                        condition::STEP_STALLED,
                        true,
                        Reason::NoProgress,
                        &format!("step {} has not advanced for {:?}", p.step, s.stall_timeout),
                    );
                } else if d.has_condition(condition::STEP_STALLED, None) {
                    d.condition(
                        condition::STEP_STALLED,
                        false,
                        Reason::Progressing,
                        "steps advance",
                    );
                }
            }
            let summary = d
                .status
                .progress
                .as_ref()
                .map(|p| p.summary.clone())
                .unwrap_or_else(|| "trainer starting".into());
            d.phase(JobPhase::Running, reason, &summary);
            d.done(vec![Write::Status], Requeue::After(s.progress_interval))
        }
        Some((_, PodOutcome::Succeeded(message))) => {
            d.scheduled();
            let final_progress = parse_termination_message(&message);
            if let Some(p) = &final_progress {
                apply_progress(&mut d.status, p);
                d.overfitting(p);
            }
            let out = build::plan_volumes(&effective, &s.build)?;
            d.status.output = Some(OutputStatus {
                claim_name: out.output_claim,
                path: spec.output.path.clone(),
                adapter: (spec.method.method_type == MethodType::Lora)
                    .then(|| format!("{}/adapter", spec.output.path)),
                merged: (spec.output.merge_weights || spec.method.method_type == MethodType::Full)
                    .then(|| format!("{}/merged", spec.output.path)),
                report: Some(format!("{}/report.md", spec.output.path)),
            });
            d.status
                .start_time
                .get_or_insert_with(|| clock.wall.clone());
            d.status.completion_time = Some(clock.wall.clone());
            let why = final_progress
                .and_then(|p| p.stop_reason)
                .unwrap_or_else(|| "training finished".into());
            d.phase(JobPhase::Succeeded, Reason::Completed, &why);
            d.forget = true;
            d.done(vec![Write::Status], Requeue::AwaitChange)
        }
        Some((_, PodOutcome::Failed(failure))) => {
            d.status.restarts += 1;
            d.restart = Some(if failure.reason == "OOMKilled" {
                "oom"
            } else {
                "failure"
            });
            if d.status.restarts > spec.backoff_limit {
                let msg = format!(
                    "{} failures exceed backoffLimit {}; last: {}",
                    d.status.restarts, spec.backoff_limit, failure.message
                );
                d.phase(JobPhase::Failed, Reason::BackoffLimitExceeded, &msg);
                d.status.completion_time = Some(clock.wall.clone());
                d.forget = true;
                return Ok(d.done(vec![end_attempt(None), Write::Status], Requeue::AwaitChange));
            }
            let wait = backoff(d.status.restarts, s.base_backoff, s.max_backoff);
            let msg = format!(
                "{} (restart {} of {}, next attempt in {}s from the latest checkpoint)",
                failure.message,
                d.status.restarts,
                spec.backoff_limit,
                wait.as_secs()
            );
            d.phase(JobPhase::Pending, Reason::Reported(failure.reason), &msg);
            d.done(
                vec![end_attempt(None), Write::Status],
                Requeue::After(wait.max(Duration::from_secs(1))),
            )
        }
        Some((_, PodOutcome::Disrupted(msg))) => {
            d.status.disruptions += 1;
            d.restart = Some("disruption");
            if d.status.disruptions > s.max_disruptions {
                let mut plan = d.too_many_disruptions(&msg, s.max_disruptions);
                plan.writes.insert(0, end_attempt(None));
                plan.writes.retain(|w| !w.is_empty_delete());
                return Ok(plan);
            }
            d.phase(
                JobPhase::Pending,
                Reason::Disrupted,
                &format!("{msg}; rescheduling (not counted against backoffLimit)"),
            );
            d.done(
                vec![end_attempt(None), Write::Status],
                Requeue::After(Duration::from_secs(1)),
            )
        }
    };
    Ok(plan)
}

/// A finished job: write the status, and once `ttlSecondsAfterFinished` has passed since
/// completion delete its pods, ConfigMap, Service and NetworkPolicy (the job and its claim stay).
fn finished(d: Draft<'_>, job: &FineTuneJob, pods: &[Pod]) -> Plan {
    let (Some(ttl), Some(done)) = (
        job.spec.ttl_seconds_after_finished,
        &d.status.completion_time,
    ) else {
        return d.done(vec![Write::Status], Requeue::AwaitChange);
    };
    let left = done.0.as_second() + i64::from(ttl) - d.clock.wall.0.as_second();
    if left > 0 {
        return d.done(
            vec![Write::Status],
            Requeue::After(Duration::from_secs(left as u64)),
        );
    }
    let names = not_deleting(pods.iter());
    d.done(
        vec![
            Write::Status,
            Write::DeletePods { names, grace: None },
            Write::DeleteFinishedChildren,
        ],
        Requeue::AwaitChange,
    )
}
