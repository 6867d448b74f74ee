//! RMSNorm from primitive ops (candle's fused `rms_norm` has no backward pass).

use candle_core::{D, DType, Tensor};

use crate::Result;

/// `x / sqrt(mean(x²) + eps) · w`, computed in f32 and returned in `x`'s dtype.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    let y = x.broadcast_mul(&inv)?.to_dtype(dtype)?;
    Ok(y.broadcast_mul(w)?)
}
