//! Global gradient-norm clipping.

use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;

use crate::Result;

/// Computes the global L2 norm of the gradients of `vars` (by name in `grads`) and, when
/// `max_norm > 0` and the norm exceeds it, scales them in place. Returns the norm before clipping.
pub fn clip_grad_norm(
    vars: &[(String, Var)],
    grads: &mut HashMap<String, Tensor>,
    max_norm: f64,
) -> Result<f64> {
    // The per-tensor sums stay on their device; one read of the total per device (no sync per
    // tensor; several devices when the layers are split over GPUs).
    let mut sums: Vec<(Device, Vec<Tensor>)> = Vec::new();
    for (name, _) in vars {
        if let Some(g) = grads.get(name) {
            let sum = g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?;
            match sums.iter_mut().find(|(d, _)| d.same_device(g.device())) {
                Some((_, on_device)) => on_device.push(sum),
                None => sums.push((g.device().clone(), vec![sum])),
            }
        }
    }
    let mut total = 0.0;
    for (_, on_device) in &sums {
        total += Tensor::stack(on_device, 0)?.sum_all()?.to_scalar::<f64>()?;
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn setup() -> (Vec<(String, Var)>, HashMap<String, Tensor>) {
        let d = Device::Cpu;
        let vars = vec![
            ("a".to_string(), Var::zeros(2, DType::F32, &d).unwrap()),
            ("b".to_string(), Var::zeros(1, DType::F32, &d).unwrap()),
            ("absent".to_string(), Var::zeros(1, DType::F32, &d).unwrap()),
        ];
        let grads = HashMap::from([
            ("a".to_string(), Tensor::new(&[3f32, 4.0], &d).unwrap()),
            ("b".to_string(), Tensor::new(&[12f32], &d).unwrap()),
        ]);
        (vars, grads)
    }

    #[test]
    fn the_global_norm_and_the_clipped_gradients() {
        let (vars, mut grads) = setup();
        // sqrt(9 + 16 + 144) = 13.
        let norm = clip_grad_norm(&vars, &mut grads, 0.0).unwrap();
        assert!((norm - 13.0).abs() < 1e-9, "{norm}");
        assert_eq!(grads["b"].to_vec1::<f32>().unwrap(), vec![12.0]);
        let norm = clip_grad_norm(&vars, &mut grads, 6.5).unwrap();
        assert!((norm - 13.0).abs() < 1e-9);
        let b = grads["b"].to_vec1::<f32>().unwrap()[0];
        assert!((b - 6.0).abs() < 1e-5, "scaled by 6.5/13: {b}");
        let after = clip_grad_norm(&vars, &mut grads, 0.0).unwrap();
        assert!((after - 6.5).abs() < 1e-5, "{after}");
    }

    #[test]
    fn no_gradients_means_norm_zero() {
        let (vars, _) = setup();
        assert_eq!(
            clip_grad_norm(&vars, &mut HashMap::new(), 1.0).unwrap(),
            0.0
        );
    }
}
