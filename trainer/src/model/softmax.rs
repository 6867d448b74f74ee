//! The attention softmax as one differentiable op: `softmax(scale · scores + bias)` over the last
//! dimension, with f32 accumulation whatever the dtype.
//!
//! Written from primitive ops (max, subtract, exp, sum, divide) the softmax keeps five f32 copies
//! of the heads × s × s scores alive for the backward pass, and a bf16 run first widens the scores
//! to f32. This op keeps only its input and its output, both in the model's dtype, and its backward
//! is the closed form `dx = scale · y ⊙ (g − Σ g ⊙ y)`. candle's fused `softmax_last_dim` has no
//! backward, which is why this op exists.
//!
//! CPU: one pass per row for the forward and one for the backward, rows in parallel. CUDA: the
//! forward is the backend's own kernels in f32 on transients inside the op, and the backward is
//! tensor ops in f32 on one layer's scores at a time (no `unsafe`: the workspace forbids it).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::kernels;

/// `softmax(scale · scores + bias)` over the last dimension. `scores` is (b, heads, n, keys);
/// `bias` is an additive bias of the same dtype, (b or 1, 1, n, keys) — the causal and padding
/// mask, `-inf` where a key is hidden. Differentiable with respect to `scores` only.
pub fn biased_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let scores = scores.contiguous()?;
    let bias = bias.to_dtype(scores.dtype())?.contiguous()?;
    scores.apply_op2(&bias, BiasedSoftmax { scale })
}

/// The forward op; its backward is [`BiasedSoftmax::bwd`].
struct BiasedSoftmax {
    scale: f64,
}

/// (b, heads, n, keys) of the scores and the bias's batch (1 or b), checked.
fn shapes(scores: &Layout, bias: &Layout) -> candle_core::Result<([usize; 4], usize)> {
    let (b, h, n, k) = scores.shape().dims4()?;
    let (bb, one, bn, bk) = bias.shape().dims4()?;
    if one != 1 || bn != n || bk != k || (bb != 1 && bb != b) {
        candle_core::bail!(
            "biased-softmax: bias {:?} does not broadcast to scores {:?}",
            bias.shape(),
            scores.shape()
        );
    }
    Ok(([b, h, n, k], bb))
}

/// The contiguous slice a layout addresses.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("biased-softmax: input is not contiguous"),
    }
}

/// Runs `|a, b| body` on the contiguous slices of two CPU storages of the same float dtype
/// (f32, bf16, f16) and wraps the resulting `Vec` in that dtype's storage; other dtypes are an
/// error naming the op. One dispatch for both ops of this module.
macro_rules! per_float_dtype {
    ($op:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), |$a:ident, $b:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let ($a, $b) = (contiguous(a, $l1)?, contiguous(b, $l2)?);
                CpuStorage::F32($body)
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
                let ($a, $b) = (contiguous(a, $l1)?, contiguous(b, $l2)?);
                CpuStorage::BF16($body)
            }
            (CpuStorage::F16(a), CpuStorage::F16(b)) => {
                let ($a, $b) = (contiguous(a, $l1)?, contiguous(b, $l2)?);
                CpuStorage::F16($body)
            }
            _ => candle_core::bail!("{}: unsupported dtype {:?}", $op, $s1.dtype()),
        }
    };
}

fn forward_rows<T: WithDType>(
    x: &[T],
    bias: &[T],
    [_, h, n, k]: [usize; 4],
    bias_batch: usize,
    scale: f32,
) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(k)
        .zip(x.par_chunks(k))
        .enumerate()
        .for_each_init(
            || vec![0f32; k],
            |widened, (row, (dst, src))| {
                let (batch, query) = (row / (h * n), row % n);
                let bias_row = if bias_batch == 1 { 0 } else { batch } * n + query;
                let bias = &bias[bias_row * k..(bias_row + 1) * k];
                for ((w, s), b) in widened.iter_mut().zip(src).zip(bias) {
                    *w = scale * s.to_f64() as f32 + b.to_f64() as f32;
                }
                let max = kernels::max(widened);
                let inv = 1.0 / kernels::exp_shifted_in_place(widened, max);
                for (d, v) in dst.iter_mut().zip(widened.iter()) {
                    *d = T::from_f64(f64::from(v * inv));
                }
            },
        );
    out
}

impl CustomOp2 for BiasedSoftmax {
    fn name(&self) -> &'static str {
        "biased-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (dims, bb) = shapes(l1, l2)?;
        let scale = self.scale as f32;
        let out = per_float_dtype!(self.name(), (s1, l1), (s2, l2), |x, b| forward_rows(
            x, b, dims, bb, scale
        ));
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = forward_with_backend_ops(s1, l1, s2, l2, self.scale)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _bias: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(softmax_backward(y, grad, self.scale)?), None))
    }
}

