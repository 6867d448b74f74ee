//! AdamW (decoupled weight decay) whose whole state can be saved and restored.

use candle_core::{DType, Device, Shape, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use super::fused_adamw::{self, Coefficients};
use crate::{Result, TrainerError};

/// AdamW hyper-parameters (the learning rate is given per step by the schedule).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over named Vars; moments are kept in f32 whatever the parameter dtype.
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub params: AdamWParams,
    /// Number of updates applied so far.
    pub step: usize,
    moments: HashMap<String, Moments>,
}

/// A parameter's first and second moments.
#[derive(Debug)]
enum Moments {
    /// Host vectors, updated in place with an f32 CPU parameter of `shape`.
    Host {
        m: Vec<f32>,
        v: Vec<f32>,
        shape: Shape,
    },
    /// f32 tensors (on a GPU, and as restored from a checkpoint until first used).
    Tensors { m: Tensor, v: Tensor },
}

impl Moments {
    /// The moments as host vectors of `n` values (zero when new).
    fn into_host(this: Option<Self>, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(match this {
            None => (vec![0f32; n], vec![0f32; n]),
            Some(Moments::Host { m, v, .. }) => (m, v),
            Some(Moments::Tensors { m, v }) => (
                m.flatten_all()?.to_vec1::<f32>()?,
                v.flatten_all()?.to_vec1::<f32>()?,
            ),
        })
    }

    /// The moments as f32 tensors of `shape` on `device` (`None` when new).
    fn into_tensors(
        this: Option<Self>,
        shape: &Shape,
        device: &Device,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(match this {
            None => None,
            Some(Moments::Host { m, v, .. }) => Some((
                Tensor::from_vec(m, shape, device)?,
                Tensor::from_vec(v, shape, device)?,
            )),
            Some(Moments::Tensors { m, v }) => Some((m.to_device(device)?, v.to_device(device)?)),
        })
    }

