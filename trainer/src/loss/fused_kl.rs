//! A fused KL divergence for CPU: one custom op computes `KL(softmax(r) ‖ softmax(x))` averaged
//! over the rows of (n, vocab) f32 logits `x` against reference logits `r` (the base model's,
//! held by the op: no gradient reaches them), and its backward writes
//! `(softmax(x) − softmax(r)) / n` directly. The primitive-op formulation
//! ([`super::reference_kl`]) materialises a dozen (n × vocab) temporaries for the two
//! log-softmaxes, the product and their backward; the KL-to-base penalty evaluates it on
//! hundreds of rows per micro-batch.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::fused_ce::{logits_rows, mean_backward, par_rows, row_lse, row_mean};

/// The op; holds the reference logits (row-major, `vocab` per row).
#[derive(Debug, Clone)]
pub struct FusedKl {
    reference: Vec<f32>,
    vocab: usize,
}

impl FusedKl {
    fn reference_row(&self, r: usize) -> &[f32] {
        &self.reference[r * self.vocab..(r + 1) * self.vocab]
    }
}

impl CustomOp1 for FusedKl {
    fn name(&self) -> &'static str {
        "fused-kl"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, n, v) = logits_rows("fused-kl", storage, layout)?;
        if v != self.vocab || n * v != self.reference.len() {
            candle_core::bail!(
                "fused-kl: logits ({n}, {v}) against {} reference values of {} per row",
                self.reference.len(),
                self.vocab
            )
        }
        let per_row = par_rows(n, |rows| {
            rows.map(|r| {
                let x = &data[r * v..(r + 1) * v];
                let reference = self.reference_row(r);
                let (lse_x, lse_r) = (row_lse(x), row_lse(reference));
                reference
                    .iter()
                    .zip(x)
                    .map(|(rj, xj)| {
                        let log_p = rj - lse_r;
                        log_p.exp() * (log_p - (xj - lse_x))
                    })
                    .sum::<f32>()
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
            let reference = self.reference_row(r);
            let (lse_x, lse_r) = (row_lse(row), row_lse(reference));
            out.extend(
                row.iter()
                    .zip(reference)
                    .map(|(xj, rj)| g * ((xj - lse_x).exp() - (rj - lse_r).exp())),
            );
        })
    }
}

/// Mean `KL(softmax(reference) ‖ softmax(logits))` over the rows of (n, vocab) f32 logits on
/// CPU; `reference` has the same shape.
pub fn fused_kl(logits: &Tensor, reference: &Tensor) -> candle_core::Result<Tensor> {
    let (_, vocab) = logits.dims2()?;
    let op = FusedKl {
        reference: reference
            .detach()
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?,
        vocab,
    };
    logits.contiguous()?.apply_op1(op)
}
