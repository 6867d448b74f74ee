//! Building the model's tensors from loaded weights: frozen tensors stay plain, trained ones
//! become `Var`s registered under their checkpoint names, and LoRA adapters are created where
//! the spec asks for them.

use candle_core::{DType, Tensor, Var};

use super::TrainableSpec;
use crate::Result;
use crate::model::linear::{Linear, LoraAdapter};
use crate::model::lora::{module_path, peft_name};
use crate::model::placement::LayerDevices;
use crate::model::weights::Weights;
use crate::rng::Rng;

/// Takes tensors out of the weights and registers the trainable ones, in order.
pub(super) struct ParamLoader<'a> {
    weights: &'a mut Weights,
    spec: &'a TrainableSpec,
    placement: &'a LayerDevices,
    /// LoRA A initialisation stream (one for the whole model, drawn in layer and module order).
    lora_rng: Rng,
    /// The trainable tensors so far, with their names.
    pub(super) trainable: Vec<(String, Var)>,
}

impl<'a> ParamLoader<'a> {
    /// A loader over `weights`; LoRA matrices are initialised from `seed`.
    pub(super) fn new(
        weights: &'a mut Weights,
        spec: &'a TrainableSpec,
        seed: u64,
        placement: &'a LayerDevices,
    ) -> Self {
        Self {
            weights,
            spec,
            placement,
            lora_rng: Rng::derive(seed, 0x10A),
            trainable: Vec::new(),
        }
    }

    /// Whether the weights hold `name`.
    pub(super) fn contains(&self, name: &str) -> bool {
        self.weights.contains(name)
    }

    /// The tensor `name` of shape `shape`, on its device of the placement; a registered `Var`
    /// when `train`.
    pub(super) fn param(&mut self, name: &str, shape: &[usize], train: bool) -> Result<Tensor> {
        let t = self
            .weights
            .take(name, shape)?
            .to_device(self.placement.of_weight(name))?;
        if !train {
            return Ok(t);
        }
        let var = Var::from_tensor(&t)?;
        let tensor = var.as_tensor().clone();
        self.trainable.push((name.to_string(), var));
        Ok(tensor)
    }

    /// The projection `module` (out × inp) of layer `layer`: its weight trained when `full`,
    /// with a LoRA adapter when the spec is LoRA and selects this layer and module (A
    /// Kaiming-uniform with a = √5, as torch.nn.Linear and PEFT use; B zero).
    pub(super) fn linear(
        &mut self,
        layer: usize,
        module: &str,
        out: usize,
        inp: usize,
        full: bool,
    ) -> Result<Linear> {
        let name = format!("{}.weight", module_path(layer, module));
        let lora = match self.spec {
            TrainableSpec::Lora(ls) => Some(ls),
            _ => None,
        };
        let quantized = self.weights.take_quantized(&name, &[out, inp])?;
        let device = self.placement.of_layer(layer);
        if let Some(q) = &quantized
            && !q.device().same_device(device)
        {
            return Err(crate::TrainerError::Weight {
                name,
                reason: format!(
                    "was quantized onto {:?}, but its layer is placed on {device:?}",
                    q.device()
                ),
            });
        }
        let (mut linear, ls) = match (quantized, lora) {
            // Quantized while loading (the trainer's path for a quantized base).
            (Some(q), Some(ls)) => (Linear::quantized(q), ls),
            (Some(_), None) => {
                return Err(crate::TrainerError::Weight {
                    name,
                    reason: "was quantized while loading, but only LoRA trains over a \
                             quantized base"
                        .into(),
                });
            }
            (None, None) => return Ok(Linear::new(self.param(&name, &[out, inp], full)?)),
            // Dense: quantized here when the spec asks for it (weights built in memory).
            (None, Some(ls)) => {
                let weight = self.param(&name, &[out, inp], full)?;
                let linear = Linear::frozen(weight, ls.base_quantization).map_err(|e| {
                    crate::TrainerError::Weight {
                        name: name.clone(),
                        reason: format!(
                            "cannot be held as {} (rows must split into blocks of 32): {e}",
                            ls.base_quantization.name()
                        ),
                    }
                })?;
                (linear, ls)
            }
        };
        let layer_selected = ls.layers.as_ref().is_none_or(|v| v.contains(&layer));
        if !layer_selected || !ls.target_modules.iter().any(|m| m == module) {
            return Ok(linear);
        }
        let bound = (6.0f64 / inp as f64).sqrt() as f32 / 5f32.sqrt();
        let a: Vec<f32> = (0..ls.rank * inp)
            .map(|_| (self.lora_rng.next_f32() * 2.0 - 1.0) * bound)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (ls.rank, inp), device)?)?;
        let b = Var::zeros((out, ls.rank), DType::F32, device)?;
        self.trainable
            .push((peft_name(layer, module, 'A'), a.clone()));
        self.trainable
            .push((peft_name(layer, module, 'B'), b.clone()));
        linear.lora = Some(LoraAdapter {
            a,
            b,
            scale: ls.scale(),
            dropout: ls.dropout,
        });
        Ok(linear)
    }
}
