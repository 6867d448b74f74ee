//! One complete job: before-training measurements, training (with SIGTERM checkpointing),
//! after-training measurements, export, and the report.

pub mod report;

use std::path::Path;
use std::sync::Arc;

use crate::distributed::{Collective, SingleProcess};
use crate::eval::classify::ClassificationReport;
use crate::eval::heldout::{HeldOutSet, evaluate};
use crate::eval::{encode_lm_lines, perplexity, sample};
use crate::metrics::{Metrics, Phase};
use crate::model::TrainableSpec;
use crate::train::TrainParams;
use crate::train::export::{Exported, export};
use crate::train::trainer::{StopReason, Trainer};
use crate::{Result, TrainerError};
use report::{Before, Forgetting, Report, SamplePair, TestSetScores};

fn retention_set(t: &Trainer) -> Result<Option<Vec<crate::data::Encoded>>> {
    let Some(path) = &t.params.eval.retention_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(t.params.eval.retention_max_rows)
        .map(str::to_string)
        .collect();
    Ok(Some(encode_lm_lines(
        &t.encoder,
        &lines,
        t.params.max_seq_len,
        false,
    )?))
}

/// The held-out test file, read and cleaned as the dataset is.
fn test_set(t: &Trainer) -> Result<Option<HeldOutSet>> {
    let Some(path) = &t.params.eval.test_set_file else {
        return Ok(None);
    };
    let set = HeldOutSet::read(
        path,
        t.params.format,
        &t.params.cleaning,
        Some(t.params.eval.test_set_max_rows),
    )?;
    Ok(Some(set))
}

/// The current model's classification metrics on the test set.
fn score(t: &Trainer, set: &HeldOutSet) -> Result<ClassificationReport> {
    let name = t.params.model_dir.display().to_string();
    Ok(evaluate(&t.model, &name, &t.encoder, set, 32, &t.device)?.metrics)
}

fn measure_before(
    t: &mut Trainer,
    retention: Option<&[crate::data::Encoded]>,
    test: Option<&HeldOutSet>,
) -> Result<Before> {
    let path = t.params.output_dir.join("before.json");
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(b) = serde_json::from_str::<Before>(&text)
    {
        return Ok(b);
    }
    let set = match (&t.data.majority_class, t.data.labels.is_empty()) {
        (Some(maj), false) => Some(crate::eval::classify::ClassificationSet::new(
            &t.encoder,
            &t.data.val_examples,
            &t.data.labels,
            maj,
        )?),
        _ => None,
    };
    let (loss, classification) =
        crate::eval::validation_scores(&t.model, &t.data.val, set.as_ref(), &t.device)?;
    let validation_loss = Some(loss);
    let retention_perplexity = match retention {
        Some(r) => Some(perplexity(&t.model, r, &t.device)?),
        None => None,
    };
    let mut samples = Vec::new();
    for p in &t.params.eval.sample_prompts {
        samples.push((
            p.clone(),
            sample(&t.model, &t.encoder, p, t.params.eval.sample_max_new_tokens)?,
        ));
    }
    let test_set = match test {
        Some(set) => Some(score(t, set)?),
        None => None,
    };
    let b = Before {
        validation_loss,
        classification,
        retention_perplexity,
        samples,
        test_set,
    };
    if t.is_primary() {
        std::fs::create_dir_all(&t.params.output_dir)
            .map_err(|e| TrainerError::io(&t.params.output_dir, e))?;
        crate::atomic_file::write_atomic(&path, serde_json::to_string_pretty(&b)?.as_bytes())?;
    }
    Ok(b)
}

/// Runs a job end to end. Returns the report (status `interrupted` after SIGTERM).
pub fn run_job(params: TrainParams, resume: bool, metrics: Option<Arc<Metrics>>) -> Result<Report> {
    run_job_in(params, resume, metrics, Box::new(SingleProcess))
}

