//! The one optimizer step: forward, loss, backward over the micro-batches of a step, the
//! averaged gradients clipped, then AdamW. The training loop ([`super::trainer::Trainer`]), the
//! tiny base's pretraining ([`crate::tiny_base::pretrain()`]) and the throughput benchmark all call
//! [`optimizer_step`], so what is measured and pretrained is what trains. Data-parallel ranks
//! call [`optimizer_step_across`], which adds the ranks' gradients before they are averaged.

use std::cell::Cell;
use std::collections::HashMap;

use candle_core::{DType, Tensor};

pub use super::base_kl::BaseKl;
use crate::Result;
use crate::data::batch::Batch;
use crate::distributed::{Collective, SingleProcess};
use crate::loss::kl_to_reference;
use crate::model::dropout::RowShard;
use crate::model::linear::FwdCtx;
use crate::model::{Gradients, Llama};
use crate::optim::{AdamW, clip_grad_norm};
use crate::rng::Rng;
use crate::workers::{row_ranges, run_single_threaded};

/// How a step computes and bounds its gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSettings {
    /// The global gradient norm is clipped to this.
    pub max_grad_norm: f64,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// Frozen weights through candle's plain matmul (the path the frozen matmul replaces; the
    /// benchmark's reference).
    pub reference_matmul: bool,
    /// The forgetting penalty: the trained model's next-token distribution on the prompts is
    /// kept near its base's ([`BaseKl`]). `None` trains on the targets' loss alone.
    pub base_kl: Option<BaseKl>,
    /// CPU workers a micro-batch's rows are split between ([`crate::workers::cpu_workers`]); 1
    /// computes it whole (the only choice on a GPU, where it is ignored).
    pub cpu_workers: usize,
}

