//! Overfitting detection and early stopping over the evaluation history.

use serde::{Deserialize, Serialize};

/// One evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    /// Optimizer step.
    pub step: usize,
    /// Epoch (fractional).
    pub epoch: f64,
    /// Training loss smoothed over the interval since the previous evaluation.
    pub train_loss: f64,
    /// Validation loss.
    pub val_loss: f64,
    /// Validation accuracy (classification datasets).
    pub accuracy: Option<f64>,
    /// Retention perplexity, when measured at this evaluation.
    pub retention_perplexity: Option<f64>,
}

/// The monitor's verdict after an evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OverfitVerdict {
    /// validation − training loss.
    pub gap: f64,
    /// validation / training loss.
    pub ratio: f64,
    /// Whether overfitting is flagged.
    pub overfitting: bool,
    /// Why it is flagged.
    pub reason: Option<String>,
    /// Whether this evaluation is the best so far.
    pub improved: bool,
    /// Whether training should stop (early stopping), and why.
    pub stop: Option<String>,
}

/// Tracks evaluations for overfitting and early stopping.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OverfitMonitor {
    /// Allowed gap.
    pub max_gap: f64,
    /// Allowed ratio.
    pub max_ratio: f64,
    /// Rising validation losses (with falling training loss) that flag overfitting.
    pub rising_evaluations: usize,
    /// Early-stopping patience (evaluations without improvement).
    pub patience: Option<usize>,
    /// Minimum improvement.
    pub min_delta: f64,
    /// History.
    pub history: Vec<EvalPoint>,
    /// Best validation loss and its step.
    pub best: Option<(f64, usize)>,
    /// Evaluations since the last improvement.
    pub since_best: usize,
    /// Whether overfitting was ever flagged.
    pub ever_overfit: bool,
}

impl OverfitMonitor {
    /// Records an evaluation and returns the verdict.
    pub fn observe(&mut self, p: EvalPoint) -> OverfitVerdict {
        let gap = p.val_loss - p.train_loss;
        let ratio = if p.train_loss > 0.0 {
            p.val_loss / p.train_loss
        } else {
            f64::INFINITY
        };
        let improved = match self.best {
            None => true,
            Some((b, _)) => p.val_loss < b - self.min_delta,
        };
        if improved {
            self.best = Some((p.val_loss, p.step));
            self.since_best = 0;
        } else {
            self.since_best += 1;
        }
        self.history.push(p);
        let n = self.history.len();
        let mut rising = 0;
        if self.rising_evaluations > 0 && n > self.rising_evaluations {
            let w = &self.history[n - 1 - self.rising_evaluations..];
            rising = w
                .windows(2)
                .filter(|x| x[1].val_loss > x[0].val_loss && x[1].train_loss < x[0].train_loss)
                .count();
        }
        let mut reason = None;
        if gap > self.max_gap {
            reason = Some(format!(
                "generalisation gap {gap:.3} exceeds {:.3}",
                self.max_gap
            ));
        } else if ratio > self.max_ratio {
            reason = Some(format!(
                "validation/training loss ratio {ratio:.2} exceeds {:.2}",
                self.max_ratio
            ));
        } else if self.rising_evaluations > 0 && rising >= self.rising_evaluations {
            reason = Some(format!(
                "validation loss rose for {rising} evaluations while training loss fell"
            ));
        }
        let overfitting = reason.is_some();
        self.ever_overfit |= overfitting;
        let stop = match self.patience {
            Some(pat) if self.since_best >= pat => Some(format!(
                "early stopping: no validation improvement for {} evaluations (best {:.4} at step {})",
                self.since_best,
                self.best.map_or(f64::NAN, |b| b.0),
                self.best.map_or(0, |b| b.1)
            )),
            _ => None,
        };
        OverfitVerdict {
            gap,
            ratio,
            overfitting,
            reason,
            improved,
            stop,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn pt(step: usize, train: f64, val: f64) -> EvalPoint {
        EvalPoint {
            step,
            epoch: 0.0,
            train_loss: train,
            val_loss: val,
            accuracy: None,
            retention_perplexity: None,
        }
    }

    #[test]
    fn flags_rising_validation_and_stops_with_patience() {
        let mut m = OverfitMonitor {
            max_gap: 10.0,
            max_ratio: 100.0,
            rising_evaluations: 2,
            patience: Some(2),
            ..Default::default()
        };
        assert!(m.observe(pt(1, 2.0, 2.1)).improved);
        assert!(!m.observe(pt(2, 1.5, 2.2)).overfitting);
        let v = m.observe(pt(3, 1.0, 2.3));
        assert!(v.overfitting, "{v:?}");
        assert!(v.stop.is_some());
        assert_eq!(m.best, Some((2.1, 1)));
        let mut g = OverfitMonitor {
            max_gap: 0.5,
            max_ratio: 100.0,
            ..Default::default()
        };
        assert!(g.observe(pt(1, 0.1, 0.9)).reason.unwrap().contains("gap"));
    }
}