/// [`run_job`] as one rank of the data-parallel gang `collective` connects. Every rank measures
/// and trains alike (so none waits long in a collective); only rank 0 writes `before.json`,
/// checkpoints, the exported model and the report, and the other ranks return after training
/// with a report that names no outputs.
pub fn run_job_in(
    params: TrainParams,
    resume: bool,
    metrics: Option<Arc<Metrics>>,
    collective: Box<dyn Collective>,
) -> Result<Report> {
    if let Some(m) = &metrics {
        let commit = Some(params.run.model_commit.clone()).filter(|c| !c.is_empty());
        m.update_progress(|p| p.model_commit = commit);
    }
    let mut t = Trainer::new(params, resume, metrics.clone())?;
    t.join(collective)?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, t.stop_flag())
        .map_err(|e| TrainerError::io("SIGTERM handler", e))?;
    let retention = retention_set(&t)?;
    let test = test_set(&t)?;
    let before = measure_before(&mut t, retention.as_deref(), test.as_ref())?;
    if let (Some(m), Some(c)) = (&metrics, &before.test_set) {
        let accuracy = c.accuracy;
        m.update_progress(|p| p.base_test_accuracy = Some(accuracy));
    }
    if let (Some(m), Some(r)) = (&metrics, before.retention_perplexity) {
        m.retention_perplexity.with_label_values(&["before"]).set(r);
    }
    let outcome = t.run(None)?;
    let (status, reason) = match &outcome.reason {
        StopReason::Completed => ("succeeded", "all epochs / max steps done".to_string()),
        StopReason::EarlyStopped(why) => ("early-stopped", why.clone()),
        StopReason::Interrupted => (
            "interrupted",
            "SIGTERM: checkpointed for resume".to_string(),
        ),
    };
    let mut outputs = Exported::default();
    let mut test_scores = None;
    let mut forgetting = None;
    let mut samples = Vec::new();
    if outcome.reason != StopReason::Interrupted && t.is_primary() {
        if let StopReason::EarlyStopped(_) = outcome.reason
            && let Some(step) = t.restore_best()?
        {
            tracing::info!(step, "restored the best checkpoint");
        }
        if let Some(r) = &retention {
            let after = perplexity(&t.model, r, &t.device)?;
            if let Some(m) = &metrics {
                m.retention_perplexity
                    .with_label_values(&["after"])
                    .set(after);
            }
            if let Some(b) = before.retention_perplexity {
                forgetting = Some(Forgetting {
                    before: b,
                    after,
                    ratio: after / b,
                });
            }
        }
        for (p, b) in &before.samples {
            let after = sample(&t.model, &t.encoder, p, t.params.eval.sample_max_new_tokens)?;
            samples.push(SamplePair {
                prompt: p.clone(),
                before: b.clone(),
                after,
            });
        }
        if let (Some(set), Some(before)) = (&test, &before.test_set) {
            test_scores = Some(TestSetScores {
                file: set.file.display().to_string(),
                before: before.clone(),
                after: score(&t, set)?,
            });
        }
        if let Some(m) = &metrics {
            m.update_progress(|p| p.phase = Phase::Exporting);
        }
        let base = t.params.model_dir.display().to_string();
        outputs = export(
            &t.model,
            &t.params.method,
            &t.params.output_dir,
            &t.params.tokenizer,
            &base,
            t.params.merge_weights,
        )?;
    }
    let last_eval = t.evals.last().cloned();
    let overfitting = t.evals.iter().rev().find_map(|e| e.verdict.reason.clone());
    let method = match &t.params.method {
        TrainableSpec::Lora(l) => {
            let mut m = format!(
                "lora r={} alpha={} on {:?}",
                l.rank, l.alpha, l.target_modules
            );
            if !l.base_quantization.is_none() {
                m.push_str(&format!(
                    ", base quantized to {} (merged weights from the unquantized base)",
                    l.base_quantization.name()
                ));
            }
            if !l.head_token_ids.is_empty() {
                m.push_str(&format!(", lm_head rows of tokens {:?}", l.head_token_ids));
            }
            if let Some(kl) = t.params.base_kl {
                let last = t.history.iter().rev().find_map(|r| r.base_kl);
                m.push_str(&format!(
                    ", KL to the base weighted {} at one prompt position in {}{}",
                    kl.weight,
                    kl.stride,
                    last.map_or(String::new(), |v| format!(" (last step: {v:.4} nats)"))
                ));
            }
            m
        }
        TrainableSpec::Full {
            layers,
            embeddings_and_head,
        } => match layers {
            None => format!("full (all layers, embeddings and head: {embeddings_and_head})"),
            Some(l) => format!("full (layers {l:?}, embeddings and head: {embeddings_and_head})"),
        },
        TrainableSpec::Frozen => "none".into(),
    };
    let method = match t.model.placement().describe() {
        Some(split) => format!("{method}; {split}"),
        None => method,
    };
    let report = Report {
        job: t.params.job.clone(),
        status: status.into(),
        stop_reason: reason.clone(),
        method,
        trainable_parameters: t.model.trainable_count(),
        steps: t.step(),
        total_steps: t.total_steps,
        train_seconds: outcome.seconds,
        tokens_per_second: outcome.tokens as f64 / outcome.seconds.max(1e-9),
        data: t.data.report.clone(),
        validation_loss: last_eval.as_ref().map(|e| e.point.val_loss),
        best: t.monitor.best,
        classification: last_eval.and_then(|e| e.classification),
        before,
        overfitting,
        forgetting,
        samples,
        evaluations: t.evals.clone(),
        outputs,
        resumed_from: t.resumed_from.as_ref().map(|r| r.0.clone()),
        test_set: test_scores,
    };
    if !t.is_primary() {
        return Ok(report);
    }
    std::fs::create_dir_all(&t.params.output_dir)
        .map_err(|e| TrainerError::io(&t.params.output_dir, e))?;
    // The termination message is the final progress document (written by the binary), or this
    // report's summary when running without a progress document.
    let termination = if metrics.is_none() {
        t.params.termination_message_file.as_deref()
    } else {
        None
    };
    report.write(&t.params.output_dir, termination)?;
    if let Some(m) = &metrics {
        let st = if report.status == "interrupted" {
            Phase::Training
        } else {
            Phase::Done
        };
        let early = report.status == "early-stopped";
        let ratio = report.forgetting.map(|f| f.ratio);
        let base_test = report.before.test_set.as_ref().map(|c| c.accuracy);
        let tuned_test = report.test_set.as_ref().map(|s| s.after.accuracy);
        let out = t.params.output_dir.display().to_string();
        m.update_progress(|p| {
            p.phase = st;
            p.stop_reason = Some(reason);
            p.early_stopped = early;
            p.retention_perplexity_ratio = ratio;
            p.base_test_accuracy = base_test;
            p.test_accuracy = tuned_test;
            if st == Phase::Done && p.output_dir.is_none() {
                p.output_dir = Some(out);
            }
        });
    }
    Ok(report)
}

/// Reads a report from an output directory and renders it as Markdown.
pub fn print_report(dir: &Path) -> Result<String> {
    let p = dir.join("report.json");
    let text = std::fs::read_to_string(&p).map_err(|e| TrainerError::io(&p, e))?;
    let r: Report = serde_json::from_str(&text)?;
    Ok(r.markdown())
}
