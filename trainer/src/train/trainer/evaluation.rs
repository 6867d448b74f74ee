//! The trainer's periodic evaluation: validation loss and accuracy, the overfitting verdict,
//! the metrics and the progress document.

use super::{EvalRecord, Trainer};
use crate::Result;
use crate::eval::EvalPoint;
use crate::metrics::Phase;

impl Trainer {
    /// Evaluates on the validation split (forward only) and updates the monitor.
    pub fn evaluate(&mut self) -> Result<EvalRecord> {
        self.progress(|p| p.phase = Phase::Evaluating);
        let scored = &self.data.val[..self.data.val.len().min(self.params.eval.max_rows)];
        let (val_loss, classification) = crate::eval::validation_scores(
            &self.model,
            scored,
            self.classification.as_ref(),
            &self.device,
        )?;
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
}
