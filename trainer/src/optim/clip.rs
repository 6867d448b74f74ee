//! Global gradient-norm clipping.

use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

use crate::Result;

/// Computes the global L2 norm of the gradients of `vars` (by name in `grads`) and, when
/// `max_norm > 0` and the norm exceeds it, scales them in place. Returns the norm before clipping.
pub fn clip_grad_norm(
    vars: &[(String, Var)],
    grads: &mut HashMap<String, Tensor>,
    max_norm: f64,
) -> Result<f64> {
    let mut total = 0f64;
    for (name, _) in vars {
        if let Some(g) = grads.get(name) {
            let s = g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()?;
            total += s as f64;
        }
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let factor = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * factor)?;
        }
    }
    Ok(norm)
}