    /// Both moments as f32 tensors shaped as the parameter (host vectors copied).
    fn tensors(&self) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Host { m, v, shape } => (
                Tensor::from_slice(m, shape, &Device::Cpu)?,
                Tensor::from_slice(v, shape, &Device::Cpu)?,
            ),
            Moments::Tensors { m, v } => (m.clone(), v.clone()),
        })
    }
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(params: AdamWParams) -> Self {
        Self {
            params,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// Applies one update with learning rate `lr` using `grads` (by var name). Vars without a
    /// gradient are left unchanged.
    pub fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &HashMap<String, Tensor>,
        lr: f64,
    ) -> Result<()> {
        self.step_scaled(vars, grads, lr, 1.0)
    }

    /// [`AdamW::step`] with every gradient multiplied by `grad_scale` first (the average over
    /// micro-batches and the clipping factor, applied in the update's own pass over the
    /// gradients rather than in a pass of their own).
    pub fn step_scaled(
        &mut self,
        vars: &[(String, Var)],
        grads: &HashMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        let decay = 1.0 - lr * p.weight_decay;
        // The same for every parameter of the step.
        let coefficients = Coefficients {
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            bias_correction1: bc1 as f32,
            bias_correction2: bc2 as f32,
            decay: decay as f32,
            lr: lr as f32,
            eps: p.eps as f32,
            grad_scale: grad_scale as f32,
        };
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            let previous = self.moments.remove(name);
            let moments = if var.device().is_cpu()
                && var.dtype() == DType::F32
                && var.is_contiguous()
            {
                let (mut m, mut v) = Moments::into_host(previous, var.elem_count())?;
                let g = g.detach().to_dtype(DType::F32)?;
                fused_adamw::update_in_place(var.as_tensor(), &g, &mut m, &mut v, coefficients)?;
                Moments::Host {
                    m,
                    v,
                    shape: var.shape().clone(),
                }
            } else {
                let g = g.detach().to_dtype(DType::F32)?;
                let g = if grad_scale == 1.0 {
                    g
                } else {
                    (g * grad_scale)?
                };
                // Moments restored from a checkpoint are read onto one device; each moves to
                // its parameter's on first use (the layers may be split over GPUs).
                let (m_prev, v_prev) = match Moments::into_tensors(previous, g.shape(), g.device())?
                {
                    Some(moments) => moments,
                    None => (g.zeros_like()?, g.zeros_like()?),
                };
                let m = ((m_prev * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
                let v = ((v_prev * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
                let m_hat = (&m / bc1)?;
                let v_hat = (&v / bc2)?;
                let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
                let w = var.as_tensor().detach().to_dtype(DType::F32)?;
                let w = ((w * decay)? - (update * lr)?)?;
                var.set(&w.to_dtype(var.dtype())?)?;
                Moments::Tensors { m, v }
            };
            self.moments.insert(name.clone(), moments);
        }
        Ok(())
    }

    /// Moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (k, moments) in &self.moments {
            let (m, v) = moments.tensors()?;
            out.insert(format!("m.{k}"), m);
            out.insert(format!("v.{k}"), v);
        }
        Ok(out)
    }

    /// Restores moments and step from a checkpoint.
    pub fn load_state(&mut self, step: usize, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.step = step;
        self.moments.clear();
        for (k, m) in tensors {
            if k.starts_with("v.") {
                continue;
            }
            let Some(name) = k.strip_prefix("m.") else {
                return Err(TrainerError::Config(format!(
                    "unexpected optimizer tensor {k}"
                )));
            };
            let Some(v) = tensors.get(&format!("v.{name}")) else {
                return Err(TrainerError::Config(format!(
                    "optimizer state has {k} but no v.{name}"
                )));
            };
            let moments = Moments::Tensors {
                m: m.clone(),
                v: v.clone(),
            };
            self.moments.insert(name.to_string(), moments);
        }
        if let Some(orphan) = tensors
            .keys()
            .filter_map(|k| k.strip_prefix("v."))
            .find(|name| !self.moments.contains_key(*name))
        {
            return Err(TrainerError::Config(format!(
                "optimizer state has v.{orphan} but no m.{orphan}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_hand_computed_first_steps_and_state_roundtrips() {
        let dev = Device::Cpu;
        let var = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let vars = vec![("w".to_string(), var.clone())];
        let mut opt = AdamW::new(AdamWParams {
            weight_decay: 0.1,
            ..Default::default()
        });
        let g = Tensor::new(&[0.5f32, -1.0], &dev).unwrap();
        let grads = HashMap::from([("w".to_string(), g.clone())]);
        opt.step(&vars, &grads, 0.1).unwrap();
        // First Adam step moves each weight by lr·sign(g) (bias-corrected), after decay.
        let w = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((w[0] - (1.0 * (1.0 - 0.01) - 0.1)).abs() < 1e-5, "{w:?}");
        assert!((w[1] - (-2.0 * (1.0 - 0.01) + 0.1)).abs() < 1e-5, "{w:?}");
        // Save, continue two ways, compare.
        let st = opt.state_tensors().unwrap();
        let saved_w = var.as_tensor().detach().copy().unwrap();
        opt.step(&vars, &grads, 0.1).unwrap();
        let a = var.as_tensor().to_vec1::<f32>().unwrap();
        var.set(&saved_w).unwrap();
        let mut opt2 = AdamW::new(opt.params);
        opt2.load_state(1, &st).unwrap();
        opt2.step(&vars, &grads, 0.1).unwrap();
        assert_eq!(a, var.as_tensor().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn a_state_with_a_moment_missing_is_refused_by_name() {
        let m = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        for (present, missing) in [("m.w", "v.w"), ("v.w", "m.w")] {
            let state = HashMap::from([(present.to_string(), m.clone())]);
            let err = AdamW::new(AdamWParams::default())
                .load_state(1, &state)
                .unwrap_err()
                .to_string();
            assert!(err.contains(missing), "{err}");
        }
    }

    #[test]
    fn a_gradient_of_another_size_is_an_error_and_leaves_the_weights() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), var.clone())];
        let g = Tensor::new(&[0.5f32, -1.0, 3.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(AdamWParams::default());
        assert!(
            opt.step(&vars, &HashMap::from([("w".to_string(), g)]), 0.1)
                .is_err()
        );
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), [1.0, -2.0]);
    }

    #[test]
    fn a_scaled_step_equals_the_step_of_the_scaled_gradient() {
        let dev = Device::Cpu;
        let n = 5;
        let g = Tensor::from_vec(values(n, 0.3, 1.0), n, &dev).unwrap();
        let run = |scaled: bool| {
            let var =
                Var::from_tensor(&Tensor::from_vec(values(n, 1.0, 0.0), n, &dev).unwrap()).unwrap();
            let vars = vec![("w".to_string(), var.clone())];
            let mut opt = AdamW::new(AdamWParams::default());
            for _ in 0..3 {
                if scaled {
                    let grads = HashMap::from([("w".to_string(), g.clone())]);
                    opt.step_scaled(&vars, &grads, 0.01, 0.25).unwrap();
                } else {
                    let grads = HashMap::from([("w".to_string(), (&g * 0.25).unwrap())]);
                    opt.step(&vars, &grads, 0.01).unwrap();
                }
            }
            var.as_tensor().to_vec1::<f32>().unwrap()
        };
        assert_eq!(run(true), run(false));
    }

    /// `n` values, deterministic and of both signs.
    fn values(n: usize, scale: f32, phase: f32) -> Vec<f32> {
        (0..n)
            .map(|i| scale * ((i as f32) * 0.37 + phase).sin())
            .collect()
    }

    #[test]
    fn fused_cpu_path_matches_tensor_formula() {
        // Reference: the tensor formulation, applied by hand for three steps; a small tensor and
        // one split into several parallel tasks.
        let dev = Device::Cpu;
        let p = AdamWParams {
            weight_decay: 0.05,
            ..Default::default()
        };
        for n in [4, 3 * super::fused_adamw::ELEMENTS_PER_TASK + 5] {
            let w0 = Tensor::from_vec(values(n, 1.0, 0.0), n, &dev).unwrap();
            let var = Var::from_tensor(&w0).unwrap();
            let vars = vec![("w".to_string(), var.clone())];
            let mut opt = AdamW::new(p);
            let (mut w, mut m, mut v) = (
                w0.clone(),
                w0.zeros_like().unwrap(),
                w0.zeros_like().unwrap(),
            );
            for t in 1..=3 {
                let g = Tensor::from_vec(values(n, 0.1 * t as f32, 1.0), n, &dev).unwrap();
                opt.step(&vars, &HashMap::from([("w".to_string(), g.clone())]), 0.01)
                    .unwrap();
                m = ((m * 0.9).unwrap() + (&g * 0.1).unwrap()).unwrap();
                v = ((v * 0.999).unwrap() + (g.sqr().unwrap() * 0.001).unwrap()).unwrap();
                let mh = (&m / (1.0 - 0.9f64.powi(t))).unwrap();
                let vh = (&v / (1.0 - 0.999f64.powi(t))).unwrap();
                let u = (mh / (vh.sqrt().unwrap() + 1e-8).unwrap()).unwrap();
                w = ((w * (1.0 - 0.01 * 0.05)).unwrap() - (u * 0.01).unwrap()).unwrap();
            }
            let d = crate::test_util::max_abs_diff(&w, var.as_tensor());
            assert!(d < 1e-6, "{n} elements: {d}");
            let moved = crate::test_util::max_abs_diff(&w0, var.as_tensor());
            assert!(moved > 0.01, "{n} elements: moved {moved}");
        }
    }
}
