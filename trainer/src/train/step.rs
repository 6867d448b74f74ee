//! The one optimizer step: forward, loss, backward over the micro-batches of a step, the
//! averaged gradients clipped, then AdamW. The training loop ([`super::trainer::Trainer`]), the
//! tiny base's pretraining ([`crate::tiny_base::pretrain()`]) and the throughput benchmark all call
//! [`optimizer_step`], so what is measured and pretrained is what trains.

use crate::Result;
use crate::data::batch::Batch;
use crate::loss::masked_cross_entropy;
use crate::model::linear::FwdCtx;
use crate::model::{Gradients, Llama};
use crate::optim::{AdamW, clip_grad_norm};
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
}

impl StepSettings {
    /// Clipping at `max_grad_norm`, the plain backward, the frozen-weight matmul.
    pub fn clipped_at(max_grad_norm: f64) -> Self {
        Self {
            max_grad_norm,
            gradient_checkpointing: false,
            reference_matmul: false,
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
    mut dropout_rng: Option<&mut Rng>,
) -> Result<StepOutcome> {
    let mut acc = Gradients::new();
    let mut loss_sum = 0f32;
    let mut tokens = 0;
    let mut count = 0usize;
    for batch in micro_batches {
        let batch = batch?;
        count += 1;
        tokens += batch.n_tokens;
        if batch.n_targets == 0 {
            continue;
        }
        let mut ctx = FwdCtx::train(dropout_rng.as_deref().copied());
        ctx.reference_matmul = settings.reference_matmul;
        let step = model.loss_and_grads(
            &batch.ids,
            Some(&batch.attention),
            &batch.rows,
            &mut ctx,
            settings.gradient_checkpointing,
            |logits| masked_cross_entropy(logits, &batch.targets),
        )?;
        if let (Some(stream), Some(advanced)) = (dropout_rng.as_deref_mut(), ctx.dropout_rng) {
            *stream = advanced;
        }
        loss_sum += step.loss;
        acc.merge(step.grads)?;
    }
    let mut acc = acc.into_map();
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
    })
}
