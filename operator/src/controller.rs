//! The reconciler: validate → build → apply (server-side apply, one field manager) → status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use finetune_api::fit::effective_gpus;
use finetune_api::{
    FineTuneJob, FineTuneJobSpec, FineTuneJobStatus, JOB_LABEL, JobPhase, MethodType, OutputStatus,
};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use tracing::{info, instrument, warn};

use crate::build::{self, Children, name_and_namespace};
use crate::context::{Context, JobMemory};
use crate::lifecycle::{PodOutcome, backoff, classify};
use crate::names::{self, ATTEMPT_LABEL};
use crate::status::{
    apply_progress, condition, merge_diff, parse_termination_message, remove_condition,
    set_condition, set_phase,
};
use crate::{Error, FIELD_MANAGER, Result};
use finetune_api::mutability::{changed_sections, mutable_fields_sentence};

/// Key of the accepted spec in the trainer ConfigMap.
pub const ACCEPTED_SPEC_KEY: &str = "spec.json";

/// Runs the controller until a shutdown signal.
pub async fn run(ctx: Arc<Context>) {
    let Some(writers) = ctx.take_cache_writers() else {
        warn!("the controller of this context already runs");
        return;
    };
    let client = ctx.client.clone();
    let ns = ctx.args.watch_namespace.clone();
    let children = watcher::Config::default().labels(JOB_LABEL);
    // Jobs, trainer pods and ConfigMaps are cached without their managed fields (a large share
    // of every object, never read here); reconciles read children from these caches.
    let (job_store, job_writer) = reflector::store();
    let jobs = watcher(
        scoped::<FineTuneJob>(&client, &ns),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .modify(|j| j.managed_fields_mut().clear())
    .reflect(job_writer)
    .applied_objects();
    let pods = watcher(scoped::<Pod>(&client, &ns), children.clone())
        .default_backoff()
        .modify(|p| p.managed_fields_mut().clear())
        .reflect(writers.pods)
        .touched_objects();
    let config_maps = watcher(scoped::<ConfigMap>(&client, &ns), children.clone())
        .default_backoff()
        .modify(|c| c.managed_fields_mut().clear())
        .reflect(writers.config_maps)
        .touched_objects();
    let controller = Controller::for_stream(jobs, job_store)
        .owns_stream(pods)
        .owns_stream(config_maps)
        .owns(scoped::<Service>(&client, &ns), children.clone())
        .owns(scoped::<PersistentVolumeClaim>(&client, &ns), children);
    let store = controller.store();
    let gauge_ctx = ctx.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let mut counts = std::collections::HashMap::new();
            let jobs = store.state();
            prune_memory(&gauge_ctx, &jobs);
            for job in jobs {
                let phase = job
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .unwrap_or_default();
                *counts.entry(phase).or_insert(0i64) += 1;
            }
            for phase in JobPhase::ALL {
                gauge_ctx
                    .metrics
                    .jobs
                    .with_label_values(&[phase.as_str()])
                    .set(counts.get(&phase).copied().unwrap_or(0));
            }
        }
    });
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "reconcile failed");
            }
        })
        .await;
}

fn scoped<K>(client: &kube::Client, ns: &str) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    if ns.is_empty() {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), ns)
    }
}

/// Retry failed reconciliations after a short delay (the controller adds its own backoff).
pub fn error_policy(_job: Arc<FineTuneJob>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(%error, "requeueing after error");
    Action::requeue(Duration::from_secs(5))
}

