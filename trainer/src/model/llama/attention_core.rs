//! The attention core `softmax(scale · Q·Kᵀ + bias) · V`, heads merged back, as one node of the
//! backward graph.
//!
//! Recorded op by op, the core keeps the scores and the softmax's output (two heads × s × s
//! tensors per layer) and its backward fills and adds a zeroed buffer of that size for each of
//! the score-sized edges (the two re-shapes, the softmax, the value product): on the CPU bench
//! shape about a twentieth of a step. Here the forward runs on detached operands and one node
//! holds only the softmax's output; its backward is written out: `dV = Pᵀ·dY`, `dP = dY·Vᵀ`, the
//! softmax's closed form for the scores, then `dQ = dS·K` and `dK = dSᵀ·Q`. Grouped-query heads
//! share their K/V through batched matmuls, as in the forward.

use std::sync::Arc;

use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Shape, Tensor};

use crate::Result;
use crate::model::handover::Handover;
use crate::model::softmax::{biased_softmax, softmax_backward};

/// The attention output (b, n, heads · head_dim) of rotated queries `q` (b, heads, n,
/// head_dim) over keys `k` and values `v` (b, kv_heads, keys, head_dim), with the additive
/// `bias` (b or 1, 1, n, keys) and the scores scaled by `scale`. Differentiable in `q`, `k` and
/// `v` (one graph node when any of them tracks a gradient).
pub(super) fn attention_core(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let shape = CoreShape::of(q, k, scale)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(shape.forward(q, k, v, bias)?.1);
    }
    let (probabilities, value) = shape.forward(&q.detach(), &k.detach(), &v.detach(), bias)?;
    let node = AttentionNode {
        shape,
        probabilities,
        value: Handover::new(value)?,
    };
    Ok(q.apply_op3_arc(k, v, Arc::new(Box::new(node)))?)
}

/// The sizes of one attention core.
#[derive(Debug, Clone, Copy)]
struct CoreShape {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
    scale: f64,
}

impl CoreShape {
    fn of(q: &Tensor, k: &Tensor, scale: f64) -> candle_core::Result<Self> {
        let (batch, heads, queries, head_dim) = q.dims4()?;
        let (kb, kv_heads, keys, kd) = k.dims4()?;
        if kb != batch || kd != head_dim || kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!(
                "attention: queries {:?} and keys {:?} do not match",
                q.shape(),
                k.shape()
            )
        }
        Ok(Self {
            batch,
            heads,
            kv_heads,
            queries,
            keys,
            head_dim,
            scale,
        })
    }

    /// Query heads kv·rep … kv·rep + rep − 1 share key/value head kv: a per-head tensor of
    /// `width` columns with those heads' rows folded together.
    fn grouped(&self, t: &Tensor, width: usize) -> candle_core::Result<Tensor> {
        let rep = self.heads / self.kv_heads;
        t.reshape((self.batch, self.kv_heads, rep * self.queries, width))
    }

    /// A grouped tensor back to one per query head.
    fn per_head(&self, t: &Tensor, width: usize) -> candle_core::Result<Tensor> {
        t.reshape((self.batch, self.heads, self.queries, width))
    }

    /// The softmax's output (b, heads, n, keys) and the merged attention output.
    fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        // Scores in the model's dtype (the GEMM accumulates in f32); the softmax widens each row
        // internally and keeps only its output.
        let scores = self.grouped(q, self.head_dim)?.matmul(&k.t()?)?;
        let probabilities = biased_softmax(&self.per_head(&scores, self.keys)?, bias, self.scale)?;
        drop(scores);
        let y = self.grouped(&probabilities, self.keys)?.matmul(v)?;
        let y = self
            .per_head(&y, self.head_dim)?
            .transpose(1, 2)?
            .reshape((self.batch, self.queries, self.heads * self.head_dim))?;
        Ok((probabilities, y))
    }
}

/// The graph node: hands over the forward's output; keeps the softmax's output for the
/// backward.
struct AttentionNode {
    shape: CoreShape,
    probabilities: Tensor,
    value: Handover,
}

