//! A fused cross-entropy for CPU: one custom op computes the mean negative log-likelihood of
//! the targets from (n, vocab) f32 logits, and its backward writes `softmax − one-hot` directly.
//! The primitive-op formulation materialises about a dozen (n × vocab) temporaries in forward and
//! backward (max, shift, exp, scatter of the gathered gradient, the zero-fill of every edge); this
//! op needs one output buffer for the gradient. It has a backward, so gradients are not cut.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::kernels::{self, cpu_f32_values};

/// The op; holds the target ids (one per logits row).
#[derive(Debug, Clone)]
pub struct FusedNll {
    targets: Vec<u32>,
}

pub(crate) fn row_lse(row: &[f32]) -> f32 {
    let m = kernels::max(row);
    m + kernels::exp_shifted_sum(row, m).ln()
}

/// Splits rows across the available threads.
pub(crate) fn par_rows<F>(n: usize, f: F) -> Vec<f32>
where
    F: Fn(std::ops::Range<usize>) -> Vec<f32> + Sync,
{
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(n.max(1));
    let chunk = n.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|start| {
                let f = &f;
                s.spawn(move || f(start..(start + chunk).min(n)))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// The (n, vocab) f32 logits of a fused op's input, row-major, with `n` and `vocab`.
pub(crate) fn logits_rows<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let (n, v) = layout.shape().dims2()?;
    Ok((cpu_f32_values(op, storage, layout)?, n, v))
}

/// The backward of a fused row-mean op over (n, vocab) logits `arg`: `row_grad(r, row, g, out)`
/// appends the gradient of row `r` (its logits `row`) to `out`, with `g` the upstream gradient
/// divided by the row count.
pub(crate) fn mean_backward<F>(
    arg: &Tensor,
    grad_res: &Tensor,
    row_grad: F,
) -> candle_core::Result<Option<Tensor>>
where
    F: Fn(usize, &[f32], f32, &mut Vec<f32>) + Sync,
{
    let (n, v) = arg.dims2()?;
    let g = grad_res
        .to_dtype(candle_core::DType::F32)?
        .to_scalar::<f32>()?
        / n.max(1) as f32;
    let x = arg.detach().contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let grad = par_rows(n, |rows| {
        let mut out = Vec::with_capacity(rows.len() * v);
        for r in rows {
            row_grad(r, &x[r * v..(r + 1) * v], g, &mut out);
        }
        out
    });
    Ok(Some(Tensor::from_vec(grad, (n, v), arg.device())?))
}

/// The mean of per-row values as a scalar op result.
pub(crate) fn row_mean(per_row: &[f32]) -> (CpuStorage, Shape) {
    let mean = per_row.iter().map(|x| *x as f64).sum::<f64>() / per_row.len().max(1) as f64;
    (CpuStorage::F32(vec![mean as f32]), Shape::from(()))
}

impl CustomOp1 for FusedNll {
    fn name(&self) -> &'static str {
        "fused-nll"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, n, v) = logits_rows("fused-nll", storage, layout)?;
        if n != self.targets.len() {
            candle_core::bail!("fused-nll: {n} rows but {} targets", self.targets.len())
        }
        let per_row = par_rows(n, |rows| {
            rows.map(|r| {
                let row = &data[r * v..(r + 1) * v];
                let t = self.targets[r] as usize;
                row_lse(row) - row.get(t).copied().unwrap_or(0.0)
            })
            .collect()
        });
        Ok(row_mean(&per_row))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        mean_backward(arg, grad_res, |r, row, g, out| {
            let lse = row_lse(row);
            let t = self.targets[r] as usize;
            let start = out.len();
            out.extend_from_slice(row);
            let probs = &mut out[start..];
            kernels::exp_shifted_in_place(probs, lse);
            if let Some(p) = probs.get_mut(t) {
                *p -= 1.0;
            }
            kernels::scale(probs, g);
        })
    }
}

/// Mean NLL of `targets` under `logits` (n, vocab), fused on CPU for f32 contiguous logits.
pub fn fused_nll(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let op = FusedNll {
        targets: targets.to_vec1::<u32>()?,
    };
    logits.contiguous()?.apply_op1(op)
}
