//! Classification metrics from comparing each label's log-likelihood (no sampling).

use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::{sequence_log_likelihoods, shared_prefix_log_likelihoods};
use crate::Result;
use crate::data::encode::{Encoded, Encoder};
use crate::data::example::Example;
use crate::model::Llama;

/// Precision, recall, F1 and support of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// Precision.
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// F1.
    pub f1: f64,
    /// True instances.
    pub support: usize,
}

/// Accuracy, per-class metrics and the confusion matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationReport {
    /// Fraction predicted correctly.
    pub accuracy: f64,
    /// Accuracy of always predicting the training set's majority class.
    pub majority_baseline: f64,
    /// The majority class of the training set.
    pub majority_class: String,
    /// Per-class metrics.
    pub per_class: BTreeMap<String, ClassMetrics>,
    /// `confusion[true][predicted]` counts.
    pub confusion: BTreeMap<String, BTreeMap<String, usize>>,
    /// Examples evaluated.
    pub n: usize,
}

impl ClassificationReport {
    /// The per-class precision, recall, F1 and support as a Markdown table.
    pub fn per_class_table(&self) -> String {
        let mut s =
            String::from("| class | precision | recall | F1 | support |\n|---|---|---|---|---|\n");
        for (label, m) in &self.per_class {
            s.push_str(&format!(
                "| {label} | {:.3} | {:.3} | {:.3} | {} |\n",
                m.precision, m.recall, m.f1, m.support
            ));
        }
        s
    }

    /// The confusion matrix as a Markdown table (rows: true class, columns: predicted).
    pub fn confusion_table(&self) -> String {
        let labels: Vec<&String> = self.confusion.keys().collect();
        let mut s = String::from("| true \\ predicted |");
        for l in &labels {
            s.push_str(&format!(" {l} |"));
        }
        s.push_str(&format!("\n|---|{}\n", "---|".repeat(labels.len())));
        for (truth, row) in &self.confusion {
            s.push_str(&format!("| {truth} |"));
            for l in &labels {
                s.push_str(&format!(" {} |", row.get(*l).copied().unwrap_or(0)));
            }
            s.push('\n');
        }
        s
    }
}

/// Computes metrics from (true, predicted) pairs.
pub fn metrics_from_pairs(
    labels: &[String],
    pairs: &[(String, String)],
    majority_class: &str,
) -> ClassificationReport {
    let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for t in labels {
        let row = confusion.entry(t.clone()).or_default();
        for p in labels {
            row.insert(p.clone(), 0);
        }
    }
    for (t, p) in pairs {
        *confusion
            .entry(t.clone())
            .or_default()
            .entry(p.clone())
            .or_default() += 1;
    }
    let n = pairs.len();
    let correct = pairs.iter().filter(|(t, p)| t == p).count();
    let mut per_class = BTreeMap::new();
    for l in labels {
        let tp = pairs.iter().filter(|(t, p)| t == l && p == l).count() as f64;
        let pred = pairs.iter().filter(|(_, p)| p == l).count() as f64;
        let support = pairs.iter().filter(|(t, _)| t == l).count();
        let precision = if pred > 0.0 { tp / pred } else { 0.0 };
        let recall = if support > 0 {
            tp / support as f64
        } else {
            0.0
        };
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        per_class.insert(
            l.clone(),
            ClassMetrics {
                precision,
                recall,
                f1,
                support,
            },
        );
    }
    let majority_hits = pairs.iter().filter(|(t, _)| t == majority_class).count();
    ClassificationReport {
        accuracy: if n > 0 {
            correct as f64 / n as f64
        } else {
            0.0
        },
        majority_baseline: if n > 0 {
            majority_hits as f64 / n as f64
        } else {
            0.0
        },
        majority_class: majority_class.to_string(),
        per_class,
        confusion,
        n,
    }
}

/// Pre-encoded candidates for classifying a validation set.
#[derive(Debug, Clone)]
pub struct ClassificationSet {
    /// Class labels.
    pub labels: Vec<String>,
    /// True label per example.
    pub truth: Vec<String>,
    /// For each example, one encoding per label (same order as `labels`).
    pub candidates: Vec<Vec<Encoded>>,
    /// Majority class of the training data.
    pub majority_class: String,
}

impl ClassificationSet {
    /// Encodes every labelled example with each label as the response.
    pub fn new(
        encoder: &Encoder,
        examples: &[Example],
        labels: &[String],
        majority_class: &str,
    ) -> Result<Self> {
        let mut truth = Vec::new();
        let mut candidates = Vec::new();
        for ex in examples {
            let Some(t) = &ex.label else { continue };
            truth.push(t.clone());
            candidates.push(encoder.encode_candidates(ex, labels)?);
        }
        Ok(Self {
            labels: labels.to_vec(),
            truth,
            candidates,
            majority_class: majority_class.to_string(),
        })
    }

    /// Predicts each example's label by the highest log-likelihood of `label + EOS` (the
    /// scores of [`Self::scores`]).
    pub fn evaluate(
        &self,
        model: &Llama,
        batch_size: usize,
        device: &Device,
    ) -> Result<ClassificationReport> {
        Ok(self.report(&self.scores(model, batch_size, device)?))
    }

