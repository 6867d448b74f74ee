//! Scoring models on a labelled file outside training: `finetune-trainer evaluate` (one model) and
//! `finetune-trainer compare` (two models on the same rows, side by side).
//!
//! The file is read and cleaned exactly as a training set is (same readers, cleaning options and
//! prompt template), each row is classified by the label with the highest log-likelihood (as the
//! validation set is during training), and the results are written as JSON and Markdown. The
//! majority baseline is the evaluated file's own majority class: there is no training split here.

use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::classify::{ClassificationReport, ClassificationSet, metrics_from_pairs};
use crate::data::clean::{CleaningOptions, CleaningReport, Format, read_dataset_file};
use crate::data::encode::Encoder;
use crate::data::example::Example;
use crate::model::Llama;
use crate::{Result, TrainerError};

/// A labelled file, cleaned, with its classes.
#[derive(Debug, Clone)]
pub struct HeldOutSet {
    /// The file read.
    pub file: PathBuf,
    /// The rows kept by the cleaning (at most `max_rows`, in file order).
    pub examples: Vec<Example>,
    /// The classes: the cleaning's allowed labels when given, else the labels found (sorted).
    pub labels: Vec<String>,
    /// The most frequent true label of the rows kept.
    pub majority_class: String,
    /// What the cleaning did.
    pub cleaning: CleaningReport,
}

impl HeldOutSet {
    /// Reads and cleans `file`; keeps the first `max_rows` rows when given. Fails, naming the
    /// file, when a kept row has no label or fewer than two classes remain.
    pub fn read(
        file: &Path,
        format: Option<Format>,
        cleaning: &CleaningOptions,
        max_rows: Option<usize>,
    ) -> Result<Self> {
        let (mut examples, report) = read_dataset_file(file, format, cleaning)?;
        if let Some(n) = max_rows {
            examples.truncate(n);
        }
        let bad = |reason: String| TrainerError::Data(format!("{}: {reason}", file.display()));
        if let Some(row) = examples.iter().find(|e| e.label.is_none()) {
            return Err(bad(format!(
                "line {}: no label in column {:?}; evaluation needs labelled rows",
                row.line, cleaning.columns.label
            )));
        }
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for l in examples.iter().filter_map(|e| e.label.clone()) {
            *counts.entry(l).or_default() += 1;
        }
        let labels: Vec<String> = if cleaning.allowed_labels.is_empty() {
            counts.keys().cloned().collect()
        } else {
            cleaning.allowed_labels.clone()
        };
        if labels.len() < 2 {
            return Err(bad(format!(
                "{} class(es) after cleaning ({labels:?}); classification needs at least two",
                labels.len()
            )));
        }
        let majority_class = counts
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(l, _)| l.clone())
            .unwrap_or_default();
        Ok(Self {
            file: file.to_path_buf(),
            examples,
            labels,
            majority_class,
            cleaning: report,
        })
    }
}

/// One row's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Prediction {
    /// 1-based line of the row in the file.
    pub line: usize,
    /// The row's text (the user turn of the prompt).
    pub text: String,
    /// The true label.
    pub truth: String,
    /// The model's label.
    pub predicted: String,
}

/// One model's results on a held-out set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Evaluation {
    /// The model, as given (directory, `+ adapter`).
    pub model: String,
    /// The file evaluated.
    pub file: String,
    /// Accuracy, per-class metrics, confusion matrix, majority baseline.
    pub metrics: ClassificationReport,
    /// Every row's prediction, in file order.
    pub predictions: Vec<Prediction>,
    /// What the cleaning read, kept and dropped (and why) before scoring.
    pub cleaning: CleaningReport,
}

