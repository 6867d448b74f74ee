//! `x · Wᵀ` for a frozen weight `W`, with a backward pass that yields the input's gradient only.
//!
//! candle's `matmul` backward always computes both operands' gradients, so every frozen linear
//! layer (and a frozen `lm_head`) would get a full weight-sized gradient that nothing reads: about
//! a third more matmul FLOPs in the backward and one more copy of the weights in memory (12.3 GiB
//! for Llama-2-7B in bf16). This op computes the product with candle's own matmul (any device and
//! dtype), outside the graph, and hands it to a custom op whose backward is `dY · W`.
//!
//! When the input tracks no gradient (evaluation, or the first layers of a LoRA run whose adapters
//! sit further up) nothing is recorded at all.
//!
//! A quantized frozen weight (LoRA over an `int8` / `int4` base) goes through the same op, its
//! products taken with the weight dequantized for that one product ([`quantized_matmul`]).

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Tensor};

use super::handover::Handover;
use crate::Result;

/// `x · Wᵀ` for a rank-2 `x` (rows × in) and a frozen `weight` (out × in), differentiable in `x`
/// only. `weight` must not be a trainable tensor: its gradient is never computed.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    product_of(x, FrozenWeight::Dense(weight.detach()))
}

/// `x · Dᵀ` for a rank-2 `x` (rows × in) and a quantized frozen `weight` (out × in) whose
/// dequantized value is `D`, differentiable in `x` only. Forward and backward each multiply by
/// `D` dequantized for that one product (as bitsandbytes' 4-bit layers do in training), so the
/// op is exactly linear in `x` (no activation quantization, unlike candle's quantized matmul
/// kernels for inference) and only one projection exists in full precision at a time.
pub fn quantized_matmul(x: &Tensor, weight: &Arc<QTensor>) -> Result<Tensor> {
    product_of(x, FrozenWeight::Quantized(weight.clone()))
}

/// `x · Wᵀ`, recorded as an op of `x` when `x` tracks a gradient.
fn product_of(x: &Tensor, weight: FrozenWeight) -> Result<Tensor> {
    let value = weight.product(&x.detach())?;
    if !x.track_op() {
        return Ok(value);
    }
    record(x, value, weight)
}

/// `weight` dequantized onto `like`'s device, in its dtype.
fn dequantized(weight: &QTensor, like: &Tensor) -> candle_core::Result<Tensor> {
    let dense = weight.dequantize(like.device())?;
    if dense.dtype() == like.dtype() {
        Ok(dense)
    } else {
        dense.to_dtype(like.dtype())
    }
}

/// Records `value` = x · Wᵀ as an op of `x` whose backward is `dY · W`.
fn record(x: &Tensor, value: Tensor, weight: FrozenWeight) -> Result<Tensor> {
    let op = FrozenMatmul {
        weight,
        value: Handover::new(value)?,
    };
    Ok(x.apply_op1_arc(Arc::new(Box::new(op)))?)
}

/// A frozen weight (out × in), the only operand of its products that needs no gradient.
pub(crate) enum FrozenWeight {
    /// In the model's dtype (detached).
    Dense(Tensor),
    /// Quantized; dequantized for each product.
    Quantized(Arc<QTensor>),
}

impl FrozenWeight {
    /// `x · Wᵀ` for a rank-2 `x` (rows × in), outside any graph.
    pub(crate) fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => x.matmul(&w.t()?),
            FrozenWeight::Quantized(q) => {
                let dense = dequantized(q, x)?;
                x.matmul(&dense.t()?)
            }
        }
    }

    /// The input's gradient `dY · W` of a product, for the output's gradient `grad_y`.
    pub(crate) fn input_grad(&self, grad_y: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => grad_y.matmul(w),
            FrozenWeight::Quantized(q) => grad_y.matmul(&dequantized(q, grad_y)?),
        }
    }
}

/// The graph node: its forward hands over the product computed outside the graph (once), its
/// backward multiplies the output's gradient by the frozen weight.
struct FrozenMatmul {
    weight: FrozenWeight,
    /// The product, taken by the forward so the graph does not hold a second copy of it.
    value: Handover,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        _x: &CudaStorage,
        _layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.value.cuda(self.name())
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.weight.input_grad(grad_y).map(Some)
    }
}