/// The gradient of the scores of [`biased_softmax`] with output `y` (contiguous), for the
/// output's gradient `grad`: `scale · y ⊙ (grad − Σ grad ⊙ y)` per row. One pass per row on the
/// CPU, tensor ops in f32 elsewhere.
pub fn softmax_backward(y: &Tensor, grad: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    if y.device().is_cpu() {
        y.contiguous()?
            .apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad { scale })
    } else {
        backward_with_tensor_ops(y, grad, scale)
    }
}

/// The backward on any device from tensor ops in f32 (used off the CPU): one layer's transients.
fn backward_with_tensor_ops(y: &Tensor, grad: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (y32, g32) = (y.to_dtype(DType::F32)?, grad.to_dtype(DType::F32)?);
    let dot = (&g32 * &y32)?.sum_keepdim(D::Minus1)?;
    ((y32 * g32.broadcast_sub(&dot)?)? * scale)?.to_dtype(y.dtype())
}

/// `scale · y ⊙ (g − Σ g ⊙ y)` row by row (the CPU backward of [`BiasedSoftmax`]).
struct SoftmaxGrad {
    scale: f64,
}

fn backward_rows<T: WithDType>(y: &[T], g: &[T], k: usize, scale: f32) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    out.par_chunks_mut(k)
        .zip(y.par_chunks(k).zip(g.par_chunks(k)))
        .for_each_init(
            || (vec![0f32; k], vec![0f32; k]),
            |(wy, wg), (dst, (y, g))| {
                for ((a, b), (y, g)) in wy.iter_mut().zip(wg.iter_mut()).zip(y.iter().zip(g)) {
                    (*a, *b) = (y.to_f64() as f32, g.to_f64() as f32);
                }
                let dot = kernels::dot(wy, wg);
                for ((d, y), g) in dst.iter_mut().zip(wy.iter()).zip(wg.iter()) {
                    *d = T::from_f64(f64::from(scale * y * (g - dot)));
                }
            },
        );
    out
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "biased-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let k = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        if l1.shape() != l2.shape() {
            candle_core::bail!("biased-softmax-grad: {:?} vs {:?}", l1.shape(), l2.shape());
        }
        let scale = self.scale as f32;
        let out = per_float_dtype!(self.name(), (s1, l1), (s2, l2), |y, g| backward_rows(
            y, g, k, scale
        ));
        Ok((out, l1.shape().clone()))
    }
}