/// Classifies every row of `set` with `model`.
pub fn evaluate(
    model: &Llama,
    model_name: &str,
    encoder: &Encoder,
    set: &HeldOutSet,
    batch_size: usize,
    device: &Device,
) -> Result<Evaluation> {
    let classes = ClassificationSet::new(encoder, &set.examples, &set.labels, &set.majority_class)?;
    let predicted = classes.predict(model, batch_size, device)?;
    let predictions: Vec<Prediction> = set
        .examples
        .iter()
        .zip(predicted)
        .map(|(e, p)| Prediction {
            line: e.line,
            text: e.user.clone(),
            truth: e.label.clone().unwrap_or_default(),
            predicted: set.labels[p].clone(),
        })
        .collect();
    let pairs: Vec<(String, String)> = predictions
        .iter()
        .map(|p| (p.truth.clone(), p.predicted.clone()))
        .collect();
    let metrics = metrics_from_pairs(&set.labels, &pairs, &set.majority_class);
    Ok(Evaluation {
        model: model_name.to_string(),
        file: set.file.display().to_string(),
        metrics,
        predictions,
        cleaning: set.cleaning.clone(),
    })
}

/// Markdown table cell text.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// A headline line of one model's metrics.
fn headline(m: &ClassificationReport) -> String {
    format!(
        "accuracy **{:.1} %** on {} rows (majority class {:?}: {:.1} %)",
        100.0 * m.accuracy,
        m.n,
        m.majority_class,
        100.0 * m.majority_baseline
    )
}

impl Evaluation {
    /// Markdown for people: metrics, per-class table, confusion matrix, the misclassified rows.
    pub fn markdown(&self) -> String {
        let m = &self.metrics;
        let mut s = format!(
            "# Evaluation of {}\n\non `{}`: {}\n\n",
            self.model,
            self.file,
            headline(m)
        );
        let c = &self.cleaning;
        let _ = writeln!(
            s,
            "rows read {}, kept {}, dropped {:?}{}\n",
            c.rows_read,
            c.rows_kept,
            c.dropped,
            if c.invalid_examples.is_empty() {
                String::new()
            } else {
                format!(" (invalid: {})", c.invalid_examples.join("; "))
            }
        );
        let _ = writeln!(s, "{}", m.per_class_table());
        let _ = writeln!(s, "{}", m.confusion_table());
        let wrong: Vec<&Prediction> = self
            .predictions
            .iter()
            .filter(|p| p.truth != p.predicted)
            .collect();
        let _ = writeln!(s, "## Misclassified rows ({})\n", wrong.len());
        if !wrong.is_empty() {
            let _ = writeln!(s, "| line | text | true | predicted |\n|---|---|---|---|");
            for p in wrong {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    p.line,
                    cell(&p.text),
                    p.truth,
                    p.predicted
                );
            }
        }
        s
    }

    /// Writes `evaluation.json` and `evaluation.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_pair(
            dir,
            "evaluation",
            &serde_json::to_string_pretty(self)?,
            &self.markdown(),
        )
    }
}

/// A row where two models answer differently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disagreement {
    /// 1-based line of the row in the file.
    pub line: usize,
    /// The row's text.
    pub text: String,
    /// The true label.
    pub truth: String,
    /// Model A's answer.
    pub a: String,
    /// Model B's answer.
    pub b: String,
}

/// Two models on the same rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Comparison {
    /// The file both were evaluated on.
    pub file: String,
    /// Model A (usually the base).
    pub a: Evaluation,
    /// Model B (usually the tuned model).
    pub b: Evaluation,
    /// Fraction of rows where both give the same answer.
    pub agreement: f64,
    /// Rows only B gets right.
    pub fixed_by_b: usize,
    /// Rows only A gets right.
    pub broken_by_b: usize,
    /// Every row where the answers differ, in file order.
    pub disagreements: Vec<Disagreement>,
}

