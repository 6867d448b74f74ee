//! Global gradient-norm clipping.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

use crate::Result;
use crate::kernels::{self, storage_f32_values};

/// Values of a gradient one parallel task of the CPU sum of squares takes.
const VALUES_PER_TASK: usize = 64 * 1024;

/// The global L2 norm of the gradients of `vars` (by name in `grads`).
pub fn global_norm(vars: &[(String, Var)], grads: &HashMap<String, Tensor>) -> Result<f64> {
    // On the CPU an f32 gradient's sum of squares is read from its memory (no squared copy);
    // elsewhere the per-tensor sums stay on their device and each device's total is read once
    // (no sync per tensor; several devices when the layers are split over GPUs).
    let mut total = 0f64;
    let mut sums: Vec<(Device, Vec<Tensor>)> = Vec::new();
    for (name, _) in vars {
        let Some(g) = grads.get(name) else { continue };
        if let Some(sum) = cpu_sum_of_squares(g)? {
            total += sum;
            continue;
        }
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
    for (_, on_device) in &sums {
        total += Tensor::stack(on_device, 0)?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// The sum of squares of a contiguous f32 CPU tensor, in f32 per task and f64 across tasks;
/// `None` for any other tensor.
fn cpu_sum_of_squares(g: &Tensor) -> Result<Option<f64>> {
    if !g.device().is_cpu() || g.dtype() != DType::F32 || !g.is_contiguous() {
        return Ok(None);
    }
    let (storage, layout) = g.storage_and_layout();
    let values = storage_f32_values("clip", &storage, layout)?;
    Ok(Some(
        values
            .par_chunks(VALUES_PER_TASK)
            .map(|chunk| f64::from(kernels::dot(chunk, chunk)))
            .sum(),
    ))
}

/// The factor that brings gradients of global norm `norm` down to `max_norm`: 1 when they are
/// within it or `max_norm ≤ 0` (no clipping).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Computes the global L2 norm of the gradients of `vars` (by name in `grads`) and, when
/// `max_norm > 0` and the norm exceeds it, scales them. Returns the norm before clipping. (The
/// training step folds the factor into the optimizer's update instead.)
pub fn clip_grad_norm(
    vars: &[(String, Var)],
    grads: &mut HashMap<String, Tensor>,
    max_norm: f64,
) -> Result<f64> {
    let norm = global_norm(vars, grads)?;
    let factor = clip_factor(norm, max_norm);
    if factor != 1.0 {
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
    fn the_cpu_sum_of_squares_equals_the_tensor_formula_over_several_tasks() {
        let n = 3 * VALUES_PER_TASK + 7;
        let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let g = Tensor::from_vec(values, n, &Device::Cpu).unwrap();
        let fast = cpu_sum_of_squares(&g).unwrap().unwrap();
        let reference = g
            .to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (fast - reference).abs() < 1e-6 * reference,
            "{fast} vs {reference}"
        );
        // A transposed view takes the tensor path and gives the same norm.
        let m =
            Tensor::from_vec((0..12).map(|i| i as f32).collect(), (3, 4), &Device::Cpu).unwrap();
        assert!(cpu_sum_of_squares(&m.t().unwrap()).unwrap().is_none());
        let vars = vec![(
            "m".to_string(),
            Var::zeros((4, 3), DType::F32, &Device::Cpu).unwrap(),
        )];
        let by_view = global_norm(&vars, &HashMap::from([("m".to_string(), m.t().unwrap())]));
        let by_copy = global_norm(
            &vars,
            &HashMap::from([("m".to_string(), m.t().unwrap().contiguous().unwrap())]),
        );
        assert!((by_view.unwrap() - by_copy.unwrap()).abs() < 1e-9);
    }

    #[test]
    fn the_clip_factor_brings_the_norm_to_the_limit_and_only_above_it() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(5.0, 0.0), 1.0, "no clipping");
        assert!((clip_factor(13.0, 6.5) * 13.0 - 6.5).abs() < 1e-6);
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
