//! The trainer in a data-parallel gang: joining it (the plan of steps for the world size and
//! the check that every rank starts where rank 0 does), which rank writes, and the stop flag
//! agreed by all ranks.

use candle_core::DType;
use std::sync::atomic::Ordering;

use super::{Trainer, plan_steps, schedule_of};
use crate::distributed::Collective;
use crate::{Result, TrainerError};

impl Trainer {
    /// Makes this trainer one rank of the data-parallel gang `collective` connects: each
    /// optimizer step takes `grad_accum` micro-batches per rank (the step's global batch grows
    /// with the world size, the plan of steps shrinks), gradients are summed across the ranks,
    /// and only rank 0 writes checkpoints. Fails when the ranks did not start from the same
    /// position and weights (a rank that resumed elsewhere, or a nondeterministic start).
    pub fn join(&mut self, collective: Box<dyn Collective>) -> Result<()> {
        self.collective = collective;
        let world = self.collective.world_size();
        let (per_epoch, total) = plan_steps(&self.params, self.data.train.len(), world);
        self.steps_per_epoch = per_epoch;
        self.total_steps = total;
        self.schedule = schedule_of(&self.params, total);
        if let Some(m) = &self.metrics {
            m.total_steps.set(total as f64);
        }
        if world == 1 {
            return Ok(());
        }
        let own = self.start_fingerprint()?;
        let mut primary = own.clone();
        self.collective.broadcast(&mut primary)?;
        if primary != own {
            return Err(TrainerError::Collective {
                rank: self.collective.rank(),
                reason: format!(
                    "this rank starts at (step, epoch, micro-batch, weight sum, weight square sum) {own:?}, rank 0 at {primary:?}: every rank must resume from the same checkpoint"
                ),
            });
        }
        tracing::info!(
            rank = self.collective.rank(),
            world,
            backend = self.collective.backend(),
            steps = total,
            "joined the data-parallel gang"
        );
        Ok(())
    }

    /// Where this rank starts: its position and two sums over its trainable weights.
    fn start_fingerprint(&self) -> Result<Vec<f32>> {
        let (mut sum, mut squares) = (0f64, 0f64);
        for (_, var) in self.model.trainable() {
            let t = var.as_tensor().to_dtype(DType::F64)?;
            sum += t.sum_all()?.to_scalar::<f64>()?;
            squares += t.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
        let s = &self.state;
        Ok(vec![
            s.step as f32,
            s.epoch as f32,
            s.batch_in_epoch as f32,
            sum as f32,
            squares as f32,
        ])
    }

    /// Whether this trainer writes checkpoints, the report and the outputs (rank 0, or a run
    /// without a gang).
    pub fn is_primary(&self) -> bool {
        self.collective.rank() == 0
    }

    /// Whether the stop flag is set on any rank (on all ranks alike, so the gang stops at the
    /// same step and rank 0 checkpoints it).
    pub(super) fn stop_requested(&mut self) -> Result<bool> {
        let mut flag = [f32::from(self.stop_flag.load(Ordering::SeqCst))];
        self.collective.all_reduce_sum(&mut flag)?;
        Ok(flag[0] > 0.0)
    }
}
