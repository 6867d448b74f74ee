//! AdamW (decoupled weight decay) whose whole state can be saved and restored.

use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use crate::{Result, TrainerError};

/// Elements of a parameter one parallel task of the CPU update takes.
const ELEMENTS_PER_TASK: usize = 64 * 1024;

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
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(params: AdamWParams) -> Self {
        Self {
            params,
            step: 0,
            m: HashMap::new(),
            v: HashMap::new(),
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
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            if var.device().is_cpu() && var.dtype() == DType::F32 {
                self.step_cpu(name, var, g, lr, bc1, bc2)?;
                continue;
            }
            let g = g.detach().to_dtype(DType::F32)?;
            // Moments restored from a checkpoint are read onto one device; each moves to its
            // parameter's on first use (the layers may be split over GPUs).
            let m_prev = match self.m.get(name) {
                Some(m) => m.to_device(g.device())?,
                None => g.zeros_like()?,
            };
            let v_prev = match self.v.get(name) {
                Some(v) => v.to_device(g.device())?,
                None => g.zeros_like()?,
            };
            let m = ((m_prev * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((v_prev * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let w = var.as_tensor().detach().to_dtype(DType::F32)?;
            let w = ((w * (1.0 - lr * p.weight_decay))? - (update * lr)?)?;
            var.set(&w.to_dtype(var.dtype())?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// The same update as [`AdamW::step`] in one fused pass over host memory, which avoids the
    /// dozen full-size temporary tensors of the tensor formulation (they dominate CPU time for
    /// large embeddings). Numerically identical formula, f32 throughout.
    fn step_cpu(
        &mut self,
        name: &str,
        var: &Var,
        g: &Tensor,
        lr: f64,
        bc1: f64,
        bc2: f64,
    ) -> Result<()> {
        let p = self.params;
        let shape = var.shape().clone();
        let dev = var.device().clone();
        let g = g
            .detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut w = var.as_tensor().detach().flatten_all()?.to_vec1::<f32>()?;
        let mut m = match self.m.remove(name) {
            Some(t) => t.flatten_all()?.to_vec1::<f32>()?,
            None => vec![0f32; g.len()],
        };
        let mut v = match self.v.remove(name) {
            Some(t) => t.flatten_all()?.to_vec1::<f32>()?,
            None => vec![0f32; g.len()],
        };
        let (b1, b2) = (p.beta1 as f32, p.beta2 as f32);
        let (c1, c2) = (1.0 - b1, 1.0 - b2);
        let (bc1, bc2) = (bc1 as f32, bc2 as f32);
        let decay = (1.0 - lr * p.weight_decay) as f32;
        let (lr, eps) = (lr as f32, p.eps as f32);
        // Element-wise, so chunks in parallel give the sequential loop's values exactly.
        w.par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(m.par_chunks_mut(ELEMENTS_PER_TASK))
            .zip(v.par_chunks_mut(ELEMENTS_PER_TASK))
            .zip(g.par_chunks(ELEMENTS_PER_TASK))
            .for_each(|(((w, m), v), g)| {
                for i in 0..w.len() {
                    let gi = g[i];
                    let mi = m[i] * b1 + gi * c1;
                    let vi = v[i] * b2 + gi * gi * c2;
                    m[i] = mi;
                    v[i] = vi;
                    let update = (mi / bc1) / ((vi / bc2).sqrt() + eps);
                    w[i] = w[i] * decay - update * lr;
                }
            });
        var.set(&Tensor::from_vec(w, shape.clone(), &dev)?)?;
        self.m
            .insert(name.to_string(), Tensor::from_vec(m, shape.clone(), &dev)?);
        self.v
            .insert(name.to_string(), Tensor::from_vec(v, shape, &dev)?);
        Ok(())
    }

    /// Moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (k, t) in &self.m {
            out.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            out.insert(format!("v.{k}"), t.clone());
        }
        out
    }

    /// Restores moments and step from a checkpoint.
    pub fn load_state(&mut self, step: usize, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.step = step;
        self.m.clear();
        self.v.clear();
        for (k, t) in tensors {
            if let Some(name) = k.strip_prefix("m.") {
                self.m.insert(name.to_string(), t.clone());
            } else if let Some(name) = k.strip_prefix("v.") {
                self.v.insert(name.to_string(), t.clone());
            } else {
                return Err(TrainerError::Config(format!(
                    "unexpected optimizer tensor {k}"
                )));
            }
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
        let st = opt.state_tensors();
        let saved_w = var.as_tensor().detach().copy().unwrap();
        opt.step(&vars, &grads, 0.1).unwrap();
        let a = var.as_tensor().to_vec1::<f32>().unwrap();
        var.set(&saved_w).unwrap();
        let mut opt2 = AdamW::new(opt.params);
        opt2.load_state(1, &st).unwrap();
        opt2.step(&vars, &grads, 0.1).unwrap();
        assert_eq!(a, var.as_tensor().to_vec1::<f32>().unwrap());
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
        for n in [4, 3 * ELEMENTS_PER_TASK + 5] {
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
