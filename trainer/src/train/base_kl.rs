//! The KL-to-base penalty that keeps a LoRA fine-tune's general text ability.
//!
//! A task's loss sits on a few answer tokens, but the adapters change the model at every
//! position: on the demo's stories base, 100 LoRA steps on sentiment labels raised the
//! perplexity of general text by ×1.78. The penalty adds `weight · KL(p_base ‖ p_model)` at the
//! positions whose next token is part of the prompt (the text the model reads, not the answer
//! it learns), so the adapters learn the answer and leave the model's next-token distribution
//! on ordinary text where the base had it. The base is the same model with its adapters and
//! trained head rows left out ([`FwdCtx::base_model`]), so it costs no memory; its distribution
//! costs one forward without a backward graph per micro-batch. Only every `stride`-th prompt
//! position is compared, which bounds the extra `lm_head` work.

use candle_core::Tensor;

use crate::Result;
use crate::data::batch::Batch;
use crate::model::Llama;
use crate::model::linear::FwdCtx;

/// The penalty's settings (`method.lora.klToBase`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaseKl {
    /// The penalty's weight against the targets' mean loss.
    pub weight: f64,
    /// Every `stride`-th prompt position of a batch is compared (1 compares them all).
    pub stride: usize,
}

impl BaseKl {
    /// The flat positions of `batch` the penalty compares: every `stride`-th of
    /// [`Batch::context_rows`], from the first. `None` when the weight is zero or the batch has
    /// no prompt position (then the targets' loss is the whole objective).
    pub fn compared_rows(&self, batch: &Batch) -> Option<Vec<u32>> {
        if self.weight <= 0.0 {
            return None;
        }
        let picked: Vec<u32> = batch
            .context_rows
            .iter()
            .copied()
            .step_by(self.stride.max(1))
            .collect();
        (!picked.is_empty()).then_some(picked)
    }

    /// The base model's next-token logits (rows, vocab) at the flat positions `rows` of
    /// `batch`, without a backward graph.
    pub fn reference_logits(&self, model: &Llama, batch: &Batch, rows: &Tensor) -> Result<Tensor> {
        model.logits_at(
            &batch.ids,
            Some(&batch.attention),
            rows,
            &mut FwdCtx::base_model(),
        )
    }
}
