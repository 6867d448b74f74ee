//! Query and key heads with rotary position embeddings (HF `rotate_half` form): the projection's
//! (b, n, heads · head_dim) output split into (b, heads, n, head_dim) heads and rotated, on the
//! CPU in f32 as one custom op, elsewhere from primitive ops.
//!
//! From primitives this is a transposing copy and seven recorded ops per tensor (two narrows, a
//! negation, a concatenation, two broadcast products and a sum), each a full-size tensor in the
//! forward and a zero-filled gradient accumulated in the backward, for the queries and the keys
//! of every layer. The op writes the rotated heads in one pass and keeps nothing but its input
//! (the projection's output, which its own backward holds anyway); its backward is the
//! transposed rotation, again one pass: with `c`, `s` the position's tables and `h` = head_dim / 2,
//! `dx_i = g_i c_i + g_{i+h} s_{i+h}` for `i < h` and `dx_i = g_i c_i − g_{i−h} s_{i−h}` above.

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;
use crate::kernels::{cpu_f32_values, storage_f32_values};

/// `x` (b, n, heads · head_dim) as rotated heads (b, heads, n, head_dim), contiguous. `cos` and
/// `sin` are the (n, head_dim) tables of the positions of `x`'s rows.
pub(super) fn rotated_heads(
    x: &Tensor,
    heads: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let f32_on_cpu = x.device().is_cpu() && x.dtype() == DType::F32;
    if f32_on_cpu && cos.dtype() == DType::F32 && sin.dtype() == DType::F32 {
        let (_, n, width) = x.dims3()?;
        let op = RotatedHeads {
            heads,
            head_dim: width / heads.max(1),
            cos: cos.flatten_all()?.to_vec1()?,
            sin: sin.flatten_all()?.to_vec1()?,
            positions: n,
        };
        return Ok(x.contiguous()?.apply_op1(op)?);
    }
    reference_rotated_heads(x, heads, cos, sin)
}

/// The primitive-op formulation (any device and dtype), also the op's reference in tests.
pub(super) fn reference_rotated_heads(
    x: &Tensor,
    heads: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (b, n, width) = x.dims3()?;
    let x = x
        .reshape((b, n, heads, width / heads.max(1)))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok((x.broadcast_mul(cos)? + rotate_half(&x)?.broadcast_mul(sin)?)?)
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// The CPU op and the tables it rotates with.
struct RotatedHeads {
    heads: usize,
    head_dim: usize,
    /// (positions, head_dim) cosines, row-major.
    cos: Vec<f32>,
    /// (positions, head_dim) sines, row-major.
    sin: Vec<f32>,
    positions: usize,
}

impl RotatedHeads {
    /// Checks `x` is (b, positions, heads · head_dim) with an even head_dim and tables to match;
    /// returns b.
    fn batch(&self, dims: &[usize]) -> candle_core::Result<usize> {
        let (hd, n) = (self.head_dim, self.positions);
        let table = n * hd;
        match dims {
            [b, rows, width]
                if *rows == n
                    && *width == self.heads * hd
                    && hd % 2 == 0
                    && self.cos.len() == table
                    && self.sin.len() == table =>
            {
                Ok(*b)
            }
            _ => candle_core::bail!(
                "rotated-heads: input {dims:?} for {} heads of {hd} over {n} positions \
                 (tables of {} values)",
                self.heads,
                self.cos.len()
            ),
        }
    }
}

impl CustomOp1 for RotatedHeads {
    fn name(&self) -> &'static str {
        "rotated-heads"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let b = self.batch(layout.dims())?;
        let x = cpu_f32_values(self.name(), storage, layout)?;
        let (heads, hd, n) = (self.heads, self.head_dim, self.positions);
        let half = hd / 2;
        let mut out = vec![0f32; x.len()];
        // One task per (batch, head): its n rows of head_dim, contiguous in the output.
        out.par_chunks_mut(n * hd.max(1))
            .enumerate()
            .for_each(|(task, dst)| {
                let (batch, head) = (task / heads, task % heads);
                for (t, dst) in dst.chunks_mut(hd).enumerate() {
                    let start = ((batch * n + t) * heads + head) * hd;
                    let src = &x[start..start + hd];
                    let (c, s) = (&self.cos[t * hd..][..hd], &self.sin[t * hd..][..hd]);
                    for j in 0..half {
                        dst[j] = src[j] * c[j] - src[j + half] * s[j];
                        dst[j + half] = src[j + half] * c[j + half] + src[j] * s[j + half];
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, heads, n, hd))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _heads: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (storage, layout) = grad.storage_and_layout();
        let g = storage_f32_values(self.name(), &storage, layout)?;
        let (heads, hd, n) = (self.heads, self.head_dim, self.positions);
        let half = hd / 2;
        if g.len() != x.elem_count() {
            candle_core::bail!(
                "rotated-heads: gradient of {} for {}",
                g.len(),
                x.elem_count()
            )
        }
        let mut dx = vec![0f32; g.len()];
        // One task per (batch, position): its heads · head_dim input values.
        dx.par_chunks_mut(heads * hd.max(1))
            .enumerate()
            .for_each(|(task, dst)| {
                let (batch, t) = (task / n.max(1), task % n.max(1));
                let (c, s) = (&self.cos[t * hd..][..hd], &self.sin[t * hd..][..hd]);
                for (head, dst) in dst.chunks_mut(hd).enumerate() {
                    let start = ((batch * heads + head) * n + t) * hd;
                    let g = &g[start..start + hd];
                    for j in 0..half {
                        dst[j] = g[j] * c[j] + g[j + half] * s[j + half];
                        dst[j + half] = g[j + half] * c[j + half] - g[j] * s[j];
                    }
                }
            });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_equals_primitive_value_and_gradient() {
        let dev = Device::Cpu;
        let (b, n, heads, hd) = (2, 7, 3, 8);
        let x = Tensor::randn(0f32, 1.0, (b, n, heads * hd), &dev).unwrap();
        let x = Var::from_tensor(&x).unwrap();
        let angles = Tensor::randn(0f32, 2.0, (n, hd), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let fused = rotated_heads(x.as_tensor(), heads, &cos, &sin).unwrap();
        let reference = reference_rotated_heads(x.as_tensor(), heads, &cos, &sin).unwrap();
        assert_eq!(fused.dims(), &[b, heads, n, hd]);
        let d = crate::test_util::max_abs_diff(&fused, &reference);
        assert!(d < 1e-6, "value: {d}");
        let g = Tensor::randn(0f32, 1.0, (b, heads, n, hd), &dev).unwrap();
        let backward = |y: &Tensor| (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (ours, theirs) = (backward(&fused), backward(&reference));
        let d = crate::test_util::max_abs_diff(
            ours.get(x.as_tensor()).unwrap(),
            theirs.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-6, "gradient: {d}");
    }

    #[test]
    fn mismatched_tables_are_refused_by_name() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 4, 6), DType::F32, &dev).unwrap();
        let table = Tensor::zeros((3, 3), DType::F32, &dev).unwrap();
        let err = rotated_heads(&x, 2, &table, &table)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rotated-heads"), "{err}");
    }
}
