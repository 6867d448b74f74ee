//! Inverted dropout of a LoRA adapter's input.
//!
//! On the CPU in f32 one op: element `i` is dropped when the `i`-th value of the dropout stream
//! is below `p` (the values a sequential draw would give, so the masks are those of drawing them
//! one by one), the stream is advanced past them, and the backward draws the same mask again
//! from the stream's state instead of keeping it. SplitMix64 is a function of a counter
//! ([`Rng::f32_at`]), so both passes draw in parallel. On a GPU the mask is drawn on the device by
//! curand, seeded from the stream for each mask, so no mask crosses the bus. Either way a
//! recomputation (activation checkpointing, resume) that restores the stream draws the same mask.
//! (The GPU path has not run on a GPU yet: scripts/gpu-check.sh.)

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;
use crate::loss::fused_ce::{cpu_f32_values, storage_f32_values};
use crate::rng::Rng;

/// Elements per parallel task.
const ELEMENTS_PER_TASK: usize = 16 * 1024;

/// `x` with each element zeroed with probability `p` and the others scaled by `1 / (1 − p)`,
/// the mask drawn from `rng` (which advances by one value per element on the CPU, by one per
/// mask on a GPU).
pub fn dropout(x: &Tensor, p: f32, rng: &mut Rng) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let op = CpuDropout {
            stream: *rng,
            p,
            keep,
        };
        rng.skip(x.elem_count() as u64);
        return Ok(x.contiguous()?.apply_op1(op)?);
    }
    if x.device().is_cpu() {
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.next_f32() < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        return Ok(x.mul(&mask)?);
    }
    x.device().set_seed(rng.next_u64())?;
    let uniform = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
    let kept = uniform.ge(f64::from(p))?.to_dtype(x.dtype())?;
    Ok(x.mul(&kept.affine(f64::from(keep), 0.0)?)?)
}

/// The CPU op: the mask is the stream's values from `stream` on.
struct CpuDropout {
    stream: Rng,
    p: f32,
    keep: f32,
}

impl CpuDropout {
    /// `values` times the mask, element `i` of `values` being element `i` of the tensor.
    fn masked(&self, values: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; values.len()];
        out.par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(values.par_chunks(ELEMENTS_PER_TASK))
            .enumerate()
            .for_each(|(task, (out, values))| {
                let first = (task * ELEMENTS_PER_TASK) as u64;
                for (i, (o, v)) in out.iter_mut().zip(values).enumerate() {
                    if self.stream.f32_at(first + i as u64) >= self.p {
                        *o = v * self.keep;
                    }
                }
            });
        out
    }
}

impl CustomOp1 for CpuDropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let values = cpu_f32_values("dropout", storage, layout)?;
        Ok((CpuStorage::F32(self.masked(values)), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (storage, layout) = grad.storage_and_layout();
        let masked = self.masked(storage_f32_values("dropout", &storage, layout)?);
        Ok(Some(Tensor::from_vec(masked, grad.shape(), grad.device())?))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The mask drawn one value at a time, as before the op.
    fn sequential_mask(n: usize, p: f32, rng: &mut Rng) -> Vec<f32> {
        let keep = 1.0 / (1.0 - p);
        (0..n)
            .map(|_| if rng.next_f32() < p { 0.0 } else { keep })
            .collect()
    }

    #[test]
    fn the_op_applies_the_sequential_mask_forward_and_backward() {
        let dev = Device::Cpu;
        let n = 3 * ELEMENTS_PER_TASK + 77;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n / 7, 7), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (n / 7, 7), &dev).unwrap();
        let (mut ours, mut theirs) = (Rng::new(4), Rng::new(4));
        let y = dropout(x.as_tensor(), 0.3, &mut ours).unwrap();
        let mask = Tensor::from_vec(
            sequential_mask(n / 7 * 7, 0.3, &mut theirs),
            (n / 7, 7),
            &dev,
        )
        .unwrap();
        assert_eq!(ours, theirs, "the stream advances by one value per element");
        let want = (x.as_tensor() * &mask).unwrap();
        assert_eq!(crate::test_util::max_abs_diff(&y, &want), 0.0);
        let dx = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = dx.get(x.as_tensor()).unwrap();
        assert_eq!(
            crate::test_util::max_abs_diff(dx, &(&g * &mask).unwrap()),
            0.0
        );
        let dropped = mask
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .filter(|m| **m == 0.0)
            .count() as f64
            / (n / 7 * 7) as f64;
        assert!((dropped - 0.3).abs() < 0.01, "dropped {dropped}");
    }
}
