//! What every layer of a forward shares per position: the RoPE tables, the causal bias and the
//! padding bias of a batch.

use candle_core::{DType, Device, Tensor};

use crate::Result;
use crate::model::rope::Rope;

/// Per-position tensors shared by every forward up to `len` tokens (built once for the longest
/// length seen and narrowed for shorter ones).
#[derive(Debug)]
pub(super) struct PositionTables {
    /// Positions the tables cover.
    pub(super) len: usize,
    /// RoPE cosines (len, head_dim), in the model's dtype.
    pub(super) cos: Tensor,
    /// RoPE sines (len, head_dim), in the model's dtype.
    pub(super) sin: Tensor,
    /// The causal bias (1, 1, len, len) in f32: `-inf` above the diagonal.
    pub(super) causal: Tensor,
}

impl PositionTables {
    /// The tables of `len` positions of `rope`, on `device`.
    pub(super) fn build(rope: &Rope, len: usize, dtype: DType, device: &Device) -> Result<Self> {
        let hd = rope.head_dim;
        let (cos, sin) = rope.tables(len);
        let causal: Vec<f32> = (0..len * len)
            .map(|k| {
                if k % len > k / len {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Self {
            len,
            cos: Tensor::from_vec(cos, (len, hd), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (len, hd), device)?.to_dtype(dtype)?,
            causal: Tensor::from_vec(causal, (1, 1, len, len), device)?,
        })
    }
}

/// The additive bias of right-padded keys, (b, 1, 1, s): `-inf` where a row's mask is 0 (the
/// first position is never masked, so a row always attends to something); `None` without padding.
pub(super) fn padding_bias(
    mask: Option<&[Vec<u8>]>,
    b: usize,
    s: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    let Some(mask) = mask else { return Ok(None) };
    let mut v = vec![0f32; b * s];
    let mut any = false;
    for (bi, row) in v.chunks_mut(s).enumerate() {
        for (j, x) in row.iter_mut().enumerate() {
            let real = mask
                .get(bi)
                .is_none_or(|m| m.get(j).copied().unwrap_or(0) != 0);
            if !real && j != 0 {
                *x = f32::NEG_INFINITY;
                any = true;
            }
        }
    }
    Ok(if any {
        Some(Tensor::from_vec(v, (b, 1, 1, s), device)?)
    } else {
        None
    })
}
