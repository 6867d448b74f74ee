//! Learning-rate schedules with linear warmup.

use serde::{Deserialize, Serialize};

use finetune_api::LrScheduler;

/// A learning-rate schedule over optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Warmup steps (linear from base_lr/warmup to base_lr).
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
    /// Decay shape after warmup: the API's own enum (`hyperparameters.scheduler`).
    pub kind: LrScheduler,
}

impl Schedule {
    /// Learning rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if self.warmup > 0 && step < self.warmup {
            return self.base_lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup.min(step)) as f64 / span).clamp(0.0, 1.0);
        match self.kind {
            LrScheduler::Constant => self.base_lr,
            LrScheduler::Linear => self.base_lr * (1.0 - progress),
            LrScheduler::Cosine => {
                self.base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = Schedule {
            base_lr: 1.0,
            warmup: 4,
            total: 14,
            kind: LrScheduler::Cosine,
        };
        assert!((s.lr(0) - 0.25).abs() < 1e-12);
        assert!((s.lr(3) - 1.0).abs() < 1e-12);
        assert!((s.lr(4) - 1.0).abs() < 1e-12);
        assert!((s.lr(9) - 0.5).abs() < 1e-12);
        assert!(s.lr(14).abs() < 1e-12);
        let l = Schedule {
            kind: LrScheduler::Linear,
            ..s
        };
        assert!((l.lr(9) - 0.5).abs() < 1e-12);
        let c = Schedule {
            kind: LrScheduler::Constant,
            ..s
        };
        assert!((c.lr(13) - 1.0).abs() < 1e-12);
    }
}
