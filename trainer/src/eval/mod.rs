//! Evaluation: validation loss without a backward graph, classification by label
//! log-likelihood with per-class metrics, retention perplexity, overfitting detection, samples.

pub mod classify;
pub mod heldout;
pub mod overfit;
pub mod plot;

pub use classify::{ClassMetrics, ClassificationReport};
pub use overfit::{EvalPoint, OverfitMonitor, OverfitVerdict};

use candle_core::{Device, Tensor};

use crate::Result;
use crate::data::batch::Batch;
use crate::data::encode::{Encoded, Encoder};
use crate::loss::token_log_probs;
use crate::model::linear::FwdCtx;
use crate::model::llama::select_rows;
use crate::model::{KvCache, Llama};
use crate::workers::{cpu_workers, row_ranges, run_single_threaded};

/// Sum of target log-probabilities per example, and their token counts, for encoded examples,
/// in batches of `batch_size`; on the CPU the batches are split between the workers
/// ([`crate::workers`]), each batch computed as it would be alone.
pub fn sequence_log_likelihoods(
    model: &Llama,
    items: &[&Encoded],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<(f64, usize)>> {
    let batches: Vec<&[&Encoded]> = items.chunks(batch_size.max(1)).collect();
    let groups = row_ranges(batches.len(), cpu_workers(device));
    if groups.len() <= 1 {
        return batches_log_likelihoods(model, &batches, device);
    }
    let jobs: Vec<_> = groups
        .into_iter()
        .map(|group| {
            let batches = &batches[group];
            move || batches_log_likelihoods(model, batches, device)
        })
        .collect();
    Ok(run_single_threaded(jobs)?.into_iter().flatten().collect())
}

/// [`sequence_log_likelihoods`] of `batches`, one after the other.
fn batches_log_likelihoods(
    model: &Llama,
    batches: &[&[&Encoded]],
    device: &Device,
) -> Result<Vec<(f64, usize)>> {
    let mut out = Vec::new();
    for chunk in batches {
        let batch = Batch::new(chunk, 0, device)?;
        let mut sums = vec![(0f64, 0usize); chunk.len()];
        if batch.n_targets > 0 {
            let mut ctx = FwdCtx::eval();
            let logits =
                model.logits_at(&batch.ids, Some(&batch.attention), &batch.rows, &mut ctx)?;
            let lp = token_log_probs(&logits, &batch.targets)?.to_vec1::<f32>()?;
            for (i, v) in lp.iter().enumerate() {
                let r = batch.row_of_target[i];
                sums[r].0 += *v as f64;
                sums[r].1 += 1;
            }
        }
        out.extend(sums);
    }
    Ok(out)
}

/// [`sequence_log_likelihoods`] for candidates that continue one prompt (each label of a
/// classification): their longest common prefix is run once, with a KV cache, and each
/// candidate's own tokens continue from a copy of that cache, so k labels cost about one
/// forward of the prompt instead of k.
pub fn shared_prefix_log_likelihoods(
    model: &Llama,
    items: &[&Encoded],
    device: &Device,
) -> Result<Vec<(f64, usize)>> {
    let Some(first) = items.first() else {
        return Ok(Vec::new());
    };
    let common = items.iter().fold(first.ids.len(), |c, e| {
        c.min(
            e.ids
                .iter()
                .zip(&first.ids)
                .take_while(|(a, b)| a == b)
                .count(),
        )
    });
    if common == 0 {
        return sequence_log_likelihoods(model, items, 1, device);
    }
    let mut prefix_cache = KvCache::new();
    let prefix = model.hidden_cached(&first.ids[..common], &mut prefix_cache)?;
    let mut out = Vec::with_capacity(items.len());
    for e in items {
        // A batch of one: its rows are the positions whose logits predict the targets.
        let batch = Batch::new(&[e], 0, device)?;
        if batch.n_targets == 0 {
            out.push((0.0, 0));
            continue;
        }
        let hidden = if e.ids.len() > common {
            let mut cache = prefix_cache.clone();
            let rest = model.hidden_cached(&e.ids[common..], &mut cache)?;
            Tensor::cat(&[&prefix, &rest], 0)?
        } else {
            prefix.clone()
        };
        let logits = model.project(&select_rows(&hidden, &batch.rows)?, &FwdCtx::eval())?;
        let lp = token_log_probs(&logits, &batch.targets)?.to_vec1::<f32>()?;
        out.push((lp.iter().map(|v| *v as f64).sum(), lp.len()));
    }
    Ok(out)
}

/// Mean token negative log-likelihood over encoded examples (forward only, no graph).
pub fn mean_nll(
    model: &Llama,
    items: &[Encoded],
    batch_size: usize,
    device: &Device,
) -> Result<f64> {
    let refs: Vec<&Encoded> = items.iter().collect();
    let ll = sequence_log_likelihoods(model, &refs, batch_size, device)?;
    let (s, n) = ll
        .iter()
        .fold((0f64, 0usize), |a, x| (a.0 + x.0, a.1 + x.1));
    Ok(if n == 0 { f64::NAN } else { -s / n as f64 })
}

/// The validation loss of `scored` and, for a classification dataset, the classification
/// metrics of `classification`. When the true labels' candidates are exactly the scored rows
/// (the usual case), their scores give the loss too, and the rows are not run a second time.
pub fn validation_scores(
    model: &Llama,
    scored: &[Encoded],
    classification: Option<&classify::ClassificationSet>,
    device: &Device,
) -> Result<(f64, Option<ClassificationReport>)> {
    let Some(set) = classification else {
        return Ok((mean_nll(model, scored, 32, device)?, None));
    };
    let scores = set.scores(model, 32, device)?;
    let loss = match set.true_label_loss(&scores, scored) {
        Some(loss) => loss,
        None => mean_nll(model, scored, 32, device)?,
    };
    Ok((loss, Some(set.report(&scores))))
}

/// Encodes plain text lines as language-modelling examples (every token after BOS is a target),
/// each ended by `</s>` when `end_with_eos` (pretraining, which teaches where a text ends); the
/// forgetting check leaves it out, so that it scores the text's own tokens only, not whether the
/// base ends a text with `</s>` (llama2.c's TinyStories models never do, and `trainLabelTokens`
/// trains that row).
pub fn encode_lm_lines(
    encoder: &Encoder,
    lines: &[String],
    max_len: usize,
    end_with_eos: bool,
) -> Result<Vec<Encoded>> {
    let mut out = Vec::new();
    for l in lines {
        let mut ids = vec![encoder.bos];
        ids.extend(encoder.tokens(l.trim())?);
        if end_with_eos {
            ids.push(encoder.eos);
        }
        ids.truncate(max_len.max(2));
        out.push(Encoded::language_modelling(ids));
    }
    Ok(out)
}

/// Perplexity on language-modelling examples.
pub fn perplexity(model: &Llama, items: &[Encoded], device: &Device) -> Result<f64> {
    Ok(mean_nll(model, items, 8, device)?.exp())
}

/// Greedy, deterministic completion of a user prompt rendered with the encoder's template.
pub fn sample(model: &Llama, encoder: &Encoder, prompt: &str, max_new: usize) -> Result<String> {
    let ex = crate::data::Example {
        system: None,
        history: vec![],
        user: prompt.to_string(),
        response: String::new(),
        label: None,
        line: 0,
    };
    let enc = encoder.encode(&ex)?;
    let prompt_ids = &enc.ids[..enc.prompt_len.min(enc.ids.len())];
    let out = model.generate_greedy(prompt_ids, max_new, Some(encoder.eos))?;
    Ok(encoder.decode(&out)?.trim().to_string())
}
