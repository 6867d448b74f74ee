//! RMSNorm with a backward pass (candle's fused `rms_norm` has none): on the CPU in f32 one
//! custom op whose forward and backward are one pass per row each; elsewhere primitive ops.
//!
//! From primitives the norm is eight recorded ops (square, mean, shift, root, reciprocal, two
//! products and the broadcasts), each a full-size tensor written in the forward and a zero-filled
//! gradient accumulated in the backward; a decoder layer has two. The op keeps only its input and
//! its output, and its backward is the closed form `dx = r · (g ⊙ w − x̂ · mean(g ⊙ w ⊙ x̂))`,
//! `dw = Σ_rows g ⊙ x̂`, with `r = 1 / sqrt(mean(x²) + eps)` and `x̂ = r · x`.

use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;
use crate::kernels;
use crate::kernels::{cpu_f32_values, storage_f32_values};

/// `x / sqrt(mean(x²) + eps) · w`, computed in f32 and returned in `x`'s dtype.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        return Ok(x
            .contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps })?);
    }
    reference_rms_norm(x, w, eps)
}

/// The primitive-op formulation (any device and dtype), also the fused op's reference in tests.
pub(crate) fn reference_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    let y = x.broadcast_mul(&inv)?.to_dtype(dtype)?;
    Ok(y.broadcast_mul(w)?)
}

/// The CPU op over f32 `x` (.., hidden) and `w` (hidden).
struct RmsNorm {
    eps: f64,
}

/// Rows per task of the backward (whose weight gradient is summed per task, then over tasks).
const ROWS_PER_TASK: usize = 64;

impl RmsNorm {
    /// `1 / sqrt(mean(row²) + eps)`.
    fn inverse_rms(&self, row: &[f32]) -> f32 {
        let ms = kernels::dot(row, row) / row.len().max(1) as f32;
        1.0 / (ms + self.eps as f32).sqrt()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32_values("rms-norm", x, x_layout)?;
        let w = cpu_f32_values("rms-norm", w, w_layout)?;
        let hidden = w.len();
        if x_layout.dims().last() != Some(&hidden) {
            candle_core::bail!(
                "rms-norm: input {:?} and weight {:?} do not match",
                x_layout.dims(),
                w_layout.dims()
            )
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(hidden)
            .zip(x.par_chunks(hidden))
            .for_each(|(out, row)| {
                let r = self.inverse_rms(row);
                for ((o, xv), wv) in out.iter_mut().zip(row).zip(w) {
                    *o = xv * r * wv;
                }
            });
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let hidden = w.elem_count();
        let w_tracks = w.track_op();
        let grad = grad.contiguous()?;
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = w.storage_and_layout();
        let (g_storage, g_layout) = grad.storage_and_layout();
        let (dx, dw) = self.backward_rows(
            storage_f32_values("rms-norm", &x_storage, x_layout)?,
            storage_f32_values("rms-norm", &w_storage, w_layout)?,
            storage_f32_values("rms-norm", &g_storage, g_layout)?,
            hidden,
            w_tracks,
        )?;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = dw
            .map(|dw| Tensor::from_vec(dw, w.shape(), w.device()))
            .transpose()?;
        Ok((Some(dx), dw))
    }
}

impl RmsNorm {
    /// The input's gradient and, when `want_w`, the weight's, for rows `x` with upstream
    /// gradient `g`.
    fn backward_rows(
        &self,
        x: &[f32],
        w: &[f32],
        g: &[f32],
        hidden: usize,
        want_w: bool,
    ) -> candle_core::Result<(Vec<f32>, Option<Vec<f32>>)> {
        if g.len() != x.len() || hidden == 0 {
            candle_core::bail!("rms-norm: gradient of {} for {} inputs", g.len(), x.len())
        }
        let mut dx = vec![0f32; x.len()];
        let task = ROWS_PER_TASK * hidden;
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(task)
            .zip(x.par_chunks(task).zip(g.par_chunks(task)))
            .map(|(dx, (x, g))| {
                let mut dw = if want_w {
                    vec![0f32; hidden]
                } else {
                    Vec::new()
                };
                for ((dx, x), g) in dx
                    .chunks_mut(hidden)
                    .zip(x.chunks(hidden))
                    .zip(g.chunks(hidden))
                {
                    let r = self.inverse_rms(x);
                    let dot: f32 = x
                        .iter()
                        .zip(g)
                        .zip(w)
                        .map(|((x, g), w)| g * w * x * r)
                        .sum();
                    let mean = dot / hidden as f32;
                    for (((d, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                        *d = r * (g * w - x * r * mean);
                    }
                    for ((acc, x), g) in dw.iter_mut().zip(x).zip(g) {
                        *acc += g * x * r;
                    }
                }
                dw
            })
            .collect();
        let dw = want_w.then(|| {
            let mut sum = vec![0f32; hidden];
            for part in &partial {
                for (s, p) in sum.iter_mut().zip(part) {
                    *s += p;
                }
            }
            sum
        });
        Ok((dx, dw))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_equals_primitive_value_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 70, 24), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 24, &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (3, 70, 24), &dev).unwrap();
        let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let reference = reference_rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let d = crate::test_util::max_abs_diff(&fused, &reference);
        assert!(d < 1e-5, "value: {d}");
        let ours = (&fused * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let theirs = (&reference * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in [("x", &x), ("w", &w)] {
            let d = crate::test_util::max_abs_diff(
                ours.get(var.as_tensor()).unwrap(),
                theirs.get(var.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "{name}: {d}");
        }
        // A frozen weight gets no gradient.
        let frozen = w.as_tensor().detach();
        let y = rms_norm(x.as_tensor(), &frozen, 1e-5).unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&frozen).is_none());
    }
}
