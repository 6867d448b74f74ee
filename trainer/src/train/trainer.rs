//! The training loop: micro-batches with gradient accumulation, clipping, AdamW with a schedule,
//! periodic evaluation, checkpoints (also on SIGTERM) and exact resume.

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use finetune_api::console::ProgressBar;

use super::batching::micro_batches;
use super::data_prep::{PreparedData, prepare};
use super::params::TrainParams;
use super::step::{StepSettings, optimizer_step};
use crate::checkpoint::{CheckpointState, CheckpointStore};
use crate::data::batch::Batch;
use crate::data::encode::Encoder;
use crate::eval::classify::ClassificationSet;
use crate::eval::{ClassificationReport, EvalPoint, OverfitMonitor, OverfitVerdict};
use crate::metrics::{Metrics, Phase};
use crate::model::weights::Weights;
use crate::model::{Llama, LlamaConfig};
use crate::optim::{AdamW, AdamWParams, Schedule};
use crate::rng::Rng;
use crate::{Result, TrainerError};

/// One optimizer step's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step number (1-based).
    pub step: usize,
    /// Epoch.
    pub epoch: usize,
    /// Mean training loss over the step's micro-batches.
    pub loss: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens in the step.
    pub tokens: usize,
}

/// An evaluation's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// The point.
    pub point: EvalPoint,
    /// Verdict.
    pub verdict: OverfitVerdict,
    /// Classification metrics, if any.
    pub classification: Option<ClassificationReport>,
}

/// Why the run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// All epochs or max steps done.
    Completed,
    /// Early stopping.
    EarlyStopped(String),
    /// SIGTERM (or a requested stop): checkpointed for resume.
    Interrupted,
}

/// State kept in checkpoints besides the core position (opaque `extra`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ExtraState {
    monitor: OverfitMonitor,
    evals: Vec<EvalRecord>,
    history: Vec<StepRecord>,
}

/// A training run.
pub struct Trainer {
    /// Parameters.
    pub params: TrainParams,
    /// The model.
    pub model: Llama,
    /// Tokenizer and template.
    pub encoder: Encoder,
    /// Data.
    pub data: PreparedData,
    /// Device.
    pub device: Device,
    opt: AdamW,
    schedule: Schedule,
    state: CheckpointState,
    store: CheckpointStore,
    /// Step history (including steps before a resume).
    pub history: Vec<StepRecord>,
    /// Evaluations.
    pub evals: Vec<EvalRecord>,
    /// Overfitting monitor.
    pub monitor: OverfitMonitor,
    classification: Option<ClassificationSet>,
    stop_flag: Arc<AtomicBool>,
    metrics: Option<Arc<Metrics>>,
    /// Steps per epoch.
    pub steps_per_epoch: usize,
    /// Planned optimizer steps.
    pub total_steps: usize,
    /// Checkpoint the run resumed from, and the invalid ones skipped.
    pub resumed_from: Option<(String, Vec<String>)>,
    /// Latest checkpoint written.
    pub latest_checkpoint: Option<String>,
}

/// Result of [`Trainer::run`].
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Why it stopped.
    pub reason: StopReason,
    /// Steps done.
    pub steps: usize,
    /// Wall time of this call.
    pub seconds: f64,
    /// Training tokens processed in this call.
    pub tokens: usize,
}

/// The device to use: the CPU, or the first GPU the process sees (`CUDA_VISIBLE_DEVICES`, which
/// the device plugin sets to the GPUs granted by `resources.gpus`, decides which one that is). A
/// GPU job never falls back to the CPU: a binary built without CUDA, or a node whose GPU cannot be
/// opened, is an error that says so.
pub fn select_device(use_gpu: bool) -> Result<Device> {
    if !use_gpu {
        return Ok(Device::Cpu);
    }
    if !candle_core::utils::cuda_is_available() {
        return Err(TrainerError::Config(
            "useGpu is set (the job asks for GPUs) but this finetune-trainer was built without \
             CUDA: use the -cuda trainer image (make cuda-build), or set resources.gpus: 0 to \
             train on the CPU"
                .into(),
        ));
    }
    Device::new_cuda(0).map_err(|e| {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
        TrainerError::Config(format!(
            "cannot open the GPU (CUDA_VISIBLE_DEVICES={visible}): {e}"
        ))
    })
}

