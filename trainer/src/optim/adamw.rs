//! AdamW (decoupled weight decay) whose whole state can be saved and restored.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

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
            let g = g.detach().to_dtype(DType::F32)?;
            let m_prev = match self.m.get(name) {
                Some(m) => m.clone(),
                None => g.zeros_like()?,
            };
            let v_prev = match self.v.get(name) {
                Some(v) => v.clone(),
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
}
