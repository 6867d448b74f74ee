//! The `finetune_*` Prometheus metrics.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};
use std::sync::{Arc, Mutex};

use super::progress::Progress;

/// All trainer metrics plus the progress document.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Smoothed training loss.
    pub train_loss: Gauge,
    /// Validation loss.
    pub validation_loss: Gauge,
    /// validation − training loss.
    pub generalization_gap: Gauge,
    /// Best validation loss.
    pub best_validation_loss: Gauge,
    /// Validation accuracy.
    pub validation_accuracy: Gauge,
    /// 1 when overfitting is flagged.
    pub overfitting: Gauge,
    /// 1 when early stopping ended the run.
    pub early_stopped: Gauge,
    /// Retention perplexity by phase (before/after).
    pub retention_perplexity: GaugeVec,
    /// Learning rate.
    pub learning_rate: Gauge,
    /// Gradient norm before clipping.
    pub grad_norm: Gauge,
    /// The KL-to-base penalty's value in the last step (`method.lora.klToBase`).
    pub base_kl: Gauge,
    /// Optimizer step.
    pub step: Gauge,
    /// Total optimizer steps.
    pub total_steps: Gauge,
    /// Fractional epoch.
    pub epoch: Gauge,
    /// Tokens processed.
    pub tokens_total: IntCounter,
    /// Training throughput.
    pub tokens_per_second: Gauge,
    /// Checkpoint write durations.
    pub checkpoint_duration: Histogram,
    /// Checkpoints written.
    pub checkpoints_total: IntCounter,
    /// Dataset rows by outcome.
    pub data_rows: IntCounterVec,
    /// Resident memory of the process.
    pub resident_memory: Gauge,
    /// The progress document.
    pub progress: Mutex<Progress>,
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<Gauge> {
    let g = Gauge::with_opts(Opts::new(name, help))?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> prometheus::Result<Arc<Self>> {
        let r = Registry::new();
        let retention_perplexity = GaugeVec::new(
            Opts::new(
                "finetune_retention_perplexity",
                "Perplexity on the retention dataset before and after fine-tuning (forgetting check).",
            ),
            &["phase"],
        )?;
        r.register(Box::new(retention_perplexity.clone()))?;
        let tokens_total = IntCounter::new("finetune_tokens_total", "Training tokens processed.")?;
        r.register(Box::new(tokens_total.clone()))?;
        let checkpoint_duration = Histogram::with_opts(
            HistogramOpts::new(
                "finetune_checkpoint_duration_seconds",
                "Time to write a checkpoint.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0]),
        )?;
        r.register(Box::new(checkpoint_duration.clone()))?;
        let checkpoints_total =
            IntCounter::new("finetune_checkpoints_total", "Checkpoints written.")?;
        r.register(Box::new(checkpoints_total.clone()))?;
        let data_rows = IntCounterVec::new(
            Opts::new(
                "finetune_data_rows_total",
                "Dataset rows by cleaning outcome (kept, or the reason they were dropped).",
            ),
            &["outcome"],
        )?;
        r.register(Box::new(data_rows.clone()))?;
        Ok(Arc::new(Self {
            train_loss: gauge(
                &r,
                "finetune_train_loss",
                "Training loss smoothed over the last evaluation interval.",
            )?,
            validation_loss: gauge(
                &r,
                "finetune_validation_loss",
                "Validation loss on the whole validation split.",
            )?,
            generalization_gap: gauge(
                &r,
                "finetune_generalization_gap",
                "Validation loss minus training loss.",
            )?,
            best_validation_loss: gauge(
                &r,
                "finetune_best_validation_loss",
                "Best validation loss so far.",
            )?,
            validation_accuracy: gauge(
                &r,
                "finetune_validation_accuracy",
                "Validation accuracy by label log-likelihood (classification datasets).",
            )?,
            overfitting: gauge(
                &r,
                "finetune_overfitting",
                "1 when overfitting is flagged, else 0.",
            )?,
            early_stopped: gauge(
                &r,
                "finetune_early_stopped",
                "1 when early stopping ended the run, else 0.",
            )?,
            retention_perplexity,
            learning_rate: gauge(&r, "finetune_learning_rate", "Current learning rate.")?,
            grad_norm: gauge(
                &r,
                "finetune_grad_norm",
                "Global gradient norm before clipping.",
            )?,
            base_kl: gauge(
                &r,
                "finetune_base_kl",
                "KL divergence (nats per compared prompt position) of the tuned model's \
                 next-token distribution from the base's in the last step; only with \
                 method.lora.klToBase.",
            )?,
            step: gauge(&r, "finetune_step", "Optimizer steps done.")?,
            total_steps: gauge(&r, "finetune_total_steps", "Planned optimizer steps.")?,
            epoch: gauge(&r, "finetune_epoch", "Current (fractional) epoch.")?,
            tokens_total,
            tokens_per_second: gauge(
                &r,
                "finetune_tokens_per_second",
                "Training throughput in tokens per second.",
            )?,
            checkpoint_duration,
            checkpoints_total,
            data_rows,
            resident_memory: gauge(
                &r,
                "finetune_process_resident_memory_bytes",
                "Resident memory of the trainer process in bytes.",
            )?,
            progress: Mutex::new(Progress::default()),
            registry: r,
        }))
    }

    /// Updates the resident-memory gauge from /proc (Linux).
    pub fn refresh_memory(&self) {
        if let Some(rss) = resident_memory_bytes() {
            self.resident_memory.set(rss as f64);
        }
    }

    /// Prometheus text exposition of all metrics.
    pub fn render(&self) -> String {
        self.refresh_memory();
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if enc.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Applies a change to the progress document.
    pub fn update_progress(&self, f: impl FnOnce(&mut Progress)) {
        if let Ok(mut p) = self.progress.lock() {
            f(&mut p);
        }
    }

    /// The progress document as JSON.
    pub fn progress_json(&self) -> String {
        self.progress
            .lock()
            .ok()
            .and_then(|p| serde_json::to_string(&*p).ok())
            .unwrap_or_else(|| "{}".into())
    }
}

/// Resident set size of this process, from `/proc/self/statm`.
pub fn resident_memory_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Peak resident set size (VmHWM) of this process.
pub fn peak_memory_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
