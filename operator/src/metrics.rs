//! The operator's Prometheus metrics, on a registry it owns. Labels are bounded: reconcile
//! result, phase, restart reason class, and for the per-job series (one per existing job, as
//! kube-state-metrics has one per object) namespace, job name (at most 63 characters) and reason.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Every metric of the operator.
#[derive(Clone)]
pub struct Metrics {
    /// The registry served on /metrics.
    pub registry: Registry,
    /// `finetune_operator_reconcile_total{result}`.
    pub reconcile_total: IntCounterVec,
    /// `finetune_operator_reconcile_errors_total{class}`: failed reconciles by how they are
    /// retried (`RetryClass`: unreachable, congested, refused).
    pub reconcile_errors: IntCounterVec,
    /// `finetune_operator_reconcile_duration_seconds`.
    pub reconcile_duration: Histogram,
    /// `finetune_operator_jobs{phase}`.
    pub jobs: IntGaugeVec,
    /// `finetune_operator_pod_restarts_total{reason}`.
    pub pod_restarts: IntCounterVec,
    /// `finetune_operator_unschedulable_seconds`: how long jobs waited unschedulable before a
    /// node took them.
    pub unschedulable_seconds: Histogram,
    /// `finetune_operator_unschedulable_jobs`: jobs currently unschedulable.
    pub unschedulable_jobs: IntGauge,
    /// `finetune_operator_blocked_jobs{reason}`: jobs whose trainer pod cannot start, by the
    /// kubelet's reason (`lifecycle::BLOCKING_WAIT_REASONS`).
    pub blocked_jobs: IntGaugeVec,
    /// `finetune_operator_job_failed{namespace, finetune_job, reason}`: 1 for each Failed job
    /// while it exists, so an alert names the job and lasts until the job is dealt with.
    pub job_failed: IntGaugeVec,
    /// `finetune_operator_job_unschedulable{namespace, finetune_job}`: 1 while a job's trainer
    /// pod cannot be scheduled.
    pub job_unschedulable: IntGaugeVec,
    /// `finetune_operator_leader`: 1 on the replica holding the leader Lease.
    pub leader: IntGauge,
    /// `finetune_operator_status_writes_total`: status patches sent.
    pub status_writes: IntCounterVec,
    /// `finetune_operator_api_writes_total{verb}`: every write request the operator sends
    /// (apply, delete, status), for the idle-write and writes-per-job benchmarks.
    pub api_writes: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let reconcile_total = IntCounterVec::new(
            Opts::new(
                "finetune_operator_reconcile_total",
                "Reconciliations by result (ok, error).",
            ),
            &["result"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "finetune_operator_reconcile_errors_total",
                "Failed reconciliations by retry class (unreachable: no answer from the API \
                 server, retried every 5 s; congested: 409, 429 or 5xx, backing off from 2 s; \
                 refused: any other refusal, backing off from 30 s).",
            ),
            &["class"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "finetune_operator_reconcile_duration_seconds",
                "Time spent in one reconciliation.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let jobs = IntGaugeVec::new(
            Opts::new(
                "finetune_operator_jobs",
                "FineTuneJobs known to the operator, by phase.",
            ),
            &["phase"],
        )?;
        let pod_restarts = IntCounterVec::new(
            Opts::new(
                "finetune_operator_pod_restarts_total",
                "Trainer pods replaced, by reason (failure, oom, disruption).",
            ),
            &["reason"],
        )?;
        let unschedulable_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "finetune_operator_unschedulable_seconds",
                "Seconds jobs waited as Unschedulable before their trainer pod was scheduled.",
            )
            .buckets(vec![
                1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
            ]),
        )?;
        let unschedulable_jobs = IntGauge::new(
            "finetune_operator_unschedulable_jobs",
            "Jobs whose trainer pod cannot be scheduled now.",
        )?;
        let blocked_jobs = IntGaugeVec::new(
            Opts::new(
                "finetune_operator_blocked_jobs",
                "Jobs whose trainer pod cannot start (image pull, missing Secret or ConfigMap), \
                 by the kubelet's reason.",
            ),
            &["reason"],
        )?;
        let job_failed = IntGaugeVec::new(
            Opts::new(
                "finetune_operator_job_failed",
                "1 for each Failed FineTuneJob while it exists, with the reason of its Failed \
                 condition.",
            ),
            &["namespace", "finetune_job", "reason"],
        )?;
        let job_unschedulable = IntGaugeVec::new(
            Opts::new(
                "finetune_operator_job_unschedulable",
                "1 for each FineTuneJob whose trainer pod cannot be scheduled now.",
            ),
            &["namespace", "finetune_job"],
        )?;
        let leader = IntGauge::new(
            "finetune_operator_leader",
            "1 when this replica is the leader.",
        )?;
        let status_writes = IntCounterVec::new(
            Opts::new(
                "finetune_operator_status_writes_total",
                "Status patches sent, by result (ok, conflict: HTTP 409, error).",
            ),
            &["result"],
        )?;
        let api_writes = IntCounterVec::new(
            Opts::new(
                "finetune_operator_api_writes_total",
                "Write requests sent to the API server, by verb.",
            ),
            &["verb"],
        )?;
        registry.register(Box::new(api_writes.clone()))?;
        registry.register(Box::new(reconcile_total.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(pod_restarts.clone()))?;
        registry.register(Box::new(unschedulable_seconds.clone()))?;
        registry.register(Box::new(unschedulable_jobs.clone()))?;
        registry.register(Box::new(blocked_jobs.clone()))?;
        registry.register(Box::new(job_failed.clone()))?;
        registry.register(Box::new(job_unschedulable.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(status_writes.clone()))?;
        // Every bounded label value starts at 0, so rates and alerts see a series from the start.
        for result in ["ok", "error"] {
            reconcile_total.with_label_values(&[result]).reset();
        }
        for class in crate::RetryClass::ALL {
            reconcile_errors
                .with_label_values(&[class.as_str()])
                .reset();
        }
        for result in ["ok", "conflict", "error"] {
            status_writes.with_label_values(&[result]).reset();
        }
        for reason in ["failure", "oom", "disruption"] {
            pod_restarts.with_label_values(&[reason]).reset();
        }
        for verb in ["apply", "delete", "status"] {
            api_writes.with_label_values(&[verb]).reset();
        }
        for reason in crate::lifecycle::BLOCKING_WAIT_REASONS {
            blocked_jobs.with_label_values(&[reason]).set(0);
        }
        for phase in finetune_api::JobPhase::ALL {
            jobs.with_label_values(&[phase.as_str()]).set(0);
        }
        Ok(Metrics {
            registry,
            reconcile_total,
            reconcile_errors,
            reconcile_duration,
            jobs,
            pod_restarts,
            unschedulable_seconds,
            unschedulable_jobs,
            blocked_jobs,
            job_failed,
            job_unschedulable,
            leader,
            status_writes,
            api_writes,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = String::new();
        let encoder = prometheus::TextEncoder::new();
        if encoder
            .encode_utf8(&self.registry.gather(), &mut buf)
            .is_err()
        {
            buf.clear();
        }
        buf
    }
}