/// The forward on any backend from its own safe primitives, in f32: the scaled, biased scores,
/// the row maximum, the shifted exponentials and their row sum exist only inside this call and
/// are freed before it returns, so the autograd graph holds just the op's input and output. Used
/// on CUDA; on CPU the fused row loop above is faster (the tests check the two agree).
#[cfg_attr(
    not(any(feature = "cuda", test)),
    allow(
        dead_code,
        reason = "the CPU build runs the row loop; tests and CUDA use this"
    )
)]
fn forward_with_backend_ops<S: BackendStorage>(
    scores: &S,
    scores_layout: &Layout,
    bias: &S,
    bias_layout: &Layout,
    scale: f64,
) -> candle_core::Result<S> {
    use candle_core::op::{Add, Div, Exp, ReduceOp, Sub};
    shapes(scores_layout, bias_layout)?;
    let dtype = scores.dtype();
    let shape = scores_layout.shape().clone();
    let dense = Layout::contiguous(shape.clone());
    let last = shape.rank() - 1;
    let mut row_dims = shape.dims().to_vec();
    row_dims[last] = 1;
    let per_row = Layout::contiguous(row_dims).broadcast_as(shape.clone())?;
    let wide_bias = bias.to_dtype(bias_layout, DType::F32)?;
    let wide_bias_layout = Layout::contiguous(bias_layout.shape().clone()).broadcast_as(shape)?;
    let x = scores
        .to_dtype(scores_layout, DType::F32)?
        .affine(&dense, scale, 0.0)?
        .binary_impl::<Add>(&wide_bias, &dense, &wide_bias_layout)?;
    let max = x.reduce_op(ReduceOp::Max, &dense, &[last])?;
    let exp = x
        .binary_impl::<Sub>(&max, &dense, &per_row)?
        .unary_impl::<Exp>(&dense)?;
    drop(x);
    let sum = exp.reduce_op(ReduceOp::Sum, &dense, &[last])?;
    exp.binary_impl::<Div>(&sum, &dense, &per_row)?
        .to_dtype(&dense, dtype)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{Device, Var};

    /// The primitive-op softmax this op replaces (what the model computed before).
    fn reference(x: &Tensor, bias: &Tensor, scale: f64) -> Tensor {
        candle_nn::ops::softmax(
            &(x * scale).unwrap().broadcast_add(bias).unwrap(),
            D::Minus1,
        )
        .unwrap()
    }

    fn causal_bias(b: usize, n: usize) -> Tensor {
        let v: Vec<f32> = (0..b * n * n)
            .map(|i| {
                let (row, key) = ((i / n) % n, i % n);
                // The second batch row also hides its last key (right padding).
                if key > row || (i / (n * n) == 1 && key == n - 1 && row > 0) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(v, (b, 1, n, n), &Device::Cpu).unwrap()
    }

    #[test]
    fn forward_and_gradient_equal_the_primitive_op_softmax() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (2, 3, 5, 5), &dev).unwrap())).unwrap();
        let bias = causal_bias(2, 5);
        let weights = Tensor::randn(0f32, 1.0, (2, 3, 5, 5), &dev).unwrap();
        let scale = 0.35;
        let ours = biased_softmax(x.as_tensor(), &bias, scale).unwrap();
        let theirs = reference(x.as_tensor(), &bias, scale);
        assert!(max_abs_diff(&ours, &theirs) < 1e-6);
        let g_ours = (ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_theirs = (theirs * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (g_ours.get(&x).unwrap(), g_theirs.get(&x).unwrap());
        assert!(max_abs_diff(a, b) < 1e-6, "{}", max_abs_diff(a, b));
        // The op is differentiable with respect to the scores only.
        assert!(g_ours.get(&bias).is_none());
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 2.0, (1, 2, 4, 4), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let bias = causal_bias(1, 4);
        let weights = Tensor::randn(0f32, 1.0, (1, 2, 4, 4), &dev).unwrap();
        let loss = |x: &Tensor| -> f64 {
            let y = biased_softmax(x, &bias, 0.7).unwrap();
            f64::from(
                (y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            )
        };
        let var = Var::from_tensor(&x).unwrap();
        let y = biased_softmax(var.as_tensor(), &bias, 0.7).unwrap();
        let grads = (y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let analytic: Vec<f32> = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-2f32;
        for (i, want) in analytic.iter().enumerate() {
            let mut up = base.clone();
            up[i] += eps;
            let mut down = base.clone();
            down[i] -= eps;
            let at = |v: Vec<f32>| loss(&Tensor::from_vec(v, x.shape(), &dev).unwrap());
            let numeric = (at(up) - at(down)) / (2.0 * f64::from(eps));
            assert!(
                (numeric - f64::from(*want)).abs() < 2e-3,
                "element {i}: finite difference {numeric}, analytic {want}"
            );
        }
    }

    #[test]
    fn bf16_scores_give_the_f32_result_to_bf16_precision() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 2, 6, 6), &dev).unwrap();
        let bias = causal_bias(2, 6);
        let wide = biased_softmax(&x, &bias, 0.5).unwrap();
        let narrow = biased_softmax(&x.to_dtype(DType::BF16).unwrap(), &bias, 0.5).unwrap();
        assert_eq!(narrow.dtype(), DType::BF16);
        let narrow = narrow.to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&wide, &narrow) < 1e-2);
        // Hidden keys get exactly zero weight, and every row sums to one.
        let hidden = narrow.narrow(2, 0, 1).unwrap().narrow(3, 1, 5).unwrap();
        assert_eq!(
            hidden
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let sums: Vec<f32> = wide
            .sum(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
    }

    #[test]
    fn the_backend_op_path_used_on_cuda_equals_the_cpu_row_loop() {
        let dev = Device::Cpu;
        let bias = causal_bias(2, 7);
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::randn(0f32, 2.0, (2, 3, 7, 7), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let fused = biased_softmax(&x, &bias, 0.4).unwrap();
            let bias = bias.to_dtype(dtype).unwrap();
            let (xs, xl) = x.storage_and_layout();
            let (bs, bl) = bias.storage_and_layout();
            let (candle_core::Storage::Cpu(xs), candle_core::Storage::Cpu(bs)) = (&*xs, &*bs)
            else {
                unreachable!("cpu tensors")
            };
            let out = forward_with_backend_ops(xs, xl, bs, bl, 0.4).unwrap();
            let dense = Layout::contiguous(x.shape());
            let wide = out.to_dtype(&dense, DType::F32).unwrap();
            let generic =
                Tensor::from_slice(wide.as_slice::<f32>().unwrap(), x.shape(), &dev).unwrap();
            let d = max_abs_diff(
                &fused.to_dtype(DType::F32).unwrap(),
                &generic.to_dtype(DType::F32).unwrap(),
            );
            assert!(
                d < if dtype == DType::F32 { 1e-6 } else { 1e-2 },
                "{dtype:?}: {d}"
            );
        }
    }

    #[test]
    fn the_tensor_op_backward_used_on_cuda_equals_the_cpu_row_loop() {
        let dev = Device::Cpu;
        let y = biased_softmax(
            &Tensor::randn(0f32, 2.0, (2, 3, 6, 6), &dev).unwrap(),
            &causal_bias(2, 6),
            0.6,
        )
        .unwrap();
        let g = Tensor::randn(0f32, 1.0, (2, 3, 6, 6), &dev).unwrap();
        let fused = y.apply_op2_no_bwd(&g, &SoftmaxGrad { scale: 0.6 }).unwrap();
        let generic = backward_with_tensor_ops(&y, &g, 0.6).unwrap();
        assert!(max_abs_diff(&fused, &generic) < 1e-6);
    }
}