impl Trainer {
    /// Loads the model and data; with `resume`, continues from the newest valid checkpoint.
    pub fn new(params: TrainParams, resume: bool, metrics: Option<Arc<Metrics>>) -> Result<Self> {
        let set_phase = |ph: Phase| {
            if let Some(m) = &metrics {
                m.update_progress(|p| p.phase = ph);
            }
        };
        set_phase(Phase::Loading);
        let device = select_device(params.use_gpu)?;
        let dtype = if params.bf16 && device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        let mut cfg = LlamaConfig::from_file(&params.model_dir.join("config.json"))?;
        if let Some(act) = &params.activation {
            cfg.hidden_act = act.clone();
            cfg.validate()?;
        }
        let encoder = Encoder::from_file(
            &params.tokenizer,
            params.template.clone(),
            params.max_seq_len,
        )?;
        if encoder.vocab_size() > cfg.vocab_size {
            return Err(TrainerError::Config(format!(
                "tokenizer has {} tokens but the model only {}",
                encoder.vocab_size(),
                cfg.vocab_size
            )));
        }
        set_phase(Phase::PreparingData);
        let data = prepare(&params, &encoder)?;
        if data.train.is_empty() {
            return Err(TrainerError::Data("no training rows".into()));
        }
        if let Some(m) = &metrics {
            m.data_rows
                .with_label_values(&["kept"])
                .inc_by(data.report.rows_kept as u64);
            for (reason, n) in &data.report.dropped {
                m.data_rows.with_label_values(&[reason]).inc_by(*n as u64);
            }
        }
        set_phase(Phase::Loading);
        let weights = Weights::from_dir(&params.model_dir, dtype, &device)?;
        let model = Llama::from_weights(&cfg, weights, &params.method, params.seed, &device)?;
        tracing::info!(
            trainable = model.trainable_count(),
            tensors = model.trainable().len(),
            train = data.train.len(),
            validation = data.val.len(),
            "model and data ready"
        );
        let micro_per_epoch = data.train.len().div_ceil(params.batch_size.max(1));
        let steps_per_epoch = micro_per_epoch.div_ceil(params.grad_accum.max(1));
        let mut total_steps = steps_per_epoch * params.epochs.max(1);
        if let Some(m) = params.max_steps {
            total_steps = total_steps.min(m.max(1));
        }
        let schedule = Schedule {
            base_lr: params.learning_rate,
            warmup: params.warmup_steps,
            total: total_steps,
            kind: params.schedule,
        };
        let opt = AdamW::new(AdamWParams {
            weight_decay: params.weight_decay,
            ..Default::default()
        });
        let store =
            CheckpointStore::new(&params.checkpoint_dir, params.keep_last, params.keep_best)?;
        let classification = match (&data.majority_class, data.labels.is_empty()) {
            (Some(maj), false) => Some(ClassificationSet::new(
                &encoder,
                &data.val_examples[..data.val_examples.len().min(params.eval.max_rows)],
                &data.labels,
                maj,
            )?),
            _ => None,
        };
        let monitor = OverfitMonitor {
            max_gap: params.eval.max_gap,
            max_ratio: params.eval.max_ratio,
            rising_evaluations: params.eval.rising_evaluations,
            patience: params.eval.early_stopping_patience,
            min_delta: params.eval.min_delta,
            ..Default::default()
        };
        let state = CheckpointState {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            rng: Rng::derive(params.seed, 0xD80),
            optimizer_step: 0,
            val_loss: None,
            best: None,
            extra: serde_json::Value::Null,
        };
        let mut t = Self {
            params,
            model,
            encoder,
            data,
            device,
            opt,
            schedule,
            state,
            store,
            history: vec![],
            evals: vec![],
            monitor,
            classification,
            stop_flag: Arc::new(AtomicBool::new(false)),
            metrics,
            steps_per_epoch,
            total_steps,
            resumed_from: None,
            latest_checkpoint: None,
        };
        if resume {
            t.resume()?;
        }
        if let Some(m) = &t.metrics {
            m.total_steps.set(t.total_steps as f64);
        }
        Ok(t)
    }