/// Reconciles one FineTuneJob.
#[instrument(skip_all, fields(namespace = job.namespace().unwrap_or_default(), job = job.name_any()))]
pub async fn reconcile(job: Arc<FineTuneJob>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_job(&job, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconcile_total
        .with_label_values(&[label])
        .inc();
    result
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn pod_attempt(pod: &Pod) -> Option<u32> {
    pod.labels().get(ATTEMPT_LABEL).and_then(|a| a.parse().ok())
}

fn is_active(pod: &Pod) -> bool {
    matches!(classify(pod), PodOutcome::Pending(_) | PodOutcome::Running)
}

/// The spec the job runs with: the one it started with (recorded in its ConfigMap) plus any
/// change to a mutable field, or the current one for a job that has not started.
fn effective_spec(
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

async fn reconcile_job(job: &FineTuneJob, ctx: &Context) -> Result<Action> {
    if job.meta().deletion_timestamp.is_some() {
        // Owner references make the garbage collector delete the children.
        return Ok(Action::await_change());
    }
    let (name, ns) = name_and_namespace(job)?;
    let seen = job.resource_version();
    if seen.is_some()
        && remember(ctx, &job.uid().unwrap_or_default(), |m| {
            m.superseded_version == seen
        })
    {
        // Our own status write is newer than this copy; its watch event brings us back sooner
        // than this safety requeue (the scheduler keeps only the earliest of the two).
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let client = &ctx.client;
    let generation = job.meta().generation;
    let old_status = job.status.clone().unwrap_or_default();
    let mut status = old_status.clone();
    status.observed_generation = generation;
    let t = now();

    // Children come from the caches; a reconcile never acts before they hold a full list. Their
    // readiness is checked, not awaited: kube-runtime's readiness future wakes only the last of
    // several concurrent waiters, so awaiting it from parallel reconciles can stall all but one.
    let caches = &ctx.caches;
    match (
        caches.pods.wait_until_ready().now_or_never(),
        caches.config_maps.wait_until_ready().now_or_never(),
    ) {
        (Some(Ok(())), Some(Ok(()))) => {}
        (Some(Err(_)), _) | (_, Some(Err(_))) => return Err(Error::Cache),
        _ => return Ok(Action::requeue(Duration::from_millis(500))),
    }

    // The spec that was accepted when the job started, and what changed since.
    let existing_cm = caches
        .config_maps
        .get(&ObjectRef::new(&names::config_map(&name)).within(&ns));
    let accepted: Option<FineTuneJobSpec> = existing_cm
        .as_ref()
        .and_then(|cm| cm.data.as_ref())
        .and_then(|d| d.get(ACCEPTED_SPEC_KEY))
        .and_then(|s| serde_json::from_str(s).ok());
    let started = accepted.is_some();
    let (spec, refused) = effective_spec(job, accepted);
    let mut effective = job.clone();
    effective.spec = spec;

    // Validate (pure). An invalid spec never creates a pod.
    match &refused {
        Some(sections) => set_condition(
            &mut status.conditions,
            condition::INVALID_SPEC,
            true,
            "ImmutableFieldChanged",
            &format!(
                "changes to {} are refused after the job started (only {} may change); the job \
                 continues with the spec it started with",
                sections.join(", "),
                mutable_fields_sentence()
            ),
            generation,
            &t,
        ),
        None => {
            if let Err(errors) = finetune_api::validate(&effective.spec) {
                let message = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                set_condition(
                    &mut status.conditions,
                    condition::INVALID_SPEC,
                    true,
                    "InvalidSpec",
                    &message,
                    generation,
                    &t,
                );
                if !started {
                    set_phase(
                        &mut status,
                        JobPhase::Failed,
                        "InvalidSpec",
                        &message,
                        generation,
                        &t,
                    );
                    status.completion_time.get_or_insert(t.clone());
                    finish(job, ctx, &ns, &name, &old_status, &status).await?;
                    return Ok(Action::await_change());
                }
            } else {
                remove_condition(&mut status.conditions, condition::INVALID_SPEC);
            }
        }
    }
    for w in finetune_api::warnings(&effective.spec) {
        set_condition(
            &mut status.conditions,
            w.condition,
            true,
            "NotRecommended",
            &format!("{}: {}", w.path, w.message),
            generation,
            &t,
        );
    }

    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pods: Vec<Pod> = caches
        .pods
        .state()
        .iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns.as_str())
                && p.labels().get(JOB_LABEL) == Some(&name)
        })
        .map(|p| Pod::clone(p))
        .collect();
    let attempt = status.restarts + status.disruptions;
    let current = pods.iter().find(|p| pod_attempt(p) == Some(attempt));

    // Finished jobs: only the TTL remains to be honoured.
    if status.phase.is_some_and(JobPhase::is_finished) {
        return finished(&effective, ctx, &ns, &name, &pods, &old_status, &status).await;
    }

    // Deadline.
    if let (Some(limit), Some(start)) = (effective.spec.active_deadline_seconds, &status.start_time)
    {
        let elapsed = t.0.as_second() - start.0.as_second();
        if elapsed >= limit {
            delete_pods(
                ctx,
                &pods_api,
                pods.iter().filter(|p| is_active(p)),
                Some(0),
            )
            .await?;
            let msg = format!("ran {elapsed}s, longer than activeDeadlineSeconds {limit}");
            set_phase(
                &mut status,
                JobPhase::Failed,
                "DeadlineExceeded",
                &msg,
                generation,
                &t,
            );
            status.completion_time = Some(t.clone());
            finish(job, ctx, &ns, &name, &old_status, &status).await?;
            return Ok(Action::await_change());
        }
    }

    // Suspend: stop the trainer (it checkpoints on SIGTERM), then report Suspended.
    if effective.spec.suspend {
        let active: Vec<&Pod> = pods.iter().filter(|p| is_active(p)).collect();
        delete_pods(
            ctx,
            &pods_api,
            active
                .iter()
                .copied()
                .filter(|p| p.meta().deletion_timestamp.is_none()),
            None,
        )
        .await?;
        if active.is_empty() {
            set_phase(
                &mut status,
                JobPhase::Suspended,
                "Suspended",
                "suspended; resumes from its latest checkpoint when spec.suspend is false",
                generation,
                &t,
            );
            finish(job, ctx, &ns, &name, &old_status, &status).await?;
            return Ok(Action::await_change());
        }
        set_phase(
            &mut status,
            JobPhase::Running,
            "Suspending",
            "stopping the trainer after a checkpoint",
            generation,
            &t,
        );
        finish(job, ctx, &ns, &name, &old_status, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(2)));
    }

    let uid = job.uid().unwrap_or_default();
    let action = match current.map(|p| (p, classify(p))) {
        None => {
            // Wait out the backoff after a counted failure, measured from when it ended.
            if status.restarts > 0 {
                let wait = backoff(status.restarts, ctx.args.base_backoff, ctx.args.max_backoff);
                let ended = pods
                    .iter()
                    .filter(|p| pod_attempt(p) == attempt.checked_sub(1))
                    .filter_map(finished_at)
                    .max();
                if let Some(ended) = ended {
                    let ready_at = ended + wait.as_secs() as i64;
                    if t.0.as_second() < ready_at {
                        let left = (ready_at - t.0.as_second()).max(1) as u64;
                        let msg = format!(
                            "retrying in {left}s (restart {} of {})",
                            status.restarts, effective.spec.backoff_limit
                        );
                        set_phase(
                            &mut status,
                            JobPhase::Pending,
                            "BackoffAfterFailure",
                            &msg,
                            generation,
                            &t,
                        );
                        finish(job, ctx, &ns, &name, &old_status, &status).await?;
                        return Ok(Action::requeue(Duration::from_secs(left)));
                    }
                }
            }
            let children = build::children(&effective, &ctx.settings, attempt)?;
            apply_children(ctx, &ns, children, &effective.spec).await?;
            // Old attempts' pods are kept only for the previous attempt (for its logs).
            let stale = pods
                .iter()
                .filter(|p| pod_attempt(p).is_some_and(|a| a + 1 < attempt));
            delete_pods(
                ctx,
                &pods_api,
                stale.filter(|p| p.meta().deletion_timestamp.is_none()),
                None,
            )
            .await?;
            let msg = if attempt == 0 {
                "trainer pod created".to_string()
            } else {
                format!(
                    "trainer pod for attempt {attempt} created; resuming from the latest checkpoint"
                )
            };
            set_phase(
                &mut status,
                JobPhase::Pending,
                "PodCreated",
                &msg,
                generation,
                &t,
            );
            // The pod's own events (created, scheduled, started) trigger the next reconcile.
            Action::await_change()
        }
        Some((_, PodOutcome::Pending(unschedulable))) => {
            match unschedulable {
                Some(msg) => {
                    remember(ctx, &uid, |m| {
                        m.unschedulable_since.get_or_insert_with(Instant::now);
                    });
                    set_condition(
                        &mut status.conditions,
                        condition::UNSCHEDULABLE,
                        true,
                        "Unschedulable",
                        &msg,
                        generation,
                        &t,
                    );
                    let gpus = effective_gpus(&effective.spec);
                    set_phase(
                        &mut status,
                        JobPhase::Pending,
                        "Unschedulable",
                        &format!(
                            "no node can take the trainer pod ({gpus} GPU(s) requested): {msg}"
                        ),
                        generation,
                        &t,
                    );
                }
                None => set_phase(
                    &mut status,
                    JobPhase::Pending,
                    "PodPending",
                    "waiting for the trainer pod to start",
                    generation,
                    &t,
                ),
            }
            // A waiting pod costs nothing: its next change (scheduled, started) triggers the
            // next reconcile through the pod watch.
            Action::await_change()
        }
        Some((pod, PodOutcome::Running)) => {
            scheduled(ctx, &uid, &mut status, generation, &t);
            if node_lost(client, pod).await? {
                delete_pods(ctx, &pods_api, std::iter::once(pod), Some(0)).await?;
                status.disruptions += 1;
                ctx.metrics
                    .pod_restarts
                    .with_label_values(&["disruption"])
                    .inc();
                let msg = format!(
                    "node {} is gone; rescheduling from the latest checkpoint (not counted against backoffLimit)",
                    pod.spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .unwrap_or_default()
                );
                set_phase(
                    &mut status,
                    JobPhase::Pending,
                    "NodeLost",
                    &msg,
                    generation,
                    &t,
                );
                finish(job, ctx, &ns, &name, &old_status, &status).await?;
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            status.start_time.get_or_insert_with(|| t.clone());
            let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
            let progress = match ip {
                Some(ip) => crate::progress::fetch(&ip, None, Duration::from_secs(3)).await,
                None => None,
            };
            let mut reason = "Training";
            if let Some(p) = &progress {
                apply_progress(&mut status, p);
                overfitting(&mut status, p, generation, &t);
                let stalled = remember(ctx, &uid, |m| {
                    if m.step != p.step {
                        m.step = p.step;
                        m.since = Instant::now();
                    }
                    m.since.elapsed() >= ctx.args.stall_timeout
                });
                if stalled {
                    reason = "Stalled";
                    set_condition(
                        &mut status.conditions,
                        condition::STALLED,
                        true,
                        "NoProgress",
                        &format!(
                            "step {} has not advanced for {:?}",
                            p.step, ctx.args.stall_timeout
                        ),
                        generation,
                        &t,
                    );
                } else if status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == condition::STALLED)
                {
                    set_condition(
                        &mut status.conditions,
                        condition::STALLED,
                        false,
                        "Progressing",
                        "steps advance",
                        generation,
                        &t,
                    );
                }
            }
            let summary = status
                .progress
                .as_ref()
                .map(|p| p.summary.clone())
                .unwrap_or_else(|| "trainer starting".into());
            set_phase(
                &mut status,
                JobPhase::Running,
                reason,
                &summary,
                generation,
                &t,
            );
            Action::requeue(ctx.args.progress_interval)
        }
        Some((_, PodOutcome::Succeeded(message))) => {
            scheduled(ctx, &uid, &mut status, generation, &t);
            let final_progress = parse_termination_message(&message);
            if let Some(p) = &final_progress {
                apply_progress(&mut status, p);
                overfitting(&mut status, p, generation, &t);
            }
            let spec = &effective.spec;
            let out = build::plan_volumes(&effective, &ctx.settings)?;
            status.output = Some(OutputStatus {
                claim_name: out.output_claim,
                path: spec.output.path.clone(),
                adapter: (spec.method.method_type == MethodType::Lora)
                    .then(|| format!("{}/adapter", spec.output.path)),
                merged: (spec.output.merge_weights || spec.method.method_type == MethodType::Full)
                    .then(|| format!("{}/merged", spec.output.path)),
                report: Some(format!("{}/report.md", spec.output.path)),
            });
            status.start_time.get_or_insert_with(|| t.clone());
            status.completion_time = Some(t.clone());
            let why = final_progress
                .and_then(|p| p.stop_reason)
                .unwrap_or_else(|| "training finished".into());
            set_phase(
                &mut status,
                JobPhase::Succeeded,
                "Completed",
                &why,
                generation,
                &t,
            );
            forget(ctx, &uid);
            Action::await_change()
        }
        Some((_, PodOutcome::Failed(failure))) => {
            status.restarts += 1;
            let class = if failure.reason == "OOMKilled" {
                "oom"
            } else {
                "failure"
            };
            ctx.metrics.pod_restarts.with_label_values(&[class]).inc();
            if status.restarts > effective.spec.backoff_limit {
                let msg = format!(
                    "{} failures exceed backoffLimit {}; last: {}",
                    status.restarts, effective.spec.backoff_limit, failure.message
                );
                set_phase(
                    &mut status,
                    JobPhase::Failed,
                    "BackoffLimitExceeded",
                    &msg,
                    generation,
                    &t,
                );
                status.completion_time = Some(t.clone());
                forget(ctx, &uid);
                finish(job, ctx, &ns, &name, &old_status, &status).await?;
                return Ok(Action::await_change());
            }
            let wait = backoff(status.restarts, ctx.args.base_backoff, ctx.args.max_backoff);
            let msg = format!(
                "{} (restart {} of {}, next attempt in {}s from the latest checkpoint)",
                failure.message,
                status.restarts,
                effective.spec.backoff_limit,
                wait.as_secs()
            );
            set_phase(
                &mut status,
                JobPhase::Pending,
                &failure.reason,
                &msg,
                generation,
                &t,
            );
            Action::requeue(wait.max(Duration::from_secs(1)))
        }
        Some((_, PodOutcome::Disrupted(msg))) => {
            status.disruptions += 1;
            ctx.metrics
                .pod_restarts
                .with_label_values(&["disruption"])
                .inc();
            set_phase(
                &mut status,
                JobPhase::Pending,
                "Disrupted",
                &format!("{msg}; rescheduling (not counted against backoffLimit)"),
                generation,
                &t,
            );
            Action::requeue(Duration::from_secs(1))
        }
    };
    finish(job, ctx, &ns, &name, &old_status, &status).await?;
    Ok(action)
}

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

