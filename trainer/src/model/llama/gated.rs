//! The MLP's SiLU-gated product `silu(gate) ⊙ up` with a backward pass: on the CPU in f32 one
//! custom op, elsewhere (and for the other activations) primitive ops.
//!
//! From primitives the product is two recorded ops whose backward makes about a dozen full-size
//! passes over batch × sequence × intermediate elements (SiLU's own: negate, exponentiate, add,
//! reciprocal, subtract, multiply, add; the product's two multiplications; a zero-filled gradient
//! accumulated for each input), and the forward keeps SiLU's output alive. The op keeps only its
//! two inputs, which the projections' backward holds anyway, and its output; its backward is one
//! vectorised pass writing both gradients ([`kernels::silu_product_grad`]).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;
use crate::kernels;
use crate::kernels::{cpu_f32_values, storage_f32_values};

/// Elements per parallel task of the op.
const TASK_ELEMENTS: usize = 16 * 1024;

/// `silu(gate) ⊙ up` for two tensors of one shape.
pub(super) fn silu_product(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let f32_on_cpu = gate.device().is_cpu() && gate.dtype() == DType::F32;
    if f32_on_cpu && up.dtype() == DType::F32 && gate.shape() == up.shape() {
        return Ok(gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, SiluProduct)?);
    }
    reference_silu_product(gate, up)
}

/// The primitive-op formulation (any device and dtype), also the op's reference in tests.
pub(super) fn reference_silu_product(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// The CPU op over f32 `gate` and `up`.
struct SiluProduct;

impl CustomOp2 for SiluProduct {
    fn name(&self) -> &'static str {
        "silu-product"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let gate = cpu_f32_values(self.name(), gate, gate_layout)?;
        let up = cpu_f32_values(self.name(), up, up_layout)?;
        if gate.len() != up.len() {
            candle_core::bail!(
                "silu-product: {} gate and {} up values",
                gate.len(),
                up.len()
            )
        }
        let mut out = vec![0f32; gate.len()];
        out.par_chunks_mut(TASK_ELEMENTS)
            .zip(gate.par_chunks(TASK_ELEMENTS))
            .zip(up.par_chunks(TASK_ELEMENTS))
            .for_each(|((out, gate), up)| kernels::silu_product(gate, up, out));
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _product: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (gate_storage, gate_layout) = gate.storage_and_layout();
        let (up_storage, up_layout) = up.storage_and_layout();
        let (grad_storage, grad_layout) = grad.storage_and_layout();
        let g = storage_f32_values(self.name(), &gate_storage, gate_layout)?;
        let u = storage_f32_values(self.name(), &up_storage, up_layout)?;
        let d = storage_f32_values(self.name(), &grad_storage, grad_layout)?;
        if d.len() != g.len() {
            candle_core::bail!(
                "silu-product: gradient of {} for {} values",
                d.len(),
                g.len()
            )
        }
        let (mut d_gate, mut d_up) = (vec![0f32; g.len()], vec![0f32; g.len()]);
        d_gate
            .par_chunks_mut(TASK_ELEMENTS)
            .zip(d_up.par_chunks_mut(TASK_ELEMENTS))
            .zip(g.par_chunks(TASK_ELEMENTS))
            .zip(u.par_chunks(TASK_ELEMENTS).zip(d.par_chunks(TASK_ELEMENTS)))
            .for_each(|(((d_gate, d_up), g), (u, d))| {
                kernels::silu_product_grad(g, u, d, d_gate, d_up);
            });
        let to_tensor = |values: Vec<f32>, like: &Tensor| {
            like.track_op()
                .then(|| Tensor::from_vec(values, like.shape(), like.device()))
                .transpose()
        };
        Ok((to_tensor(d_gate, gate)?, to_tensor(d_up, up)?))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_equals_primitive_value_and_gradients() {
        let dev = Device::Cpu;
        // More elements than one task, and not a multiple of it or of the vector width.
        let shape = (3, 70, 97);
        let gate = Var::from_tensor(&Tensor::randn(0f32, 3.0, shape, &dev).unwrap()).unwrap();
        let up = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let fused = silu_product(gate.as_tensor(), up.as_tensor()).unwrap();
        let reference = reference_silu_product(gate.as_tensor(), up.as_tensor()).unwrap();
        // A few ulp of values that reach about 30.
        let d = crate::test_util::max_abs_diff(&fused, &reference);
        assert!(d < 1e-5, "value: {d}");
        let backward = |y: &Tensor| (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (ours, theirs) = (backward(&fused), backward(&reference));
        for (name, var) in [("gate", &gate), ("up", &up)] {
            let d = crate::test_util::max_abs_diff(
                ours.get(var.as_tensor()).unwrap(),
                theirs.get(var.as_tensor()).unwrap(),
            );
            assert!(d < 1e-5, "{name}: {d}");
        }
        // An input without a graph gets no gradient.
        let frozen_up = up.as_tensor().detach();
        let grads = backward(&silu_product(gate.as_tensor(), &frozen_up).unwrap());
        assert!(grads.get(gate.as_tensor()).is_some());
        assert!(grads.get(&frozen_up).is_none());
    }
}
