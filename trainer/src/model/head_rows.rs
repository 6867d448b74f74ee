//! Trainable rows of a frozen `lm_head`: PEFT's `trainable_token_indices` on `lm_head`.
//!
//! LoRA adapters move the hidden states, but a frozen head scores a token only as well as its
//! row allows. A base that has rarely or never written a label's word (a small or domain base:
//! the demo's tiny model never saw `▁Pos` or `▁Neg`) keeps near-identical, untrained rows for
//! the labels, and no adapter can separate them. Training just those rows beside the adapters
//! fixes that and leaves every other token's logit exactly as the base computes it, so the
//! model's general text ability is only touched through the label tokens.
//!
//! As in PEFT, the trained values are the new rows themselves (initialised from the base's
//! rows), saved as `base_model.model.lm_head.token_adapter.trainable_tokens_delta` (k × hidden)
//! with `trainable_token_indices: {"lm_head": [...]}` in `adapter_config.json`.

use candle_core::{DType, Tensor, Var};

use super::linear::FwdCtx;
use crate::{Result, TrainerError};

/// The PEFT tensor name of the trained `lm_head` rows.
pub const PEFT_HEAD_ROWS_NAME: &str =
    "base_model.model.lm_head.token_adapter.trainable_tokens_delta";

/// Trained rows of a frozen `lm_head` for a few token ids.
#[derive(Debug, Clone)]
pub struct HeadRows {
    /// The token ids, in the order of the rows.
    token_ids: Vec<u32>,
    /// The same ids as a u32 tensor on the head's device.
    ids: Tensor,
    /// The base's rows (k × hidden), f32.
    original: Tensor,
    /// The trained rows (k × hidden), f32; they start equal to `original`.
    rows: Var,
}

impl HeadRows {
    /// Rows of `head` (vocab × hidden) for `token_ids`, which must be distinct and in range.
    pub fn new(head: &Tensor, token_ids: &[u32]) -> Result<Self> {
        let (vocab, _) = head.dims2()?;
        if token_ids.is_empty() {
            return Err(TrainerError::Config(
                "trainable lm_head rows: no token id given".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for &id in token_ids {
            if id as usize >= vocab {
                return Err(TrainerError::Config(format!(
                    "trainable lm_head rows: token id {id} is outside the vocabulary of {vocab}"
                )));
            }
            if !seen.insert(id) {
                return Err(TrainerError::Config(format!(
                    "trainable lm_head rows: token id {id} is given twice"
                )));
            }
        }
        let ids = Tensor::new(token_ids, head.device())?;
        let original = head.index_select(&ids, 0)?.to_dtype(DType::F32)?;
        let rows = Var::from_tensor(&original.copy()?)?;
        Ok(Self {
            token_ids: token_ids.to_vec(),
            ids,
            original,
            rows,
        })
    }

    /// The token ids whose rows are trained.
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    /// The trained rows, as the optimiser sees them.
    pub fn var(&self) -> &Var {
        &self.rows
    }

    /// The logits `base_logits` (n × vocab) of the frozen head for the rows `x` (n × hidden),
    /// with the columns of the trained tokens recomputed from the trained rows:
    /// `base + x·(rows − original)ᵀ` added into those columns, which equals PEFT's product with
    /// the row-replaced head. The gradient reaches the rows and `x`, never the frozen head.
    pub fn apply(&self, x: &Tensor, base_logits: &Tensor, ctx: &FwdCtx) -> Result<Tensor> {
        let rows = ctx.param(self.rows.as_tensor());
        let delta = rows.sub(&self.original)?.to_dtype(x.dtype())?;
        let extra = x.matmul(&delta.t()?)?.to_dtype(base_logits.dtype())?;
        Ok(base_logits.index_add(&self.ids, &extra, 1)?)
    }

    /// `head` (vocab × hidden) with the trained rows in place of the base's.
    pub fn merge(&self, head: &Tensor) -> Result<Tensor> {
        let delta = self
            .rows
            .as_tensor()
            .detach()
            .sub(&self.original)?
            .to_dtype(head.dtype())?;
        Ok(head.index_add(&self.ids, &delta, 0)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn head() -> Tensor {
        let v: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin()).collect();
        Tensor::from_vec(v, (10, 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn refuses_repeated_or_out_of_range_ids() {
        let h = head();
        let twice = HeadRows::new(&h, &[3, 5, 3]).unwrap_err().to_string();
        assert!(twice.contains("token id 3 is given twice"), "{twice}");
        let outside = HeadRows::new(&h, &[10]).unwrap_err().to_string();
        assert!(
            outside.contains("outside the vocabulary of 10"),
            "{outside}"
        );
        assert!(HeadRows::new(&h, &[]).is_err());
    }

    #[test]
    fn logits_equal_the_row_replaced_head() {
        let h = head();
        let rows = HeadRows::new(&h, &[7, 2]).unwrap();
        let new_rows =
            Tensor::new(&[[1f32, -2., 0.5, 3.], [0.25, 0., -1., 2.]], &Device::Cpu).unwrap();
        rows.var().set(&new_rows).unwrap();
        let x = Tensor::new(&[[0.5f32, 1., -1., 2.], [1., 0., 0., -3.]], &Device::Cpu).unwrap();
        let ctx = FwdCtx::eval();
        let got = rows
            .apply(&x, &x.matmul(&h.t().unwrap()).unwrap(), &ctx)
            .unwrap();
        // The head with rows 7 and 2 replaced, as PEFT's `index_copy` builds it.
        let mut replaced = h.to_vec2::<f32>().unwrap();
        replaced[7] = new_rows.get(0).unwrap().to_vec1().unwrap();
        replaced[2] = new_rows.get(1).unwrap().to_vec1().unwrap();
        let replaced = Tensor::new(replaced, &Device::Cpu).unwrap();
        let want = x.matmul(&replaced.t().unwrap()).unwrap();
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        let merged = rows.merge(&h).unwrap();
        let diff = (merged - replaced)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
