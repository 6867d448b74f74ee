//! The end-of-run report: `report.json`, `report.md`, and a short termination-message summary.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

use crate::Result;
use crate::atomic_file::write_atomic;
use crate::data::clean::CleaningReport;
use crate::eval::classify::ClassificationReport;
use crate::eval::plot::{Series, line_chart};
use crate::train::export::Exported;
use crate::train::trainer::EvalRecord;

/// The loss curves' file, beside `report.md`.
pub const LOSS_CHART: &str = "loss.svg";
/// The accuracy curve's file, beside `report.md`.
pub const ACCURACY_CHART: &str = "accuracy.svg";

/// Base vs tuned output for one sample prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplePair {
    /// The prompt.
    pub prompt: String,
    /// The base model's greedy output.
    pub before: String,
    /// The tuned model's greedy output.
    pub after: String,
}

/// Retention perplexity before and after.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Forgetting {
    /// Perplexity of the base model.
    pub before: f64,
    /// Perplexity of the tuned model.
    pub after: f64,
    /// after / before (> 1 means the model got worse on general text).
    pub ratio: f64,
}

/// What the base model scored before training (kept across resumes in `before.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Before {
    /// Validation loss of the base model.
    pub validation_loss: Option<f64>,
    /// Classification metrics of the base model.
    pub classification: Option<ClassificationReport>,
    /// Retention perplexity of the base model.
    pub retention_perplexity: Option<f64>,
    /// Base model outputs for the sample prompts.
    pub samples: Vec<(String, String)>,
    /// Classification metrics of the base model on the held-out test set.
    #[serde(default)]
    pub test_set: Option<ClassificationReport>,
}

/// The held-out test set (`evaluation.testSet`), scored by the base and the tuned model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestSetScores {
    /// The file scored.
    pub file: String,
    /// The base model's metrics.
    pub before: ClassificationReport,
    /// The tuned model's metrics.
    pub after: ClassificationReport,
}

/// The full report of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Job name.
    pub job: String,
    /// `succeeded`, `early-stopped` or `interrupted`.
    pub status: String,
    /// Why it stopped.
    pub stop_reason: String,
    /// Training method.
    pub method: String,
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// Optimizer steps done and planned.
    pub steps: usize,
    /// Planned steps.
    pub total_steps: usize,
    /// Wall time of the training loop (this process).
    pub train_seconds: f64,
    /// Training throughput.
    pub tokens_per_second: f64,
    /// Data cleaning report.
    pub data: CleaningReport,
    /// Final validation loss.
    pub validation_loss: Option<f64>,
    /// Best validation loss and its step.
    pub best: Option<(f64, usize)>,
    /// Final classification metrics.
    pub classification: Option<ClassificationReport>,
    /// Before-training scores.
    pub before: Before,
    /// Whether overfitting was flagged at any evaluation, with the latest reason.
    pub overfitting: Option<String>,
    /// Retention perplexity before/after.
    pub forgetting: Option<Forgetting>,
    /// Before/after samples.
    pub samples: Vec<SamplePair>,
    /// All evaluations.
    pub evaluations: Vec<EvalRecord>,
    /// Outputs written.
    pub outputs: Exported,
    /// Checkpoint the run resumed from.
    pub resumed_from: Option<String>,
    /// The held-out test set before and after training, when one was given.
    #[serde(default)]
    pub test_set: Option<TestSetScores>,
}

impl Report {
    /// Markdown for people (its Curves section names the charts of [`Self::charts`]).
    pub fn markdown(&self) -> String {
        let charts: Vec<&str> = self.charts().iter().map(|(file, _)| *file).collect();
        self.markdown_with_charts(&charts)
    }

