//! The LM head and the cross-entropy fused on CPU: the mean negative log-likelihood of `targets`
//! under `hidden · Wᵀ`, computed a block of rows at a time, so the (rows × vocab) logits and
//! their gradient never exist whole.
//!
//! For each block the op multiplies its rows by the head (one GEMM), turns the block's logits
//! into `softmax − one-hot` in one pass per row (the only exponentials of the step), and
//! multiplies that by the head again for the hidden states' gradient (and, when the head is
//! trained, by the rows for the head's). The gradients are therefore computed in the forward,
//! for an upstream gradient of 1, and the backward only scales them. Against projecting all rows
//! and then taking [`crate::loss::fused_ce`] this removes three passes over the logits (the copy
//! out of the projection, the backward's copy and its second exponential) and leaves no
//! (rows × vocab) tensor in the graph: on the throughput bench's shape (2,040 loss rows, 32,000
//! tokens) the step's peak RSS falls by about 1.2 GB (BENCHMARKS.md).

use std::cell::Cell;

use candle_core::{CpuStorage, CustomOp2, DType, InplaceOp1, Layout, Shape, Tensor};
use finetune_api::memory::cpu_loss_block_rows;
use rayon::prelude::*;

use super::fused_ce::row_lse;
use crate::kernels::{self, cpu_f32_values_mut, storage_f32_values};

/// Mean NLL of `targets` (one per row) under `hidden · weightᵀ`, for f32 `hidden` (n, d) and
/// `weight` (vocab, d) on the CPU, differentiable in both (a gradient is computed only for the
/// operands that track one). Equal to `masked_cross_entropy(hidden · weightᵀ, targets)`. Blocks
/// hold [`finetune_api::memory::CPU_LOSS_BLOCK_BYTES`] of logits: large enough for the GEMMs to
/// run at full speed, small enough that the (rows × vocab) tensors stay a fraction of the step.
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
) -> candle_core::Result<Tensor> {
    let vocab = weight.dim(0)? as u64;
    let block_rows = usize::try_from(cpu_loss_block_rows(vocab)).unwrap_or(usize::MAX);
    linear_cross_entropy_in_blocks(hidden, weight, targets, block_rows)
}

/// [`linear_cross_entropy`] with `block_rows` rows per block (tests use small blocks to cross
/// block boundaries).
pub fn linear_cross_entropy_in_blocks(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    block_rows: usize,
) -> candle_core::Result<Tensor> {
    let targets = targets.to_vec1::<u32>()?;
    let (n, d) = hidden.dims2()?;
    let (vocab, wd) = weight.dims2()?;
    if wd != d || targets.len() != n {
        candle_core::bail!(
            "linear-cross-entropy: hidden {:?}, head {:?} and {} targets do not match",
            hidden.shape(),
            weight.shape(),
            targets.len()
        )
    }
    if let Some(t) = targets.iter().find(|t| **t as usize >= vocab) {
        candle_core::bail!("linear-cross-entropy: target {t} outside a vocabulary of {vocab}")
    }
    let want_hidden = hidden.track_op();
    let want_weight = weight.track_op();
    let h = hidden.detach().contiguous()?;
    let w = weight.detach();
    let wt = w.t()?;
    let mut loss_sum = 0f64;
    let mut hidden_grad = Vec::new();
    let mut weight_grad: Option<Tensor> = None;
    for start in (0..n).step_by(block_rows.max(1)) {
        let rows = block_rows.max(1).min(n - start);
        let block = h.narrow(0, start, rows)?;
        let logits = block.matmul(&wt)?;
        let block_targets = &targets[start..start + rows];
        if !(want_hidden || want_weight) {
            loss_sum += block_nll(&logits, block_targets)?;
            continue;
        }
        // The block's logits become its gradient in place.
        let grad = logits;
        loss_sum += nll_and_grad_in_place(&grad, block_targets)?;
        if want_hidden {
            hidden_grad.push(grad.matmul(&w)?);
        }
        if want_weight {
            // The head's gradient transposed, (d × vocab): `blockᵀ · grad` reads the gradient
            // as stored, where `gradᵀ · block` packs a transposed (vocab × rows) operand
            // (measured: about a sixth slower on this shape); transposed back once below.
            let part = block.t()?.matmul(&grad)?;
            weight_grad = Some(match weight_grad {
                Some(sum) => (sum + part)?,
                None => part,
            });
        }
    }
    let weight_grad = weight_grad.map(|t| t.t()?.contiguous()).transpose()?;
    let mean = if n == 0 { 0.0 } else { loss_sum / n as f64 } as f32;
    if !(want_hidden || want_weight) {
        return Tensor::new(mean, hidden.device());
    }
    let hidden_grad = if want_hidden && n > 0 {
        Some(Tensor::cat(&hidden_grad, 0)?)
    } else {
        None
    };
    let op = LinearNll {
        mean,
        rows: n,
        grads: (hidden_grad, weight_grad),
    };
    hidden.apply_op2(weight, op)
}

/// The block's summed NLL.
fn block_nll(logits: &Tensor, targets: &[u32]) -> candle_core::Result<f64> {
    let vocab = logits.dim(1)?;
    let (storage, layout) = logits.storage_and_layout();
    let x = storage_f32_values("linear-cross-entropy", &storage, layout)?;
    Ok(x.par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| f64::from(row_lse(row) - row[t as usize]))
        .sum())
}

/// The block's summed NLL; turns the block's `logits` (rows × vocab, fresh and not shared) into
/// its gradient `softmax − one-hot` in place, each row's exponentials computed once.
fn nll_and_grad_in_place(logits: &Tensor, targets: &[u32]) -> candle_core::Result<f64> {
    let op = NllAndGrad {
        targets,
        sum: Cell::new(0.0),
    };
    logits.inplace_op1(&op)?;
    Ok(op.sum.get())
}

/// The in-place op of [`nll_and_grad_in_place`]: the targets, and the NLL sum it computes.
struct NllAndGrad<'a> {
    targets: &'a [u32],
    sum: Cell<f64>,
}

impl InplaceOp1 for NllAndGrad<'_> {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let logits = cpu_f32_values_mut(self.name(), storage, layout)?;
        let vocab = layout.dims().last().copied().unwrap_or(1).max(1);
        let sum = logits
            .par_chunks_mut(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let t = t as usize;
                let (m, target_logit) = (kernels::max(row), row[t]);
                let s = kernels::exp_shifted_in_place(row, m);
                kernels::scale(row, 1.0 / s);
                row[t] -= 1.0;
                f64::from(m + s.ln() - target_logit)
            })
            .sum();
        self.sum.set(sum);
        Ok(())
    }
}

/// The graph node: its forward hands over the mean computed outside the graph, its backward
/// scales the gradients computed with it by the upstream gradient over the row count.
struct LinearNll {
    mean: f32,
    rows: usize,
    /// The summed gradients of the hidden rows and of the head (for an upstream gradient of 1).
    grads: (Option<Tensor>, Option<Tensor>),
}

impl CustomOp2 for LinearNll {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![self.mean]), Shape::from(())))
    }

    fn bwd(
        &self,
        _hidden: &Tensor,
        _weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g =
            f64::from(grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()?) / self.rows.max(1) as f64;
        let scaled = |t: &Option<Tensor>| t.as_ref().map(|t| t.affine(g, 0.0)).transpose();
        Ok((scaled(&self.grads.0)?, scaled(&self.grads.1)?))
    }
}