fn remember<T>(ctx: &Context, uid: &str, f: impl FnOnce(&mut JobMemory) -> T) -> T {
    let mut map = ctx
        .memory
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let entry = map.entry(uid.to_string()).or_insert_with(|| JobMemory {
        step: 0,
        since: Instant::now(),
        unschedulable_since: None,
        superseded_version: None,
    });
    f(entry)
}

/// Drops what is remembered of jobs that no longer exist, so memory stays bounded by the
/// number of live jobs.
fn prune_memory(ctx: &Context, jobs: &[Arc<FineTuneJob>]) {
    let live: std::collections::HashSet<String> = jobs.iter().filter_map(|j| j.uid()).collect();
    let mut map = ctx
        .memory
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    map.retain(|uid, _| live.contains(uid));
}

fn forget(ctx: &Context, uid: &str) {
    let mut map = ctx
        .memory
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if map
        .remove(uid)
        .is_some_and(|m| m.unschedulable_since.is_some())
    {
        ctx.metrics
            .unschedulable_jobs
            .set(count_unschedulable(&map));
    }
}

fn count_unschedulable(map: &std::collections::HashMap<String, JobMemory>) -> i64 {
    map.values()
        .filter(|m| m.unschedulable_since.is_some())
        .count() as i64
}

/// The trainer pod got a node: close the Unschedulable episode.
fn scheduled(
    ctx: &Context,
    uid: &str,
    status: &mut FineTuneJobStatus,
    generation: Option<i64>,
    t: &Time,
) {
    let since = remember(ctx, uid, |m| m.unschedulable_since.take());
    if let Some(since) = since {
        ctx.metrics
            .unschedulable_seconds
            .observe(since.elapsed().as_secs_f64());
    }
    if status
        .conditions
        .iter()
        .any(|c| c.type_ == condition::UNSCHEDULABLE && c.status == "True")
    {
        set_condition(
            &mut status.conditions,
            condition::UNSCHEDULABLE,
            false,
            "Scheduled",
            "the trainer pod was scheduled",
            generation,
            t,
        );
    }
    let map = ctx
        .memory
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ctx.metrics
        .unschedulable_jobs
        .set(count_unschedulable(&map));
}

