//! AdamW's update of an f32 CPU parameter in one pass over its memory, in place: the weights in
//! the parameter's own storage, the moments in host vectors the optimizer owns. The tensor
//! formulation allocates a dozen full-size temporaries per parameter; copying the weights, the
//! gradient and the moments out and back in (the previous fused form) still moved five copies
//! of every trained value through freshly faulted pages each step (measured: about 7 % of a
//! full fine-tuning step on the throughput bench).

use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

use crate::kernels::{cpu_f32_values, cpu_f32_values_mut};

/// Elements of a parameter one parallel task of the update takes.
pub(crate) const ELEMENTS_PER_TASK: usize = 64 * 1024;

/// One step's AdamW coefficients, the same for every parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coefficients {
    /// First- and second-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Bias corrections `1 − β₁ᵗ` and `1 − β₂ᵗ`.
    pub bias_correction1: f32,
    /// See `bias_correction1`.
    pub bias_correction2: f32,
    /// `1 − lr · weight_decay`.
    pub decay: f32,
    /// Learning rate.
    pub lr: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Each gradient value is multiplied by this first.
    pub grad_scale: f32,
}

/// Updates the contiguous f32 CPU tensor `weights` in place from its gradient `grad` (same
/// element count, scaled by `coefficients.grad_scale`) and its moments `m`, `v` (updated too):
/// the formula of [`super::AdamW::step`], element by element, so the values equal the tensor
/// formulation's.
pub(crate) fn update_in_place(
    weights: &Tensor,
    grad: &Tensor,
    m: &mut [f32],
    v: &mut [f32],
    coefficients: Coefficients,
) -> candle_core::Result<()> {
    let grad = grad.contiguous()?;
    let n = weights.elem_count();
    if grad.elem_count() != n || m.len() != n || v.len() != n {
        candle_core::bail!(
            "adamw: a parameter of {n} values got a gradient of {} and moments of {} and {}",
            grad.elem_count(),
            m.len(),
            v.len()
        )
    }
    let op = Update {
        moments: RefCell::new((m, v)),
        coefficients,
    };
    weights.inplace_op2(&grad, &op)
}

/// The in-place op: the moments it updates along with the weights, and the coefficients.
struct Update<'a> {
    moments: RefCell<(&'a mut [f32], &'a mut [f32])>,
    coefficients: Coefficients,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-cpu"
    }

    fn cpu_fwd(
        &self,
        weights: &mut CpuStorage,
        weights_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        let grad = cpu_f32_values(self.name(), grad, grad_layout)?;
        let weights = cpu_f32_values_mut(self.name(), weights, weights_layout)?;
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        let c = self.coefficients;
        let (c1, c2) = (1.0 - c.beta1, 1.0 - c.beta2);
        // Element-wise, so chunks in parallel give the sequential loop's values exactly.
        weights
            .par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(m.par_chunks_mut(ELEMENTS_PER_TASK))
            .zip(v.par_chunks_mut(ELEMENTS_PER_TASK))
            .zip(grad.par_chunks(ELEMENTS_PER_TASK))
            .for_each(|(((w, m), v), g)| {
                for i in 0..w.len() {
                    let gi = g[i] * c.grad_scale;
                    let mi = m[i] * c.beta1 + gi * c1;
                    let vi = v[i] * c.beta2 + gi * gi * c2;
                    m[i] = mi;
                    v[i] = vi;
                    let update =
                        (mi / c.bias_correction1) / ((vi / c.bias_correction2).sqrt() + c.eps);
                    w[i] = w[i] * c.decay - update * c.lr;
                }
            });
        Ok(())
    }
}