    fn resume(&mut self) -> Result<()> {
        let (ckpt, skipped) = self.store.latest_valid(&self.device)?;
        let Some(c) = ckpt else {
            if !skipped.is_empty() {
                tracing::warn!(
                    skipped = skipped.len(),
                    "no valid checkpoint; starting fresh"
                );
            }
            return Ok(());
        };
        self.model.load_trainable(&c.weights)?;
        self.opt.load_state(c.state.optimizer_step, &c.optimizer)?;
        let extra: ExtraState = serde_json::from_value(c.state.extra.clone()).unwrap_or_default();
        self.monitor = OverfitMonitor {
            history: extra.monitor.history,
            best: extra.monitor.best,
            since_best: extra.monitor.since_best,
            ever_overfit: extra.monitor.ever_overfit,
            ..self.monitor.clone()
        };
        self.evals = extra.evals;
        self.history = extra.history;
        tracing::info!(checkpoint = %c.dir.display(), step = c.state.step, "resumed");
        self.resumed_from = Some((c.dir.display().to_string(), skipped));
        let from = c.state.step as u64;
        self.progress(|p| p.resumed_from_step = from);
        self.state = c.state;
        Ok(())
    }

    /// A flag that, when set (e.g. by SIGTERM), makes the loop checkpoint and return.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop_flag.clone()
    }

    /// Optimizer steps done.
    pub fn step(&self) -> usize {
        self.state.step
    }

    fn progress(&self, f: impl FnOnce(&mut crate::metrics::Progress)) {
        if let Some(m) = &self.metrics {
            m.update_progress(f);
        }
    }

    /// Writes a checkpoint of the current state.
    pub fn checkpoint(&mut self) -> Result<String> {
        let t0 = Instant::now();
        self.progress(|p| p.phase = Phase::Checkpointing);
        let extra = ExtraState {
            monitor: self.monitor.clone(),
            evals: self.evals.clone(),
            history: self.history.clone(),
        };
        self.state.optimizer_step = self.opt.step;
        self.state.best = self.monitor.best;
        self.state.extra = serde_json::to_value(&extra)?;
        let dir = self.store.save(
            &self.state,
            &self.model.trainable_tensors(),
            &self.opt.state_tensors(),
        )?;
        let dir = dir.display().to_string();
        let seconds = t0.elapsed().as_secs_f64();
        tracing::info!(checkpoint = %dir, step = self.state.step, seconds, "checkpoint saved");
        if let Some(m) = &self.metrics {
            m.checkpoint_duration.observe(seconds);
            m.checkpoints_total.inc();
        }
        let best = self.monitor.best.map(|(_, s)| format!("checkpoint-{s:08}"));
        let d2 = format!("checkpoint-{:08}", self.state.step);
        let step = self.state.step as u64;
        let best_loss = self.monitor.best;
        self.progress(|p| {
            p.phase = Phase::Training;
            p.latest_checkpoint = Some(d2);
            p.latest_checkpoint_step = Some(step);
            p.best_checkpoint = best;
            p.best_validation_loss = best_loss.map(|b| b.0);
            p.best_step = best_loss.map(|b| b.1 as u64);
        });
        self.latest_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    /// Evaluates on the validation split (forward only) and updates the monitor.
    pub fn evaluate(&mut self) -> Result<EvalRecord> {
        self.progress(|p| p.phase = Phase::Evaluating);
        let scored = &self.data.val[..self.data.val.len().min(self.params.eval.max_rows)];
        let val_loss = crate::eval::mean_nll(&self.model, scored, 32, &self.device)?;
        let classification = match &self.classification {
            Some(c) => Some(c.evaluate(&self.model, 32, &self.device)?),
            None => None,
        };
        let since = self.monitor.history.last().map_or(0, |p| p.step);
        let recent: Vec<f32> = self
            .history
            .iter()
            .filter(|r| r.step > since)
            .map(|r| r.loss)
            .collect();
        let train_loss = if recent.is_empty() {
            f64::NAN
        } else {
            recent.iter().map(|x| *x as f64).sum::<f64>() / recent.len() as f64
        };
        let point = EvalPoint {
            step: self.state.step,
            epoch: self.state.step as f64 / self.steps_per_epoch.max(1) as f64,
            train_loss,
            val_loss,
            accuracy: classification.as_ref().map(|c| c.accuracy),
            retention_perplexity: None,
        };
        let verdict = self.monitor.observe(point.clone());
        tracing::info!(
            step = point.step,
            train_loss = point.train_loss,
            val_loss,
            accuracy = ?point.accuracy,
            overfitting = verdict.overfitting,
            "evaluation"
        );
        if let Some(m) = &self.metrics {
            m.train_loss.set(train_loss);
            m.validation_loss.set(val_loss);
            m.generalization_gap.set(verdict.gap);
            if let Some((b, _)) = self.monitor.best {
                m.best_validation_loss.set(b);
            }
            if let Some(a) = point.accuracy {
                m.validation_accuracy.set(a);
            }
            m.overfitting
                .set(if verdict.overfitting { 1.0 } else { 0.0 });
        }
        let (acc, gap, ov) = (point.accuracy, verdict.gap, verdict.overfitting);
        let reason = verdict.reason.clone();
        let best = self.monitor.best;
        self.progress(|p| {
            p.phase = Phase::Training;
            p.validation_loss = Some(val_loss);
            p.train_loss = Some(train_loss);
            p.generalization_gap = Some(gap);
            p.validation_accuracy = acc;
            p.overfitting = ov;
            p.overfitting_reason = reason;
            p.best_validation_loss = best.map(|b| b.0);
            p.best_step = best.map(|b| b.1 as u64);
        });
        let rec = EvalRecord {
            point,
            verdict,
            classification,
        };
        self.evals.push(rec.clone());
        Ok(rec)
    }

    /// Runs one optimizer step over `group` micro-batches; returns the step record.
    fn optimizer_step(&mut self, group: &[Vec<usize>]) -> Result<StepRecord> {
        let (data, device) = (&self.data, &self.device);
        let batches = group.iter().map(|idx| {
            let items: Vec<_> = idx.iter().map(|&i| &data.train[i]).collect();
            Batch::new(&items, 0, device)
        });
        let settings = StepSettings {
            max_grad_norm: self.params.max_grad_norm,
            gradient_checkpointing: self.params.gradient_checkpointing,
            reference_matmul: false,
        };
        let lr = self.schedule.lr(self.state.step);
        let outcome = optimizer_step(
            &self.model,
            &mut self.opt,
            batches,
            lr,
            &settings,
            Some(&mut self.state.rng),
        )?;
        self.state.step += 1;
        Ok(StepRecord {
            step: self.state.step,
            epoch: self.state.epoch,
            loss: outcome.loss,
            lr,
            grad_norm: outcome.grad_norm,
            tokens: outcome.tokens,
        })
    }

    /// Trains until done, early stopping, the stop flag, or `stop_at_step` (which checkpoints
    /// and returns as SIGTERM would).
    pub fn run(&mut self, stop_at_step: Option<usize>) -> Result<RunOutcome> {
        let t0 = Instant::now();
        let start_step = self.state.step;
        let mut tokens_run = 0usize;
        self.progress(|p| p.phase = Phase::Training);
        let accum = self.params.grad_accum.max(1);
        let eval_interval = self.params.eval.interval;
        let ckpt_interval = self.params.checkpoint_interval;
        let mut last_log = Instant::now();
        let mut bar = ProgressBar::new("train", "steps", self.total_steps as u64)
            .resumed_at(start_step as u64);
        while self.state.step < self.total_steps && self.state.epoch < self.params.epochs.max(1) {
            let lengths: Vec<usize> = self.data.train.iter().map(|e| e.ids.len()).collect();
            let batches = micro_batches(
                &lengths,
                self.params.batch_size,
                self.params.seed,
                self.state.epoch,
                self.params.group_by_length,
            );
            while self.state.batch_in_epoch < batches.len() && self.state.step < self.total_steps {
                let end = (self.state.batch_in_epoch + accum).min(batches.len());
                let group = batches[self.state.batch_in_epoch..end].to_vec();
                let rec = self.optimizer_step(&group)?;
                self.state.batch_in_epoch = end;
                tokens_run += rec.tokens;
                let elapsed = t0.elapsed().as_secs_f64();
                let tps = tokens_run as f64 / elapsed.max(1e-9);
                if let Some(m) = &self.metrics {
                    m.step.set(rec.step as f64);
                    m.learning_rate.set(rec.lr);
                    m.grad_norm.set(rec.grad_norm);
                    m.tokens_total.inc_by(rec.tokens as u64);
                    m.tokens_per_second.set(tps);
                    m.epoch
                        .set(rec.step as f64 / self.steps_per_epoch.max(1) as f64);
                }
                let (step, total, spe) = (rec.step, self.total_steps, self.steps_per_epoch);
                let done_here = step.saturating_sub(start_step);
                let eta = if done_here > 0 {
                    elapsed / done_here as f64 * total.saturating_sub(step) as f64
                } else {
                    0.0
                };
                let loss = rec.loss as f64;
                let epoch = (step.saturating_sub(1) / spe.max(1) + 1) as u32;
                self.progress(|p| {
                    p.step = step as u64;
                    p.total_steps = total as u64;
                    p.epoch = epoch;
                    p.train_loss = Some(loss);
                    p.eta_seconds = Some(eta as u64);
                    p.tokens_per_second = Some(tps);
                });
                bar.set(step as u64, &format!("loss {:.4}", rec.loss));
                if !bar.enabled() && (last_log.elapsed().as_secs_f64() > 5.0 || step == 1) {
                    tracing::info!(
                        step,
                        total,
                        loss = rec.loss,
                        lr = rec.lr,
                        grad_norm = rec.grad_norm,
                        tokens_per_s = tps,
                        "train"
                    );
                    last_log = Instant::now();
                }
                self.history.push(rec);
                let epoch_end = self.state.batch_in_epoch >= batches.len();
                let last = self.state.step >= self.total_steps;
                if epoch_end {
                    self.state.epoch += 1;
                    self.state.batch_in_epoch = 0;
                }
                let mut stop_reason = None;
                if (eval_interval > 0 && self.state.step.is_multiple_of(eval_interval))
                    || epoch_end
                    || last
                {
                    bar.clear();
                    let ev = self.evaluate()?;
                    if ev.verdict.improved && self.params.keep_best {
                        bar.clear();
                        self.checkpoint()?;
                    }
                    if let Some(why) = ev.verdict.stop.clone() {
                        stop_reason = Some(StopReason::EarlyStopped(why));
                    }
                }
                if ckpt_interval > 0
                    && self.state.step.is_multiple_of(ckpt_interval)
                    && !self.checkpointed_now()
                {
                    bar.clear();
                    self.checkpoint()?;
                }
                if let Some(r) = stop_reason {
                    if let Some(m) = &self.metrics {
                        m.early_stopped.set(1.0);
                    }
                    if !self.checkpointed_now() {
                        bar.clear();
                        self.checkpoint()?;
                    }
                    return Ok(RunOutcome {
                        reason: r,
                        steps: self.state.step,
                        seconds: t0.elapsed().as_secs_f64(),
                        tokens: tokens_run,
                    });
                }
                if self.stop_flag.load(Ordering::SeqCst)
                    || stop_at_step.is_some_and(|s| self.state.step >= s)
                {
                    if !self.checkpointed_now() {
                        bar.clear();
                        self.checkpoint()?;
                    }
                    return Ok(RunOutcome {
                        reason: StopReason::Interrupted,
                        steps: self.state.step,
                        seconds: t0.elapsed().as_secs_f64(),
                        tokens: tokens_run,
                    });
                }
                if epoch_end {
                    break;
                }
            }
            if self.state.batch_in_epoch >= batches.len() {
                self.state.epoch += 1;
                self.state.batch_in_epoch = 0;
            }
        }
        if !self.checkpointed_now() {
            bar.clear();
            self.checkpoint()?;
        }
        Ok(RunOutcome {
            reason: StopReason::Completed,
            steps: self.state.step,
            seconds: t0.elapsed().as_secs_f64(),
            tokens: tokens_run,
        })
    }

    fn checkpointed_now(&self) -> bool {
        let want = self
            .store
            .root()
            .join(format!("checkpoint-{:08}", self.state.step));
        self.latest_checkpoint.as_deref() == Some(want.display().to_string().as_str())
    }

    /// Loads the best checkpoint's trainable weights into the model (after early stopping).
    pub fn restore_best(&mut self) -> Result<Option<usize>> {
        let Some((_, step)) = self.monitor.best else {
            return Ok(None);
        };
        let dir = self.store.root().join(format!("checkpoint-{step:08}"));
        if !dir.exists() {
            return Ok(None);
        }
        let c = CheckpointStore::load(&dir, &self.device)?;
        self.model.load_trainable(&c.weights)?;
        Ok(Some(step))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_job_gets_the_cpu() {
        assert!(matches!(select_device(false).unwrap(), Device::Cpu));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_job_on_a_binary_without_cuda_fails_instead_of_training_on_the_cpu() {
        let err = select_device(true).unwrap_err().to_string();
        assert!(err.contains("built without CUDA"), "{err}");
        assert!(err.contains("resources.gpus: 0"), "{err}");
    }
}