impl CustomOp3 for AttentionNode {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.value.cuda(self.name())
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.shape;
        let (q_tracked, k_tracked, v_tracked) = (q.track_op(), k.track_op(), v.track_op());
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        // dY per head, grouped as the forward's value product.
        let dy = grad
            .reshape((s.batch, s.queries, s.heads, s.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let dy = s.grouped(&dy, s.head_dim)?;
        let dv = if v_tracked {
            Some(s.grouped(&self.probabilities, s.keys)?.t()?.matmul(&dy)?)
        } else {
            None
        };
        if !(q_tracked || k_tracked) {
            return Ok((None, None, dv));
        }
        let dp = s.per_head(&dy.matmul(&v.t()?)?, s.keys)?;
        let ds = s.grouped(
            &softmax_backward(&self.probabilities, &dp, s.scale)?,
            s.keys,
        )?;
        let dq = if q_tracked {
            Some(s.per_head(&ds.matmul(&k)?, s.head_dim)?)
        } else {
            None
        };
        let dk = if k_tracked {
            Some(ds.t()?.matmul(&s.grouped(&q, s.head_dim)?)?)
        } else {
            None
        };
        Ok((dq, dk, dv))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::test_util::max_abs_diff;

    /// Causal bias of `n` positions for two rows, the second right-padded by one.
    fn bias(n: usize) -> Tensor {
        let v: Vec<f32> = (0..2 * n * n)
            .map(|i| {
                let (row, query, key) = (i / (n * n), (i / n) % n, i % n);
                if key > query || (row == 1 && key == n - 1 && query > 0) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(v, (2, 1, n, n), &Device::Cpu).unwrap()
    }

    fn var(shape: (usize, usize, usize, usize), seed: f32) -> Var {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.731 + seed).sin()).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn value_and_gradients_equal_the_recorded_primitive_ops_with_grouped_heads() {
        let (b, heads, kv_heads, n, hd) = (2, 6, 2, 5, 4);
        let (q, k, v) = (
            var((b, heads, n, hd), 0.1),
            var((b, kv_heads, n, hd), 0.2),
            var((b, kv_heads, n, hd), 0.3),
        );
        let bias = bias(n);
        let scale = 0.5;
        let weights = var((1, b, n, heads * hd), 0.4)
            .as_tensor()
            .reshape((b, n, heads * hd))
            .unwrap();
        let ours =
            attention_core(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, scale).unwrap();
        let shape = CoreShape::of(q.as_tensor(), k.as_tensor(), scale).unwrap();
        let (_, reference) = shape
            .forward(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias)
            .unwrap();
        assert!(max_abs_diff(&ours, &reference) < 1e-6);
        let grads = |y: Tensor| {
            (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (ours, reference) = (grads(ours), grads(reference));
        for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, r) = (ours.get(t).unwrap(), reference.get(t).unwrap());
            let d = max_abs_diff(a, r);
            let size = r
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(size > 1e-3, "{name}: a gradient to compare");
            assert!(d <= 1e-5 * size.max(1.0), "{name}: {d}");
        }
    }

    #[test]
    fn only_the_operands_that_track_a_gradient_get_one() {
        let (q, k, v) = (
            var((2, 2, 3, 4), 0.1),
            var((2, 2, 3, 4), 0.2),
            var((2, 2, 3, 4), 0.3),
        );
        let bias = bias(3);
        let frozen_k = k.as_tensor().detach();
        let y = attention_core(q.as_tensor(), &frozen_k, v.as_tensor(), &bias, 0.5).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(q.as_tensor()).is_some());
        assert!(grads.get(v.as_tensor()).is_some());
        assert!(grads.get(&frozen_k).is_none());
        // Nothing tracks: no node, the same value.
        let plain = attention_core(
            &q.as_tensor().detach(),
            &frozen_k,
            &v.as_tensor().detach(),
            &bias,
            0.5,
        )
        .unwrap();
        assert!(!plain.track_op());
        assert!(max_abs_diff(&plain, &y.detach()) < 1e-7);
        assert_eq!(plain.dtype(), DType::F32);
    }
}