    /// The Markdown, referencing the chart files already rendered.
    fn markdown_with_charts(&self, charts: &[&str]) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Fine-tuning report: {}\n", self.job);
        let _ = writeln!(s, "- status: **{}** ({})", self.status, self.stop_reason);
        let _ = writeln!(
            s,
            "- method: {} ({} trainable parameters)",
            self.method, self.trainable_parameters
        );
        let _ = writeln!(
            s,
            "- steps: {}/{} in {:.0} s ({:.0} tokens/s)",
            self.steps, self.total_steps, self.train_seconds, self.tokens_per_second
        );
        if let Some(v) = self.validation_loss {
            let _ = writeln!(
                s,
                "- validation loss: {v:.4} (base model: {})",
                self.before
                    .validation_loss
                    .map_or("n/a".into(), |b| format!("{b:.4}"))
            );
        }
        if let Some((b, st)) = self.best {
            let _ = writeln!(s, "- best validation loss: {b:.4} at step {st}");
        }
        let _ = writeln!(
            s,
            "- overfitting: {}",
            self.overfitting
                .clone()
                .unwrap_or_else(|| "not flagged".into())
        );
        if !charts.is_empty() {
            let _ = writeln!(s, "\n## Curves\n");
            for file in charts {
                let _ = writeln!(s, "![{}]({file})", file.trim_end_matches(".svg"));
            }
        }
        let d = &self.data;
        let _ = writeln!(
            s,
            "\n## Data\n\n- rows read {}, kept {}, dropped {:?}, truncated {}",
            d.rows_read, d.rows_kept, d.dropped, d.truncated
        );
        let _ = writeln!(
            s,
            "- labels before cleaning {:?}, after {:?}",
            d.labels_before, d.labels_after
        );
        if let Some(sp) = &d.split {
            let _ = writeln!(
                s,
                "- split: {} train / {} validation {:?}",
                sp.train, sp.validation, sp.validation_labels
            );
        }
        for w in &d.warnings {
            let _ = writeln!(s, "- warning: {w}");
        }
        if let Some(c) = &self.classification {
            let _ = writeln!(
                s,
                "\n## Classification (validation, by label log-likelihood)\n"
            );
            let _ = writeln!(
                s,
                "accuracy **{:.1} %** (base model {}; majority class {:?} {:.1} %)\n",
                100.0 * c.accuracy,
                self.before
                    .classification
                    .as_ref()
                    .map_or("n/a".into(), |b| format!("{:.1} %", 100.0 * b.accuracy)),
                c.majority_class,
                100.0 * c.majority_baseline
            );
            let _ = writeln!(s, "{}", c.per_class_table());
            let _ = write!(s, "{}", c.confusion_table());
        }
        if let Some(t) = &self.test_set {
            let _ = writeln!(
                s,
                "\n## Held-out test set\n\n`{}`, {} rows: accuracy **{:.1} %** after training \
                 (base model {:.1} %; majority class {:?} {:.1} %)\n",
                t.file,
                t.after.n,
                100.0 * t.after.accuracy,
                100.0 * t.before.accuracy,
                t.after.majority_class,
                100.0 * t.after.majority_baseline
            );
            let _ = writeln!(s, "{}", t.after.per_class_table());
            let _ = write!(s, "{}", t.after.confusion_table());
        }
        if let Some(f) = &self.forgetting {
            let _ = writeln!(
                s,
                "\n## Forgetting\n\nretention perplexity {:.2} → {:.2} (ratio {:.3})",
                f.before, f.after, f.ratio
            );
        }
        if !self.samples.is_empty() {
            let _ = writeln!(
                s,
                "\n## Before / after samples\n\n| prompt | base model | tuned model |\n|---|---|---|"
            );
            let esc = |x: &str| x.replace('|', "\\|").replace('\n', " ");
            for p in &self.samples {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} |",
                    esc(&p.prompt),
                    esc(&p.before),
                    esc(&p.after)
                );
            }
        }
        let _ = writeln!(
            s,
            "\n## Evaluations\n\n| step | train loss | val loss | gap | accuracy | overfitting |\n|---|---|---|---|---|---|"
        );
        for e in &self.evaluations {
            let _ = writeln!(
                s,
                "| {} | {:.4} | {:.4} | {:.4} | {} | {} |",
                e.point.step,
                e.point.train_loss,
                e.point.val_loss,
                e.verdict.gap,
                e.point
                    .accuracy
                    .map_or("".into(), |a| format!("{:.1} %", 100.0 * a)),
                e.verdict.reason.clone().unwrap_or_default()
            );
        }
        s
    }

    /// A summary under 4 KiB for the termination message.
    pub fn summary(&self) -> String {
        let v = serde_json::json!({
            "status": self.status,
            "stopReason": self.stop_reason,
            "steps": self.steps,
            "totalSteps": self.total_steps,
            "validationLoss": self.validation_loss,
            "bestValidationLoss": self.best.map(|b| b.0),
            "bestStep": self.best.map(|b| b.1),
            "accuracy": self.classification.as_ref().map(|c| c.accuracy),
            "majorityBaseline": self.classification.as_ref().map(|c| c.majority_baseline),
            "overfitting": self.overfitting,
            "retentionPerplexityRatio": self.forgetting.map(|f| f.ratio),
            "adapter": self.outputs.adapter,
            "model": self.outputs.model,
        });
        let mut s = v.to_string();
        if s.len() > 4000 {
            s.truncate(4000);
        }
        s
    }

    /// The curves of the run's evaluations as SVG files: `loss.svg` (training and validation
    /// loss by step) and, for classification, `accuracy.svg` (validation accuracy by step, with
    /// the majority baseline). Empty without evaluations.
    pub fn charts(&self) -> Vec<(&'static str, String)> {
        let points = |f: &dyn Fn(&EvalRecord) -> Option<f64>| -> Vec<(f64, f64)> {
            self.evaluations
                .iter()
                .filter_map(|e| f(e).map(|v| (e.point.step as f64, v)))
                .collect()
        };
        let mut charts = Vec::new();
        let loss = [
            Series {
                name: "training loss".into(),
                colour: "#1f77b4",
                dashed: false,
                points: points(&|e| Some(e.point.train_loss)),
            },
            Series {
                name: "validation loss".into(),
                colour: "#d62728",
                dashed: false,
                points: points(&|e| Some(e.point.val_loss)),
            },
        ];
        if let Some(svg) = line_chart("Loss", "optimizer step", "loss", &loss) {
            charts.push((LOSS_CHART, svg));
        }
        let accuracy = points(&|e| e.point.accuracy.map(|a| 100.0 * a));
        if !accuracy.is_empty() {
            let mut series = vec![Series {
                name: "validation accuracy".into(),
                colour: "#2ca02c",
                dashed: false,
                points: accuracy.clone(),
            }];
            if let Some(c) = &self.classification {
                let (first, last) = (accuracy[0].0, accuracy[accuracy.len() - 1].0);
                let base = 100.0 * c.majority_baseline;
                series.push(Series {
                    name: format!("majority class ({})", c.majority_class),
                    colour: "#7f7f7f",
                    dashed: true,
                    points: vec![(first, base), (last, base)],
                });
            }
            if let Some(svg) = line_chart("Validation accuracy", "optimizer step", "%", &series) {
                charts.push((ACCURACY_CHART, svg));
            }
        }
        charts
    }

    /// Writes `report.json`, `report.md` and its charts into `dir`, and the summary into
    /// `termination`.
    pub fn write(&self, dir: &Path, termination: Option<&Path>) -> Result<()> {
        write_atomic(
            &dir.join("report.json"),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )?;
        let charts = self.charts();
        for (file, svg) in &charts {
            write_atomic(&dir.join(file), svg.as_bytes())?;
        }
        let files: Vec<&str> = charts.iter().map(|(file, _)| *file).collect();
        write_atomic(
            &dir.join("report.md"),
            self.markdown_with_charts(&files).as_bytes(),
        )?;
        if let Some(t) = termination {
            if let Some(p) = t.parent() {
                let _ = std::fs::create_dir_all(p);
            }
            std::fs::write(t, self.summary()).map_err(|e| crate::TrainerError::io(t, e))?;
        }
        Ok(())
    }
}
