//! One micro-batch's objective and gradients, whole or split by rows between the CPU workers.

use std::cell::Cell;

use candle_core::Tensor;

use super::base_kl::BaseKl;
use super::step::StepSettings;
use crate::Result;
use crate::data::batch::Batch;
use crate::loss::kl_to_reference;
use crate::model::dropout::RowShard;
use crate::model::linear::FwdCtx;
use crate::model::{Gradients, Llama};
use crate::workers::{row_ranges, run_single_threaded};

/// What one micro-batch gives: its targets' loss, the KL-to-base penalty's value when one is
/// set, and the gradients of `loss + weight · penalty`.
#[derive(Debug)]
pub struct MicroBatchGrads {
    /// Mean loss of the targets (the penalty excluded: comparable with a run without one).
    pub loss: f32,
    /// `KL(p_base ‖ p_model)` averaged over the compared prompt positions, unweighted.
    pub base_kl: Option<f32>,
    /// Gradients of the objective for every trainable tensor it depends on.
    pub grads: Gradients,
}

/// The objective of one micro-batch and its gradients: the targets' mean cross-entropy, plus
/// `settings.base_kl`'s weighted penalty when set and the batch has prompt positions. One
/// forward with the graph computes the logits of the target and the compared positions; the
/// base's distribution comes from one more forward without adapters and without a graph.
///
/// On the CPU with `settings.cpu_workers` above one, the batch's rows are split between that
/// many single-threaded workers ([`crate::workers`]): each computes its rows with the batch's
/// dropout masks at those rows, its objective weighted by its share of the batch's loss and
/// compared positions, so the sum of their gradients is the batch's up to rounding.
pub fn micro_batch_grads(
    model: &Llama,
    batch: &Batch,
    ctx: &mut FwdCtx,
    settings: &StepSettings,
) -> Result<MicroBatchGrads> {
    let compared = settings
        .base_kl
        .and_then(|kl| kl.compared_rows(batch).map(|rows| (kl, rows)));
    let ranges = row_ranges(batch.len(), settings.cpu_workers);
    if ranges.len() <= 1 || !model.device().is_cpu() {
        return weighted_grads(model, batch, compared.as_ref(), ctx, settings, Share::WHOLE);
    }
    let total_compared = compared.as_ref().map_or(0, |(_, rows)| rows.len());
    let mut jobs = Vec::with_capacity(ranges.len());
    for range in ranges {
        let part = batch.row_range(range.clone())?;
        let part_compared = match &compared {
            Some((kl, rows)) => Some((*kl, batch.positions_in_rows(range.clone(), rows)?)),
            None => None,
        };
        let n_compared = part_compared.as_ref().map_or(0, |(_, rows)| rows.len());
        if part.n_targets == 0 && n_compared == 0 {
            continue;
        }
        let share = Share {
            targets: fraction(part.n_targets, batch.n_targets),
            compared: fraction(n_compared, total_compared),
        };
        let mut part_ctx = ctx.for_rows(RowShard {
            first: range.start,
            rows: range.len(),
            of: batch.len(),
        });
        jobs.push(move || {
            let grads = weighted_grads(
                model,
                &part,
                part_compared.as_ref(),
                &mut part_ctx,
                settings,
                share,
            )?;
            Ok((grads, part_ctx.dropout_rng))
        });
    }
    if jobs.is_empty() {
        return weighted_grads(model, batch, compared.as_ref(), ctx, settings, Share::WHOLE);
    }
    let mut whole = MicroBatchGrads {
        loss: 0.0,
        base_kl: None,
        grads: Gradients::new(),
    };
    for (part, advanced) in run_single_threaded(jobs)? {
        // Every part's dropout stream advanced past the whole batch's masks.
        ctx.dropout_rng = advanced;
        whole.loss += part.loss;
        if let Some(kl) = part.base_kl {
            whole.base_kl = Some(whole.base_kl.unwrap_or(0.0) + kl);
        }
        whole.grads.merge(part.grads)?;
    }
    Ok(whole)
}

/// The shares of a micro-batch's loss positions and compared positions that one part of it
/// holds; the part's objective weights its two terms by them.
#[derive(Debug, Clone, Copy)]
struct Share {
    targets: f64,
    compared: f64,
}

impl Share {
    /// The whole batch.
    const WHOLE: Share = Share {
        targets: 1.0,
        compared: 1.0,
    };
}

/// `part / whole`, 0 when `whole` is.
fn fraction(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// `value · factor` (`value` itself when the factor is one).
fn scaled(value: Tensor, factor: f64) -> Result<Tensor> {
    if factor == 1.0 {
        Ok(value)
    } else {
        Ok((value * factor)?)
    }
}

/// [`micro_batch_grads`] of `batch` (a whole micro-batch, or a worker's part of one) with its
/// compared positions `compared`, the targets' mean loss weighted by `share.targets` and the
/// penalty by `share.compared`; `loss` and `base_kl` are reported with the same weights.
fn weighted_grads(
    model: &Llama,
    batch: &Batch,
    compared: Option<&(BaseKl, Vec<u32>)>,
    ctx: &mut FwdCtx,
    settings: &StepSettings,
    share: Share,
) -> Result<MicroBatchGrads> {
    let Some((kl, compared)) = compared.filter(|(_, rows)| !rows.is_empty()) else {
        let step = model.loss_and_grads(
            &batch.ids,
            Some(&batch.attention),
            &batch.rows,
            ctx,
            settings.gradient_checkpointing,
            |head| scaled(head.cross_entropy(&batch.targets)?, share.targets),
        )?;
        return Ok(MicroBatchGrads {
            loss: step.loss,
            base_kl: None,
            grads: step.grads,
        });
    };
    let compared = Tensor::new(compared.as_slice(), batch.rows.device())?;
    let reference = kl.reference_logits(model, batch, &compared)?;
    let n_targets = batch.n_targets;
    let rows = if n_targets == 0 {
        compared
    } else {
        Tensor::cat(&[&batch.rows, &compared], 0)?
    };
    let parts = Cell::new((0f32, 0f32));
    let step = model.loss_and_grads(
        &batch.ids,
        Some(&batch.attention),
        &rows,
        ctx,
        settings.gradient_checkpointing,
        |head| {
            let n_compared = head.rows()? - n_targets;
            let logits = head.narrow(n_targets, n_compared)?.logits()?;
            let penalty = kl_to_reference(&logits, &reference)?;
            let penalty_value = penalty.to_scalar::<f32>()? * share.compared as f32;
            let penalty = (penalty * (kl.weight * share.compared))?;
            if n_targets == 0 {
                parts.set((0.0, penalty_value));
                return Ok(penalty);
            }
            let ce = scaled(
                head.narrow(0, n_targets)?.cross_entropy(&batch.targets)?,
                share.targets,
            )?;
            parts.set((ce.to_scalar::<f32>()?, penalty_value));
            Ok((ce + penalty)?)
        },
    )?;
    let (loss, penalty) = parts.get();
    Ok(MicroBatchGrads {
        loss,
        base_kl: Some(penalty),
        grads: step.grads,
    })
}