impl StepSettings {
    /// Clipping at `max_grad_norm`, the plain backward, the frozen-weight matmul, the whole
    /// micro-batch on one worker.
    pub fn clipped_at(max_grad_norm: f64) -> Self {
        Self {
            max_grad_norm,
            gradient_checkpointing: false,
            reference_matmul: false,
            base_kl: None,
            cpu_workers: 1,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Mean loss over the step's micro-batches (one with no target token counts as 0).
    pub loss: f32,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens of the step's batches, padding excluded.
    pub tokens: usize,
    /// Mean KL-to-base penalty over the micro-batches that had one (unweighted).
    pub base_kl: Option<f32>,
}

/// One optimizer step of `model` over `micro_batches` at learning rate `lr`. The gradients of
/// the micro-batches are averaged (their count divides the sum, so gradient accumulation equals
/// one large batch of equal-sized micro-batches), clipped to `settings.max_grad_norm` and applied
/// by `opt`. With `dropout_rng` LoRA dropout draws from it and it advances as the forwards did.
pub fn optimizer_step(
    model: &Llama,
    opt: &mut AdamW,
    micro_batches: impl IntoIterator<Item = Result<Batch>>,
    lr: f64,
    settings: &StepSettings,
    dropout_rng: Option<&mut Rng>,
) -> Result<StepOutcome> {
    optimizer_step_across(
        model,
        opt,
        micro_batches,
        lr,
        settings,
        dropout_rng,
        &mut SingleProcess,
    )
}

/// [`optimizer_step`] on one rank of a data-parallel gang: `micro_batches` are this rank's
/// share of the step, and the sums of every rank's gradients, losses, micro-batch and token
/// counts go through `collective` before the average, so all ranks apply the same update and
/// `W` ranks of `k` micro-batches equal one rank accumulating the `W × k` (also when a rank has
/// fewer at the end of an epoch). `tokens` is then the gang's.
pub fn optimizer_step_across(
    model: &Llama,
    opt: &mut AdamW,
    micro_batches: impl IntoIterator<Item = Result<Batch>>,
    lr: f64,
    settings: &StepSettings,
    mut dropout_rng: Option<&mut Rng>,
    collective: &mut dyn Collective,
) -> Result<StepOutcome> {
    let mut acc = Gradients::new();
    let mut loss_sum = 0f32;
    let mut tokens = 0;
    let mut count = 0usize;
    let (mut kl_sum, mut kl_count) = (0f32, 0usize);
    for batch in micro_batches {
        let batch = batch?;
        count += 1;
        tokens += batch.n_tokens;
        if batch.n_targets == 0 {
            continue;
        }
        let mut ctx = FwdCtx::train(dropout_rng.as_deref().copied());
        ctx.reference_matmul = settings.reference_matmul;
        let step = micro_batch_grads(model, &batch, &mut ctx, settings)?;
        if let (Some(stream), Some(advanced)) = (dropout_rng.as_deref_mut(), ctx.dropout_rng) {
            *stream = advanced;
        }
        loss_sum += step.loss;
        if let Some(kl) = step.base_kl {
            kl_sum += kl;
            kl_count += 1;
        }
        acc.merge(step.grads)?;
    }
    let mut acc = acc.into_map();
    if collective.world_size() > 1 {
        let totals = [
            loss_sum,
            count as f32,
            tokens as f32,
            kl_sum,
            kl_count as f32,
        ];
        let [l, c, t, k, kc] = all_reduce_gradients(model, &mut acc, totals, collective)?;
        (loss_sum, count, tokens) = (l, c as usize, t as usize);
        (kl_sum, kl_count) = (k, kc as usize);
    }
    let n = count.max(1) as f64;
    if count > 1 {
        for g in acc.values_mut() {
            *g = (&*g / n)?;
        }
    }
    let grad_norm = clip_grad_norm(model.trainable(), &mut acc, settings.max_grad_norm)?;
    opt.step(model.trainable(), &acc, lr)?;
    Ok(StepOutcome {
        loss: loss_sum / n as f32,
        grad_norm,
        tokens,
        base_kl: (kl_count > 0).then(|| kl_sum / kl_count as f32),
    })
}

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
    let width = batch.width()?;
    let total_compared = compared.as_ref().map_or(0, |(_, rows)| rows.len());
    let mut jobs = Vec::with_capacity(ranges.len());
    for range in ranges {
        let part = batch.row_range(range.clone())?;
        let (first, end) = ((range.start * width) as u32, (range.end * width) as u32);
        let part_compared = compared.as_ref().map(|(kl, rows)| {
            let within = rows.iter().filter(|&&r| (first..end).contains(&r));
            (*kl, within.map(|r| r - first).collect::<Vec<u32>>())
        });
        let n_compared = part_compared.as_ref().map_or(0, |(_, rows)| rows.len());
        if part.n_targets == 0 && n_compared == 0 {
            continue;
        }
        let share = Share {
            targets: fraction(part.n_targets, batch.n_targets),
            compared: fraction(n_compared, total_compared),
        };
        let mut part_ctx = FwdCtx {
            shard: Some(RowShard {
                first: range.start,
                rows: range.len(),
                of: batch.len(),
            }),
            ..ctx.without_graph()
        };
        part_ctx.graph = ctx.graph;
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

/// Replaces `grads` (this rank's gradient sums) and `totals` with their sums over the ranks. A
/// tensor that no rank has a gradient for stays absent, as on one rank.
fn all_reduce_gradients(
    model: &Llama,
    grads: &mut HashMap<String, Tensor>,
    totals: [f32; 5],
    collective: &mut dyn Collective,
) -> Result<[f32; 5]> {
    let trainable = model.trainable();
    let mut flat: Vec<f32> =
        Vec::with_capacity(totals.len() + trainable.len() + model.trainable_count());
    flat.extend(totals);
    flat.extend(
        trainable
            .iter()
            .map(|(n, _)| f32::from(grads.contains_key(n))),
    );
    for (name, var) in trainable {
        match grads.get(name) {
            // Summed in f32 whatever the weights' dtype (bf16 for full fine-tuning on GPUs).
            Some(g) => flat.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => flat.extend(std::iter::repeat_n(0f32, var.elem_count())),
        }
    }
    collective.all_reduce_sum(&mut flat)?;
    let (head, values) = flat.split_at(totals.len() + trainable.len());
    let mut offset = 0;
    for ((name, var), present) in trainable.iter().zip(&head[totals.len()..]) {
        let n = var.elem_count();
        if *present > 0.0 {
            let g = Tensor::from_slice(&values[offset..offset + n], var.shape(), var.device())?
                .to_dtype(var.dtype())?;
            grads.insert(name.clone(), g);
        }
        offset += n;
    }
    let mut reduced = [0f32; 5];
    reduced.copy_from_slice(&head[..totals.len()]);
    Ok(reduced)
}
