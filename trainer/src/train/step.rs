//! The one optimizer step: forward, loss, backward over the micro-batches of a step, the
//! averaged gradients clipped, then AdamW. The training loop ([`super::trainer::Trainer`]), the
//! tiny base's pretraining ([`crate::tiny_base::pretrain()`]) and the throughput benchmark all call
//! [`optimizer_step`], so what is measured and pretrained is what trains. Data-parallel ranks
//! call [`optimizer_step_across`], which adds the ranks' gradients before they are averaged.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

pub use super::base_kl::BaseKl;
pub use super::micro_batch::{MicroBatchGrads, micro_batch_grads};
use crate::Result;
use crate::data::batch::Batch;
use crate::distributed::{Collective, SingleProcess};
use crate::model::linear::FwdCtx;
use crate::model::{Gradients, Llama};
use crate::optim::{AdamW, clip_factor, global_norm};
use crate::rng::Rng;

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
    // The average over micro-batches and the clipping factor scale the summed gradients inside
    // the optimizer's update (no pass over them of their own).
    let n = count.max(1) as f64;
    let grad_norm = global_norm(model.trainable(), &acc)? / n;
    let grad_scale = clip_factor(grad_norm, settings.max_grad_norm) / n;
    opt.step_scaled(model.trainable(), &acc, lr, grad_scale)?;
    Ok(StepOutcome {
        loss: loss_sum / n as f32,
        grad_norm,
        tokens,
        base_kl: (kl_count > 0).then(|| kl_sum / kl_count as f32),
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
