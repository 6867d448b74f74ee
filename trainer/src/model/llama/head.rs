//! The rows a loss is computed at, before the LM head: the loss of a training step is a function
//! of these hidden states, projected onto the vocabulary by the head only where it needs logits.
//! The targets' cross-entropy takes the fused head-and-loss op on the CPU
//! ([`crate::loss::linear_ce`]), so the rows' logits never exist whole there.

use candle_core::{DType, Tensor};

use super::Llama;
use crate::Result;
use crate::loss::linear_ce::linear_cross_entropy;
use crate::loss::masked_cross_entropy;
use crate::model::linear::FwdCtx;

/// The final hidden states (rows, hidden) of the loss rows, with the model and pass that project
/// them.
pub struct HeadInput<'a> {
    model: &'a Llama,
    hidden: Tensor,
    ctx: &'a FwdCtx,
}

impl<'a> HeadInput<'a> {
    /// The rows `hidden` of `model` in the pass `ctx`.
    pub(super) fn new(model: &'a Llama, hidden: Tensor, ctx: &'a FwdCtx) -> Self {
        Self { model, hidden, ctx }
    }

    /// How many rows.
    pub fn rows(&self) -> Result<usize> {
        Ok(self.hidden.dim(0)?)
    }

    /// Rows `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            hidden: self.hidden.narrow(0, start, len)?,
            ..*self
        })
    }

    /// The rows' logits (rows, vocab), f32.
    pub fn logits(&self) -> Result<Tensor> {
        self.model.project(&self.hidden, self.ctx)
    }

    /// The mean cross-entropy of `targets` (one per row): the fused head-and-loss op for f32 on
    /// the CPU with a plain head (no separately trained rows, no reference matmul), otherwise
    /// [`masked_cross_entropy`] of [`HeadInput::logits`]. Both give the same value and
    /// gradients up to rounding.
    pub fn cross_entropy(&self, targets: &Tensor) -> Result<Tensor> {
        let head = &self.model.lm_head;
        let plain_head = self.model.head_rows.is_none() || self.ctx.base_only;
        let fused = self.hidden.device().is_cpu()
            && self.hidden.dtype() == DType::F32
            && head.dtype() == DType::F32
            && head.device().is_cpu()
            && plain_head
            && !self.ctx.reference_matmul;
        if fused {
            let targets = targets.to_device(self.hidden.device())?;
            return Ok(linear_cross_entropy(
                &self.hidden,
                &self.ctx.param(head),
                &targets,
            )?);
        }
        masked_cross_entropy(&self.logits()?, targets)
    }
}