fn overfitting(
    status: &mut FineTuneJobStatus,
    p: &finetune_api::TrainerProgress,
    generation: Option<i64>,
    t: &Time,
) {
    if p.overfitting {
        let why = p
            .overfitting_reason
            .clone()
            .unwrap_or_else(|| "validation loss diverges from training loss".into());
        set_condition(
            &mut status.conditions,
            condition::OVERFITTING,
            true,
            "GeneralizationGap",
            &why,
            generation,
            t,
        );
    } else if status
        .conditions
        .iter()
        .any(|c| c.type_ == condition::OVERFITTING)
    {
        set_condition(
            &mut status.conditions,
            condition::OVERFITTING,
            false,
            "WithinThresholds",
            "validation loss tracks training loss",
            generation,
            t,
        );
    }
}

async fn node_lost(client: &kube::Client, pod: &Pod) -> Result<bool> {
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        return Ok(false);
    };
    let nodes: Api<Node> = Api::all(client.clone());
    Ok(nodes.get_opt(&node).await?.is_none())
}

async fn delete_pods<'a>(
    ctx: &Context,
    api: &Api<Pod>,
    pods: impl Iterator<Item = &'a Pod>,
    grace: Option<u32>,
) -> Result<()> {
    for pod in pods {
        ctx.metrics.api_writes.with_label_values(&["delete"]).inc();
        let dp = DeleteParams {
            grace_period_seconds: grace,
            ..DeleteParams::background()
        };
        match api.delete(&pod.name_any(), &dp).await {
            Ok(_) => {
                info!(pod = pod.name_any(), "deleted trainer pod");
                crate::crash_point!("after-delete-pod");
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn apply<K>(ctx: &Context, api: &Api<K>, obj: &K) -> Result<()>
where
    K: Resource<DynamicType = ()>
        + Serialize
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let name = obj
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    let mut value = serde_json::to_value(obj)?;
    value["apiVersion"] = serde_json::Value::String(K::api_version(&()).into_owned());
    value["kind"] = serde_json::Value::String(K::kind(&()).into_owned());
    ctx.metrics.api_writes.with_label_values(&["apply"]).inc();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await?;
    crate::crash_point!(&format!("after-apply-{}", K::kind(&()).to_lowercase()));
    Ok(())
}

/// Applies every child with server-side apply. The ConfigMap also records the accepted spec.
async fn apply_children(
    ctx: &Context,
    ns: &str,
    mut children: Children,
    spec: &FineTuneJobSpec,
) -> Result<()> {
    let client = &ctx.client;
    children
        .config_map
        .data
        .get_or_insert_with(Default::default)
        .insert(ACCEPTED_SPEC_KEY.into(), serde_json::to_string(spec)?);
    apply(
        ctx,
        &Api::<ConfigMap>::namespaced(client.clone(), ns),
        &children.config_map,
    )
    .await?;
    if let Some(pvc) = &children.checkpoint_claim {
        let api = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns);
        // A claim's spec is immutable once bound: create it once, never re-apply.
        if api.get_opt(&pvc.name_any()).await?.is_none() {
            apply(ctx, &api, pvc).await?;
        }
    }
    apply(
        ctx,
        &Api::<Service>::namespaced(client.clone(), ns),
        &children.metrics_service,
    )
    .await?;
    // Before the pod, so the trainer never runs without its NetworkPolicy.
    apply(
        ctx,
        &Api::<NetworkPolicy>::namespaced(client.clone(), ns),
        &children.network_policy,
    )
    .await?;
    apply(
        ctx,
        &Api::<Pod>::namespaced(client.clone(), ns),
        &children.pod,
    )
    .await?;
    Ok(())
}

/// TTL of finished jobs: delete the pods, ConfigMap and Service; keep the job and its claim.
async fn finished(
    job: &FineTuneJob,
    ctx: &Context,
    ns: &str,
    name: &str,
    pods: &[Pod],
    old: &FineTuneJobStatus,
    status: &FineTuneJobStatus,
) -> Result<Action> {
    finish(job, ctx, ns, name, old, status).await?;
    let (Some(ttl), Some(done)) = (job.spec.ttl_seconds_after_finished, &status.completion_time)
    else {
        return Ok(Action::await_change());
    };
    let left = done.0.as_second() + i64::from(ttl) - Timestamp::now().as_second();
    if left > 0 {
        return Ok(Action::requeue(Duration::from_secs(left as u64)));
    }
    let client = &ctx.client;
    delete_pods(
        ctx,
        &Api::namespaced(client.clone(), ns),
        pods.iter()
            .filter(|p| p.meta().deletion_timestamp.is_none()),
        None,
    )
    .await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    if cms.get_opt(&names::config_map(name)).await?.is_some() {
        ctx.metrics.api_writes.with_label_values(&["delete"]).inc();
        cms.delete(&names::config_map(name), &DeleteParams::default())
            .await?;
        crate::crash_point!("after-delete-configmap");
    }
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    if svcs.get_opt(&names::metrics_service(name)).await?.is_some() {
        ctx.metrics.api_writes.with_label_values(&["delete"]).inc();
        svcs.delete(&names::metrics_service(name), &DeleteParams::default())
            .await?;
        crate::crash_point!("after-delete-service");
    }
    Ok(Action::await_change())
}

/// Writes the status when it changed (never otherwise: an idle job causes no writes), with the
/// object's resourceVersion as a precondition so a reconcile working from a stale cache cannot
/// count a failure twice. Publishes an event when the phase or its reason changed.
async fn finish(
    job: &FineTuneJob,
    ctx: &Context,
    ns: &str,
    name: &str,
    old: &FineTuneJobStatus,
    new: &FineTuneJobStatus,
) -> Result<()> {
    if old == new {
        return Ok(());
    }
    let Some(diff) = merge_diff(&serde_json::to_value(old)?, &serde_json::to_value(new)?) else {
        return Ok(());
    };
    let api: Api<FineTuneJob> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": job.resource_version() },
        "status": diff,
    });
    ctx.metrics.api_writes.with_label_values(&["status"]).inc();
    let result = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(kube::Error::Api(s)) if s.code == 409 => "conflict",
        Err(_) => "error",
    };
    ctx.metrics
        .status_writes
        .with_label_values(&[outcome])
        .inc();
    let written = result?;
    if written.resource_version() != job.resource_version() {
        remember(ctx, &job.uid().unwrap_or_default(), |m| {
            m.superseded_version = job.resource_version();
        });
    }
    crate::crash_point!("after-status-patch");
    let reason_of = |s: &FineTuneJobStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let (old_reason, new_reason) = (reason_of(old), reason_of(new));
    if old.phase != new.phase
        || old_reason.as_ref().map(|r| &r.0) != new_reason.as_ref().map(|r| &r.0)
    {
        let (reason, message) = new_reason.unwrap_or_default();
        let warning = matches!(new.phase, Some(JobPhase::Failed))
            || matches!(
                reason.as_str(),
                "OOMKilled"
                    | "Error"
                    | "Unschedulable"
                    | "Stalled"
                    | "NodeLost"
                    | "Disrupted"
                    | "InvalidSpec"
            );
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.clone(),
            note: Some(message.chars().take(1000).collect()),
            action: new
                .phase
                .map(|p| p.as_str().to_string())
                .unwrap_or_default(),
            secondary: None,
        };
        info!(phase = ?new.phase, %reason, "status changed");
        if let Err(e) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
            warn!(error = %e, "could not publish event");
        }
        crate::crash_point!("after-event");
    }
    Ok(())
}