/// Puts two evaluations of the same rows side by side. Fails when they are not of the same rows.
pub fn compare(a: Evaluation, b: Evaluation) -> Result<Comparison> {
    let same_rows = a.predictions.len() == b.predictions.len()
        && a.predictions
            .iter()
            .zip(&b.predictions)
            .all(|(x, y)| x.line == y.line);
    if a.file != b.file || !same_rows {
        return Err(TrainerError::Data(format!(
            "compare: {} and {} were not evaluated on the same rows",
            a.model, b.model
        )));
    }
    let mut disagreements = Vec::new();
    let (mut fixed, mut broken) = (0, 0);
    for (x, y) in a.predictions.iter().zip(&b.predictions) {
        if x.predicted == y.predicted {
            continue;
        }
        fixed += usize::from(y.predicted == y.truth);
        broken += usize::from(x.predicted == x.truth);
        disagreements.push(Disagreement {
            line: x.line,
            text: x.text.clone(),
            truth: x.truth.clone(),
            a: x.predicted.clone(),
            b: y.predicted.clone(),
        });
    }
    let n = a.predictions.len();
    Ok(Comparison {
        file: a.file.clone(),
        agreement: if n == 0 {
            1.0
        } else {
            (n - disagreements.len()) as f64 / n as f64
        },
        fixed_by_b: fixed,
        broken_by_b: broken,
        disagreements,
        a,
        b,
    })
}

impl Comparison {
    /// Markdown for people: both models' metrics, then every row where they differ.
    pub fn markdown(&self) -> String {
        let mut s = format!("# Comparison on `{}`\n\n", self.file);
        for (name, e) in [("A", &self.a), ("B", &self.b)] {
            let _ = writeln!(s, "## {name}: {}\n\n{}\n", e.model, headline(&e.metrics));
            let _ = writeln!(s, "{}", e.metrics.per_class_table());
        }
        let _ = writeln!(
            s,
            "## Where they differ\n\nthe same answer on {:.1} % of rows; {} differ: B fixes {}, \
             breaks {}\n",
            100.0 * self.agreement,
            self.disagreements.len(),
            self.fixed_by_b,
            self.broken_by_b
        );
        if !self.disagreements.is_empty() {
            let _ = writeln!(s, "| line | text | true | A | B |\n|---|---|---|---|---|");
            for d in &self.disagreements {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} |",
                    d.line,
                    cell(&d.text),
                    d.truth,
                    d.a,
                    d.b
                );
            }
        }
        s
    }

    /// Writes `comparison.json` and `comparison.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_pair(
            dir,
            "comparison",
            &serde_json::to_string_pretty(self)?,
            &self.markdown(),
        )
    }
}

fn write_pair(dir: &Path, stem: &str, json: &str, markdown: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
    for (ext, body) in [("json", json), ("md", markdown)] {
        let path = dir.join(format!("{stem}.{ext}"));
        std::fs::write(&path, body).map_err(|e| TrainerError::io(&path, e))?;
    }
    Ok(())
}

/// How a held-out file is read and encoded: as in training (a trainer configuration gives these)
/// or from command-line flags.
#[derive(Debug, Clone)]
pub struct HeldOutOptions {
    /// File format (`None`: from the extension).
    pub format: Option<Format>,
    /// Columns and cleaning.
    pub cleaning: CleaningOptions,
    /// Prompt template.
    pub template: crate::data::PromptTemplate,
    /// Longest encoded example, in tokens.
    pub max_seq_len: usize,
    /// Rows evaluated at most (the first ones kept by the cleaning); `None`: all.
    pub max_rows: Option<usize>,
    /// Candidates per forward on the CPU.
    pub batch_size: usize,
}

/// Loads `model` and classifies every row of `set` with it, encoding with `tokenizer`.
pub fn evaluate_model(
    model: &crate::model::load::ModelRef,
    tokenizer: &Path,
    set: &HeldOutSet,
    opts: &HeldOutOptions,
    device: &Device,
) -> Result<Evaluation> {
    let (llama, _) = crate::model::load::load_for_inference(model, device)?;
    let encoder = Encoder::from_file(tokenizer, opts.template.clone(), opts.max_seq_len)?;
    evaluate(
        &llama,
        &model.describe(),
        &encoder,
        set,
        opts.batch_size,
        device,
    )
}
