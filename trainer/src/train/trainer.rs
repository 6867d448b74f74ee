//! The training loop: micro-batches with gradient accumulation, clipping, AdamW with a schedule,
//! periodic evaluation, checkpoints (also on SIGTERM) and exact resume.

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use finetune_api::console::ProgressBar;

use super::batching::micro_batches;
use super::data_prep::{PreparedData, prepare};
use super::params::TrainParams;
use super::step::{StepSettings, optimizer_step_across};
use crate::checkpoint::{CheckpointState, CheckpointStore};
use crate::data::batch::Batch;
use crate::data::encode::Encoder;
use crate::distributed::{Collective, SingleProcess};
use crate::eval::classify::ClassificationSet;
use crate::eval::{ClassificationReport, EvalPoint, OverfitMonitor, OverfitVerdict};
use crate::metrics::{Metrics, Phase};
use crate::model::linear::ggml_dtype;
use crate::model::quantized_cache::QuantizedCache;
use crate::model::weights::{Weights, weight_files};
use crate::model::{Llama, LlamaConfig, TrainableSpec};
use crate::optim::{AdamW, AdamWParams, Schedule};
use crate::rng::Rng;
use crate::workers::cpu_workers;
use crate::{Result, TrainerError};

mod checkpointing;
mod evaluation;
mod gang;

use super::device::layer_devices;

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
    /// The KL-to-base penalty's mean value in the step (unweighted), when one is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_kl: Option<f32>,
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
    collective: Box<dyn Collective>,
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

impl Trainer {
    /// Loads the model and data; with `resume`, continues from the newest valid checkpoint.
    pub fn new(params: TrainParams, resume: bool, metrics: Option<Arc<Metrics>>) -> Result<Self> {
        let set_phase = |ph: Phase| {
            if let Some(m) = &metrics {
                m.update_progress(|p| p.phase = ph);
            }
        };
        set_phase(Phase::Loading);
        let mut cfg = LlamaConfig::from_file(&params.model_dir.join("config.json"))?;
        if let Some(act) = &params.activation {
            cfg.hidden_act = act.clone();
            cfg.validate()?;
        }
        let placement = layer_devices(
            params.use_gpu,
            params.gpu_ordinal,
            &params.layer_gpus,
            cfg.num_hidden_layers,
        )?;
        let device = placement.input().clone();
        if placement.is_split() {
            tracing::info!(layer_gpus = ?params.layer_gpus, "decoder layers split over GPUs");
        }
        let dtype = if params.bf16 && device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
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
        let mut params = params;
        if let TrainableSpec::Lora(lora) = &mut params.method
            && lora.train_label_tokens
        {
            if data.labels.is_empty() {
                return Err(TrainerError::Config(
                    "method.lora.trainLabelTokens needs a classification dataset: the data has \
                     no class labels"
                        .into(),
                ));
            }
            lora.head_token_ids = encoder.label_token_ids(&data.labels)?;
            tracing::info!(
                labels = ?data.labels,
                tokens = ?lora.head_token_ids,
                "training the lm_head rows of the label tokens"
            );
        }
        set_phase(Phase::Loading);
        // A quantized base is quantized while loading, one tensor at a time.
        let quantize = match &params.method {
            TrainableSpec::Lora(lora) => ggml_dtype(lora.base_quantization),
            _ => None,
        };
        let files = weight_files(&params.model_dir)?;
        let weights = match (quantize, &params.quantized_cache_dir) {
            (Some(format), Some(dir)) => {
                let cache = QuantizedCache {
                    dir: dir.clone(),
                    model_commit: params.run.model_commit.clone(),
                };
                let started = std::time::Instant::now();
                let (weights, outcome) =
                    Weights::load_quantizing_cached(&files, dtype, &placement, format, &cache)?;
                tracing::info!(
                    %outcome,
                    dir = %dir.display(),
                    seconds = started.elapsed().as_secs_f64(),
                    "quantized base loaded"
                );
                weights
            }
            _ => Weights::load_quantizing(&files, dtype, &placement, quantize)?,
        };
        let base_format = match &params.method {
            TrainableSpec::Lora(lora) if quantize.is_some() => lora.base_quantization.name(),
            _ => dtype.as_str(),
        };
        if let Some(m) = &metrics {
            m.update_progress(|p| p.base_format = Some(base_format.to_string()));
        }
        let model =
            Llama::from_weights_placed(&cfg, weights, &params.method, params.seed, &placement)?;
        tracing::info!(
            trainable = model.trainable_count(),
            tensors = model.trainable().len(),
            train = data.train.len(),
            validation = data.val.len(),
            "model and data ready"
        );
        let (steps_per_epoch, total_steps) = plan_steps(&params, data.train.len(), 1);
        let schedule = schedule_of(&params, total_steps);
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
            run: None,
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
            collective: Box::new(SingleProcess),
        };
        if resume {
            t.resume()?;
        }
        if let Some(m) = &t.metrics {
            m.total_steps.set(t.total_steps as f64);
        }
        Ok(t)
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

