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
use crate::kernels::{cpu_f32_values, storage_f32_values};
use crate::rng::Rng;

/// Elements per parallel task.
const ELEMENTS_PER_TASK: usize = 16 * 1024;

/// Rows `first..first + rows` of a batch of `of` rows: the part of a micro-batch one CPU worker
/// computes (`crate::workers`). Its dropout masks are the whole batch's masks at those
/// rows, so the workers together draw exactly what one forward of the batch draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowShard {
    /// The shard's first row in the batch.
    pub first: usize,
    /// Rows in the shard.
    pub rows: usize,
    /// Rows in the whole batch.
    pub of: usize,
}

/// `x` with each element zeroed with probability `p` and the others scaled by `1 / (1 − p)`,
/// the mask drawn from `rng` (which advances by one value per element on the CPU, by one per
/// mask on a GPU). With `shard`, `x`'s leading rows are those rows of a batch: on the CPU the
/// mask is the batch's at those elements and `rng` advances past the whole batch's mask.
pub fn dropout(x: &Tensor, p: f32, rng: &mut Rng, shard: Option<RowShard>) -> Result<Tensor> {
    if let Some(op) = CpuDropout::draw(x, p, rng, shard) {
        return Ok(x.contiguous()?.apply_op1(op)?);
    }
    let keep = 1.0 / (1.0 - p);
    let (mut stream, batch_elements) = stream_and_span(x, rng, shard);
    if x.device().is_cpu() {
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if stream.next_f32() < p { 0.0 } else { keep })
            .collect();
        rng.skip(batch_elements);
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        return Ok(x.mul(&mask)?);
    }
    x.device().set_seed(rng.next_u64())?;
    let uniform = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
    let kept = uniform.ge(f64::from(p))?.to_dtype(x.dtype())?;
    Ok(x.mul(&kept.affine(f64::from(keep), 0.0)?)?)
}

/// Where `x`'s mask starts in `rng`'s stream, and how far the stream advances past the batch's
/// mask (by one value per element on the CPU; with `shard`, `x` is those rows of a batch).
fn stream_and_span(x: &Tensor, rng: &Rng, shard: Option<RowShard>) -> (Rng, u64) {
    match shard {
        Some(shard) if x.device().is_cpu() => {
            let per_row = (x.elem_count() / shard.rows.max(1)) as u64;
            let mut at_first_row = *rng;
            at_first_row.skip(shard.first as u64 * per_row);
            (at_first_row, shard.of as u64 * per_row)
        }
        _ => (*rng, x.elem_count() as u64),
    }
}

/// The mask of a dropout on the CPU in f32: its values are the stream's from `stream` on, so
/// the backward draws it again instead of keeping it. Also the op.
pub(crate) struct CpuDropout {
    stream: Rng,
    p: f32,
    keep: f32,
}

impl CpuDropout {
    /// The mask [`dropout`] draws for `x` when `x` is an f32 CPU tensor (`rng` advanced as
    /// [`dropout`] advances it); `None`, with `rng` untouched, for any other tensor.
    pub(crate) fn draw(x: &Tensor, p: f32, rng: &mut Rng, shard: Option<RowShard>) -> Option<Self> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            return None;
        }
        let (stream, batch_elements) = stream_and_span(x, rng, shard);
        rng.skip(batch_elements);
        Some(Self {
            stream,
            p,
            keep: 1.0 / (1.0 - p),
        })
    }

    /// `t` (an f32 CPU tensor shaped as the masked one) times the mask, outside any graph: the
    /// masked input in a forward, the masked gradient in a backward.
    pub(crate) fn apply(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let t = t.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let masked = self.masked(storage_f32_values("dropout", &storage, layout)?);
        Tensor::from_vec(masked, t.shape(), t.device())
    }

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
        self.apply(grad).map(Some)
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
        let y = dropout(x.as_tensor(), 0.3, &mut ours, None).unwrap();
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

    #[test]
    fn shards_draw_the_whole_batchs_mask_at_their_rows() {
        let dev = Device::Cpu;
        // 5 rows of 3 positions × 7 features, in f32 (the op) and in f64 (the host mask).
        let x = Tensor::randn(0f32, 1.0, (5, 3, 7), &dev).unwrap();
        for x in [x.clone(), x.to_dtype(DType::F64).unwrap()] {
            let mut whole_stream = Rng::new(8);
            let whole = dropout(&x, 0.4, &mut whole_stream, None).unwrap();
            let mut parts = Vec::new();
            for (first, rows) in [(0, 2), (2, 1), (3, 2)] {
                let mut stream = Rng::new(8);
                let shard = RowShard { first, rows, of: 5 };
                let part = x.narrow(0, first, rows).unwrap();
                parts.push(dropout(&part, 0.4, &mut stream, Some(shard)).unwrap());
                assert_eq!(
                    stream, whole_stream,
                    "each shard advances past the batch's mask"
                );
            }
            let joined = Tensor::cat(&parts, 0)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let whole = whole.to_dtype(DType::F32).unwrap();
            assert_eq!(crate::test_util::max_abs_diff(&joined, &whole), 0.0);
        }
    }
}
