//! The trainer's checkpoints: written with everything a resume needs (weights, optimizer, RNG,
//! the overfitting monitor and the history), resumed from, and the best one restored.

use std::time::Instant;

use super::{ExtraState, Trainer};
use crate::checkpoint::CheckpointStore;
use crate::eval::OverfitMonitor;
use crate::metrics::Phase;
use crate::{Result, TrainerError};

impl Trainer {
    /// Continues from the newest checkpoint whose manifest verifies (none: a fresh start).
    pub(super) fn resume(&mut self) -> Result<()> {
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
        if let Some(why) = self.params.run.refusal(c.state.run.as_ref()) {
            return Err(TrainerError::Checkpoint {
                path: c.dir.clone(),
                reason: format!("refusing to resume: {why}"),
            });
        }
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

    /// Writes a checkpoint of the current state (rank 0 only: the other ranks of a gang hold the
    /// same state; they return an empty name).
    pub fn checkpoint(&mut self) -> Result<String> {
        if !self.is_primary() {
            return Ok(String::new());
        }
        let t0 = Instant::now();
        self.progress(|p| p.phase = Phase::Checkpointing);
        let extra = ExtraState {
            monitor: self.monitor.clone(),
            evals: self.evals.clone(),
            history: self.history.clone(),
        };
        self.state.optimizer_step = self.opt.step;
        self.state.run = Some(self.params.run.clone());
        self.state.best = self.monitor.best;
        self.state.extra = serde_json::to_value(&extra)?;
        let dir = self.store.save(
            &self.state,
            &self.model.trainable_tensors(),
            &self.opt.state_tensors()?,
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

    /// Whether a checkpoint of the current step was just written.
    pub(super) fn checkpointed_now(&self) -> bool {
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