    /// Runs one optimizer step over the step's `group` of micro-batches (of all ranks; this
    /// rank computes its contiguous share); returns the step record.
    fn optimizer_step(&mut self, group: &[Vec<usize>]) -> Result<StepRecord> {
        let (data, device) = (&self.data, &self.device);
        let per_rank = self.params.grad_accum.max(1);
        let first = (self.collective.rank() * per_rank).min(group.len());
        let share = &group[first..(first + per_rank).min(group.len())];
        let batches = share.iter().map(|idx| {
            let items: Vec<_> = idx.iter().map(|&i| &data.train[i]).collect();
            Batch::new(&items, 0, device)
        });
        let settings = StepSettings {
            max_grad_norm: self.params.max_grad_norm,
            gradient_checkpointing: self.params.gradient_checkpointing,
            reference_matmul: false,
            base_kl: self.params.base_kl,
            cpu_workers: cpu_workers(device),
        };
        let lr = self.schedule.lr(self.state.step);
        let outcome = optimizer_step_across(
            &self.model,
            &mut self.opt,
            batches,
            lr,
            &settings,
            Some(&mut self.state.rng),
            self.collective.as_mut(),
        )?;
        self.state.step += 1;
        Ok(StepRecord {
            step: self.state.step,
            epoch: self.state.epoch,
            loss: outcome.loss,
            lr,
            grad_norm: outcome.grad_norm,
            tokens: outcome.tokens,
            base_kl: outcome.base_kl,
        })
    }

    /// Trains until done, early stopping, the stop flag, or `stop_at_step` (which checkpoints
    /// and returns as SIGTERM would).
    pub fn run(&mut self, stop_at_step: Option<usize>) -> Result<RunOutcome> {
        let t0 = Instant::now();
        let start_step = self.state.step;
        let mut tokens_run = 0usize;
        self.progress(|p| p.phase = Phase::Training);
        let accum = self.params.grad_accum.max(1) * self.collective.world_size();
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
                    if let Some(kl) = rec.base_kl {
                        m.base_kl.set(f64::from(kl));
                    }
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
                        base_kl = rec.base_kl,
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
                if self.stop_requested()? || stop_at_step.is_some_and(|s| self.state.step >= s) {
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
}

/// Optimizer steps per epoch and in all for `train_rows` rows over `world` ranks, each step
/// taking `grad_accum` micro-batches of `batch_size` rows per rank.
fn plan_steps(params: &TrainParams, train_rows: usize, world: usize) -> (usize, usize) {
    let micro_per_epoch = train_rows.div_ceil(params.batch_size.max(1));
    let per_epoch = micro_per_epoch.div_ceil(params.grad_accum.max(1) * world.max(1));
    let mut total = per_epoch * params.epochs.max(1);
    if let Some(m) = params.max_steps {
        total = total.min(m.max(1));
    }
    (per_epoch, total)
}

/// The learning-rate schedule of a run of `total_steps`.
fn schedule_of(params: &TrainParams, total_steps: usize) -> Schedule {
    Schedule {
        base_lr: params.learning_rate,
        warmup: params.warmup_steps,
        total: total_steps,
        kind: params.schedule,
    }
}
