//! The reconciler, as a pipeline: [`observe`] (caches, pods, node, progress, memory) →
//! [`decide`] (pure: job + observation + settings + clock → plan) → [`apply`] (the plan's writes
//! in order: server-side apply with one field manager, deletes, the status patch).

mod apply;
pub mod decide;
mod draft;
mod observe;
pub mod plan;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use finetune_api::{FineTuneJob, JOB_LABEL, JobPhase};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use tracing::{info, instrument, warn};

use crate::context::Context;
use crate::lifecycle::BLOCKING_WAIT_REASONS;
use crate::names::label_value;
use crate::server::Health;
use crate::status::{condition, find_condition, is_true};
use crate::{Error, Result, RetryClass};
use decide::{Clock, Requeue, Settings, decide, effective_spec};
use observe::{Observation, observe};

/// Key of the accepted spec in the trainer ConfigMap.
pub const ACCEPTED_SPEC_KEY: &str = "spec.json";

/// Runs the controller until a shutdown signal; `health` turns ready once the job, pod and
/// ConfigMap caches have synced (before that, reconciles would read empty caches).
pub async fn run(ctx: Arc<Context>, health: &Health) {
    let Some(writers) = ctx.take_cache_writers() else {
        warn!("the controller of this context already runs");
        return;
    };
    let client = ctx.client.clone();
    let ns = ctx.args.watch_namespace.clone();
    let children = watcher::Config::default().labels(JOB_LABEL);
    // Jobs, trainer pods and ConfigMaps are cached without their managed fields (a large share
    // of every object, never read here); reconciles read children from these caches.
    let synced = CachesSynced::new(3, health.clone());
    let (job_store, job_writer) = reflector::store();
    let jobs = watcher(
        scoped::<FineTuneJob>(&client, &ns),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .modify(|j| j.managed_fields_mut().clear())
    .reflect(job_writer)
    .inspect(synced.first_list())
    .applied_objects();
    let pods = watcher(scoped::<Pod>(&client, &ns), children.clone())
        .default_backoff()
        .modify(|p| p.managed_fields_mut().clear())
        .reflect(writers.pods)
        .inspect(synced.first_list())
        .touched_objects();
    let config_maps = watcher(scoped::<ConfigMap>(&client, &ns), children.clone())
        .default_backoff()
        .modify(|c| c.managed_fields_mut().clear())
        .reflect(writers.config_maps)
        .inspect(synced.first_list())
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
            let jobs = store.state();
            prune_memory(&gauge_ctx, &jobs);
            refresh_job_gauges(&gauge_ctx.metrics, &jobs);
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

/// A failed reconcile is retried per job by [`retry_delay`]: at a short fixed interval while the
/// API server does not answer, with exponential backoff from [`CONGESTED_RETRY`] when it answered
/// busy or conflicted, and from [`REFUSED_RETRY`] when it refused the request (invalid, forbidden)
/// or the object cannot be rendered. A change to the job or its children reconciles it sooner
/// anyway.
pub fn error_policy(job: Arc<FineTuneJob>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.count_failure(&job.uid().unwrap_or_default());
    let class = error.retry_class();
    let retry_in = retry_delay(class, failures);
    if class == RetryClass::Refused {
        warn!(%error, failures, ?retry_in, "reconcile failed; retrying will not help until the job or the cluster changes");
    } else {
        warn!(%error, failures, ?retry_in, "reconcile failed; retrying");
    }
    Action::requeue(retry_in)
}

/// The retry interval while the API server does not answer (no backoff: a refused connection
/// costs nothing, and the operator should be back as soon as the server is).
pub const UNREACHABLE_RETRY: Duration = Duration::from_secs(5);
/// The first retry after the server answered busy or conflicted; it doubles with each failure
/// in a row up to [`MAX_CONGESTED_RETRY`].
pub const CONGESTED_RETRY: Duration = Duration::from_secs(2);
/// The longest wait between retries of a busy or conflicted server.
pub const MAX_CONGESTED_RETRY: Duration = Duration::from_secs(60);
/// The first retry after a refusal; it doubles up to [`MAX_REFUSED_RETRY`].
pub const REFUSED_RETRY: Duration = Duration::from_secs(30);
/// The longest wait between retries of a refusal.
pub const MAX_REFUSED_RETRY: Duration = Duration::from_secs(300);

/// The wait before retrying after the `failures`-th failed reconcile in a row (1 for the
/// first), by why it failed.
pub fn retry_delay(class: RetryClass, failures: u32) -> Duration {
    let (first, max) = match class {
        RetryClass::Unreachable => return UNREACHABLE_RETRY,
        RetryClass::Congested => (CONGESTED_RETRY, MAX_CONGESTED_RETRY),
        RetryClass::Refused => (REFUSED_RETRY, MAX_REFUSED_RETRY),
    };
    crate::lifecycle::backoff(failures.max(1), first, max)
}

/// Reconciles one FineTuneJob.
#[instrument(skip_all, fields(namespace = job.namespace().unwrap_or_default(), job = job.name_any()))]
pub async fn reconcile(job: Arc<FineTuneJob>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_job(&job, &ctx).await;
    if result.is_ok() {
        ctx.clear_failures(&job.uid().unwrap_or_default());
    }
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconcile_total
        .with_label_values(&[label])
        .inc();
    if let Err(e) = &result {
        ctx.metrics
            .reconcile_errors
            .with_label_values(&[e.retry_class().as_str()])
            .inc();
    }
    result
}

async fn reconcile_job(job: &FineTuneJob, ctx: &Context) -> Result<Action> {
    let observed = match observe(job, ctx).await? {
        Observation::NotNow(action) => return Ok(action),
        Observation::Ready(observed) => observed,
    };
    let settings = Settings::from_args(&ctx.args);
    let plan = decide(job, &observed, &settings, &Clock::now())?;
    let requeue = plan.requeue;
    let (spec, _) = effective_spec(job, observed.accepted.clone());
    apply::execute(job, ctx, &spec, plan).await?;
    Ok(match requeue {
        Requeue::AwaitChange => Action::await_change(),
        Requeue::After(d) => Action::requeue(d),
    })
}

/// Drops what is remembered of jobs that no longer exist, so memory stays bounded by the
/// number of live jobs.
fn prune_memory(ctx: &Context, jobs: &[Arc<FineTuneJob>]) {
    let live: std::collections::HashSet<String> = jobs.iter().filter_map(|j| j.uid()).collect();
    ctx.retain_memory(|uid| live.contains(uid));
}

/// Readiness once every cached watch has completed its first list. Read from the watch events
/// themselves: kube-runtime 5's `Store::wait_until_ready` wakes only the last of several
/// waiters, and reconciles poll it too (`observe`), so a task awaiting it could wait forever
/// (seen with an operator started before its CRD).
struct CachesSynced {
    left: Arc<AtomicUsize>,
    health: Health,
}

impl CachesSynced {
    fn new(watches: usize, health: Health) -> Self {
        Self {
            left: Arc::new(AtomicUsize::new(watches)),
            health,
        }
    }

    /// An `inspect` for one watch's events (after its reflector): counts its first `InitDone`.
    fn first_list<K>(&self) -> impl FnMut(&watcher::Result<watcher::Event<K>>) + use<K> {
        let (left, health) = (self.left.clone(), self.health.clone());
        let mut listed = false;
        move |event| {
            if !listed && matches!(event, Ok(watcher::Event::InitDone)) {
                listed = true;
                if left.fetch_sub(1, Ordering::SeqCst) == 1 {
                    info!("caches synced; ready");
                    health.set_ready(true);
                }
            }
        }
    }
}

/// The gauges read from the job cache: jobs per phase, jobs whose pod cannot start per reason,
/// and the per-job Failed and Unschedulable series.
fn refresh_job_gauges(metrics: &crate::metrics::Metrics, jobs: &[Arc<FineTuneJob>]) {
    let mut phases = std::collections::HashMap::new();
    let mut blocked = std::collections::HashMap::new();
    metrics.job_failed.reset();
    metrics.job_unschedulable.reset();
    for job in jobs {
        let conditions = job.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
        let phase = job
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default();
        *phases.entry(phase).or_insert(0i64) += 1;
        let reason = find_condition(conditions, condition::READY).map_or("", |c| &c.reason);
        if BLOCKING_WAIT_REASONS.contains(&reason) {
            *blocked.entry(reason.to_string()).or_insert(0i64) += 1;
        }
        let (ns, name) = (
            job.namespace().unwrap_or_default(),
            label_value(&job.name_any()),
        );
        if phase == JobPhase::Failed {
            metrics
                .job_failed
                .with_label_values(&[ns.as_str(), name.as_str(), reason])
                .set(1);
        }
        if is_true(conditions, condition::UNSCHEDULABLE) {
            metrics
                .job_unschedulable
                .with_label_values(&[ns.as_str(), name.as_str()])
                .set(1);
        }
    }
    for reason in BLOCKING_WAIT_REASONS {
        metrics
            .blocked_jobs
            .with_label_values(&[reason])
            .set(blocked.get(reason).copied().unwrap_or(0));
    }
    for phase in JobPhase::ALL {
        metrics
            .jobs
            .with_label_values(&[phase.as_str()])
            .set(phases.get(&phase).copied().unwrap_or(0));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_to_a_ceiling() {
        let secs = |class, n| retry_delay(class, n).as_secs();
        let congested: Vec<u64> = (1..=8).map(|n| secs(RetryClass::Congested, n)).collect();
        assert_eq!(congested, [2, 4, 8, 16, 32, 60, 60, 60]);
        let refused: Vec<u64> = (1..=6).map(|n| secs(RetryClass::Refused, n)).collect();
        assert_eq!(refused, [30, 60, 120, 240, 300, 300]);
        let unreachable: Vec<u64> = (1..=4).map(|n| secs(RetryClass::Unreachable, n)).collect();
        assert_eq!(
            unreachable,
            [5, 5, 5, 5],
            "back within seconds of the server"
        );
        assert_eq!(secs(RetryClass::Congested, u32::MAX), 60, "no overflow");
        assert_eq!(secs(RetryClass::Refused, 0), 30);
    }

    fn job(name: &str, status: serde_json::Value) -> Arc<FineTuneJob> {
        let sample = include_str!("../../../manifests/samples/tiny-sentiment-cpu.yaml");
        let mut job: FineTuneJob = serde_yaml::from_str(sample).unwrap();
        job.metadata.name = Some(name.into());
        job.metadata.namespace = Some("ml".into());
        job.status = Some(serde_json::from_value(status).unwrap());
        Arc::new(job)
    }

    fn condition(type_: &str, status: &str, reason: &str) -> serde_json::Value {
        serde_json::json!({"type": type_, "status": status, "reason": reason, "message": "",
                           "lastTransitionTime": "2026-12-01T10:00:00Z"})
    }

    #[test]
    fn failed_and_unschedulable_jobs_get_one_series_each_which_goes_with_them() {
        let metrics = crate::metrics::Metrics::new().unwrap();
        let failed = job(
            "a",
            serde_json::json!({"phase": "Failed",
                               "conditions": [condition("Ready", "False", "BackoffLimitExceeded")]}),
        );
        let waiting = job(
            "b",
            serde_json::json!({"phase": "Pending",
                               "conditions": [condition("Ready", "False", "Unschedulable"),
                                              condition("Unschedulable", "True", "Unschedulable")]}),
        );
        let running = job("c", serde_json::json!({"phase": "Running"}));
        refresh_job_gauges(&metrics, &[failed, waiting, running]);
        let f = &metrics.job_failed;
        assert_eq!(
            f.with_label_values(&["ml", "a", "BackoffLimitExceeded"])
                .get(),
            1
        );
        let u = &metrics.job_unschedulable;
        assert_eq!(u.with_label_values(&["ml", "b"]).get(), 1);
        assert_eq!(metrics.jobs.with_label_values(&["Failed"]).get(), 1);
        let series = |name: &str| {
            metrics
                .registry
                .gather()
                .iter()
                .filter(|m| m.name() == name)
                .map(|m| m.get_metric().len())
                .sum::<usize>()
        };
        assert_eq!(series("finetune_operator_job_failed"), 1);
        assert_eq!(series("finetune_operator_job_unschedulable"), 1);
        // The failed job deleted, the waiting one scheduled: their series go.
        let scheduled = job("b", serde_json::json!({"phase": "Running"}));
        refresh_job_gauges(&metrics, &[scheduled]);
        assert_eq!(series("finetune_operator_job_failed"), 0);
        assert_eq!(series("finetune_operator_job_unschedulable"), 0);
    }
}