    /// The classification metrics of per-candidate scores from [`Self::scores`].
    pub fn report(&self, scores: &[Vec<(f64, usize)>]) -> ClassificationReport {
        let pairs: Vec<(String, String)> = self
            .truth
            .iter()
            .zip(scores)
            .map(|(t, s)| (t.clone(), self.labels[best_candidate(s)].clone()))
            .collect();
        metrics_from_pairs(&self.labels, &pairs, &self.majority_class)
    }

    /// The index into `labels` of each example's predicted label (see [`Self::evaluate`]).
    pub fn predict(&self, model: &Llama, batch_size: usize, device: &Device) -> Result<Vec<usize>> {
        Ok(self
            .scores(model, batch_size, device)?
            .iter()
            .map(|s| best_candidate(s))
            .collect())
    }

    /// The mean negative log-likelihood per token of the true labels' candidates: the
    /// validation loss of `validation`, without a forward of its own, when `validation` is
    /// exactly the true candidates (the same ids and targets, row for row); `None` otherwise.
    pub fn true_label_loss(
        &self,
        scores: &[Vec<(f64, usize)>],
        validation: &[Encoded],
    ) -> Option<f64> {
        if validation.len() != self.truth.len() || scores.len() != self.truth.len() {
            return None;
        }
        let (mut sum, mut tokens) = (0f64, 0usize);
        for (i, row) in validation.iter().enumerate() {
            let label = self.labels.iter().position(|l| *l == self.truth[i])?;
            let candidate = &self.candidates[i][label];
            if candidate.ids != row.ids || candidate.target != row.target {
                return None;
            }
            sum += scores[i][label].0;
            tokens += scores[i][label].1;
        }
        Some(if tokens == 0 {
            f64::NAN
        } else {
            -sum / tokens as f64
        })
    }

    /// Every candidate's summed target log-likelihood and token count, one row per example in
    /// `labels` order. On a GPU the labels of one example continue its prompt, run once with a
    /// KV cache (k labels cost about one prompt forward instead of k); on the CPU, batches of
    /// `batch_size` full candidates are faster for small models (2× in the dev profile on the
    /// tiny model, 64 prompts of 60–120 tokens, 2 labels). Both give the same scores
    /// (`tests/kv_cache.rs`).
    pub fn scores(
        &self,
        model: &Llama,
        batch_size: usize,
        device: &Device,
    ) -> Result<Vec<Vec<(f64, usize)>>> {
        let k = self.labels.len().max(1);
        let mut bar = finetune_api::console::ProgressBar::new(
            "classify",
            "rows",
            self.candidates.len() as u64,
        );
        let mut out = Vec::with_capacity(self.candidates.len());
        if device.is_cuda() {
            for (i, candidates) in self.candidates.iter().enumerate() {
                let refs: Vec<&Encoded> = candidates.iter().collect();
                out.push(shared_prefix_log_likelihoods(model, &refs, device)?);
                bar.set(i as u64 + 1, "");
            }
        } else {
            // Whole batches per chunk, so the batches are the ones one call over every
            // candidate would make; the bar moves between chunks.
            let flat: Vec<&Encoded> = self.candidates.iter().flatten().collect();
            let mut scores = Vec::with_capacity(flat.len());
            for chunk in flat.chunks(batch_size.max(1) * 8) {
                scores.extend(sequence_log_likelihoods(model, chunk, batch_size, device)?);
                bar.set((scores.len() / k) as u64, "");
            }
            out.extend(scores.chunks(k).map(<[_]>::to_vec));
        }
        bar.finish();
        Ok(out)
    }
}

/// The index of the highest-scoring candidate (the first of equals).
fn best_candidate(scores: &[(f64, usize)]) -> usize {
    let mut best = 0;
    for (j, s) in scores.iter().enumerate() {
        if s.0 > scores[best].0 {
            best = j;
        }
    }
    best
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn precision_recall_f1_and_confusion() {
        let labels = vec!["Negative".to_string(), "Positive".to_string()];
        let p = |a: &str, b: &str| (a.to_string(), b.to_string());
        let pairs = vec![
            p("Positive", "Positive"),
            p("Positive", "Positive"),
            p("Positive", "Negative"),
            p("Negative", "Negative"),
            p("Negative", "Positive"),
        ];
        let r = metrics_from_pairs(&labels, &pairs, "Positive");
        assert!((r.accuracy - 0.6).abs() < 1e-12);
        assert!((r.majority_baseline - 0.6).abs() < 1e-12);
        let pos = &r.per_class["Positive"];
        assert!((pos.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((pos.recall - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(pos.support, 3);
        let neg = &r.per_class["Negative"];
        assert!((neg.f1 - 0.5).abs() < 1e-12);
        assert_eq!(r.confusion["Positive"]["Negative"], 1);
        assert_eq!(r.confusion["Negative"]["Negative"], 1);
    }
}
