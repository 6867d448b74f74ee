//! A LoRA projection on the CPU in f32 as one node of the backward graph:
//! `y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ` for a frozen `W`.
//!
//! Recorded op by op, the projection is seven nodes (the frozen product, the dropout, two
//! matmuls and their transposes, the scale, the sum), and the backward fills and adds a zeroed
//! buffer for every edge, four of them the size of the input or the output. Here the forward runs
//! outside the graph and one node keeps the masked input and the rank-r product; its backward is
//! written out: with `dh = s·dY·B`, `dB = s·dYᵀ·h`, `dA = dhᵀ·drop(x)` and
//! `dx = dY·W + drop(dh·A)` (the dropout mask drawn again from its stream).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::dropout::CpuDropout;
use super::frozen::FrozenWeight;
use super::handover::Handover;
use crate::Result;

/// `x·Wᵀ + scale·(drop(x)·Aᵀ)·Bᵀ` for f32 CPU tensors `x` (rows × in), `a` (r × in) and `b`
/// (out × r), the frozen `weight`, and `mask` the input's dropout mask (none without dropout).
/// One graph node, differentiable in `x`, `a` and `b`.
pub(crate) fn lora_projection(
    x: &Tensor,
    weight: FrozenWeight,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<CpuDropout>,
) -> Result<Tensor> {
    let xd = x.detach();
    let base = weight.product(&xd)?;
    let masked = match &mask {
        Some(mask) => mask.apply(&xd)?,
        None => xd,
    };
    let low_rank = masked.matmul(&a.detach().t()?)?;
    let value = (low_rank.matmul(&b.detach().t()?)?.affine(scale, 0.0)? + base)?;
    let node = LoraNode {
        weight,
        masked,
        low_rank,
        mask,
        scale,
        value: Handover::new(value)?,
    };
    Ok(x.apply_op3_arc(a, b, Arc::new(Box::new(node)))?)
}

/// The graph node: hands over the forward's output; keeps the masked input and the rank-r
/// product for the adapters' gradients, and the mask's stream for the input's.
struct LoraNode {
    weight: FrozenWeight,
    masked: Tensor,
    low_rank: Tensor,
    mask: Option<CpuDropout>,
    scale: f64,
    value: Handover,
}

impl CustomOp3 for LoraNode {
    fn name(&self) -> &'static str {
        "lora-projection"
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

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let db = if b.track_op() {
            Some(grad.t()?.matmul(&self.low_rank)?.affine(self.scale, 0.0)?)
        } else {
            None
        };
        let dh = grad.matmul(&b.detach())?.affine(self.scale, 0.0)?;
        let da = if a.track_op() {
            Some(dh.t()?.matmul(&self.masked)?)
        } else {
            None
        };
        let dx = if x.track_op() {
            let through_adapter = dh.matmul(&a.detach())?;
            let through_adapter = match &self.mask {
                Some(mask) => mask.apply(&through_adapter)?,
                None => through_adapter,
            };
            Some((self.weight.input_grad(&grad)? + through_adapter)?)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use candle_core::{Device, Var};

    use super::*;
    use crate::model::dropout::dropout;
    use crate::model::frozen::frozen_matmul;
    use crate::rng::Rng;
    use crate::test_util::max_abs_diff;

    fn values(shape: (usize, usize), seed: f32) -> Tensor {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.613 + seed).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The projection as the ops it replaces, recorded one by one.
    fn composed(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, p: f32, rng: &mut Rng) -> Tensor {
        let masked = if p > 0.0 {
            dropout(x, p, rng, None).unwrap()
        } else {
            x.clone()
        };
        let delta = masked
            .matmul(&a.t().unwrap())
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap();
        (frozen_matmul(x, w).unwrap() + (delta * 0.5).unwrap()).unwrap()
    }

    #[test]
    fn value_and_every_gradient_equal_the_recorded_ops_with_and_without_dropout() {
        let (rows, input, output, rank) = (7, 6, 5, 3);
        let w = values((output, input), 0.9);
        let probe = values((rows, output), 1.7);
        for (p, x_tracks) in [(0.0, true), (0.3, true), (0.3, false)] {
            let x = Var::from_tensor(&values((rows, input), 0.1)).unwrap();
            let x_in = if x_tracks {
                x.as_tensor().clone()
            } else {
                x.as_tensor().detach()
            };
            let a = Var::from_tensor(&values((rank, input), 0.2)).unwrap();
            let b = Var::from_tensor(&values((output, rank), 0.3)).unwrap();
            let (mut ours_rng, mut their_rng) = (Rng::new(5), Rng::new(5));
            let mask = (p > 0.0)
                .then(|| CpuDropout::draw(&x_in, p, &mut ours_rng, None))
                .flatten();
            let frozen = FrozenWeight::Dense(w.clone());
            let ours =
                lora_projection(&x_in, frozen, a.as_tensor(), b.as_tensor(), 0.5, mask).unwrap();
            let theirs = composed(&x_in, &w, a.as_tensor(), b.as_tensor(), p, &mut their_rng);
            assert_eq!(ours_rng, their_rng, "p {p}: the same draws");
            assert!(max_abs_diff(&ours, &theirs) < 1e-6, "p {p}");
            let grads = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (ours, theirs) = (grads(ours), grads(theirs));
            for (name, t) in [("x", &x), ("a", &a), ("b", &b)] {
                let (o, r) = (ours.get(t.as_tensor()), theirs.get(t.as_tensor()));
                if name == "x" && !x_tracks {
                    assert!(o.is_none() && r.is_none(), "p {p}: no input gradient");
                    continue;
                }
                let (o, r) = (o.unwrap(), r.unwrap());
                let size = r
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(size > 1e-3, "p {p}, {name}: a gradient to compare");
                assert!(
                    max_abs_diff(o, r) < 1e-6,
                    "p {p}, {name}: {}",
                    max_abs_diff(o, r)
                );
            }
        }
    }
}
