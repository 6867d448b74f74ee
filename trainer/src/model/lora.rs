//! LoRA settings and the Hugging Face PEFT adapter layout.

use candle_core::Tensor;
use finetune_api::BaseQuantization;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::{Result, TrainerError};

/// The linear modules LoRA can target, in HF names.
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    /// Rank r.
    pub rank: usize,
    /// Alpha; the adapter is scaled by alpha / r.
    pub alpha: f64,
    /// Dropout on the adapter input.
    pub dropout: f32,
    /// Target module names (e.g. `q_proj`, `v_proj`).
    pub target_modules: Vec<String>,
    /// Layers to adapt (all when `None`).
    pub layers: Option<Vec<usize>>,
    /// Train the `lm_head` rows of the tokens that spell the class labels (the API's
    /// `trainLabelTokens`); the trainer resolves them into [`LoraSettings::head_token_ids`] once
    /// it knows the labels.
    #[serde(default)]
    pub train_label_tokens: bool,
    /// Token ids whose `lm_head` rows are trained beside the adapters (PEFT's
    /// `trainable_token_indices` on `lm_head`); none when empty.
    #[serde(default)]
    pub head_token_ids: Vec<u32>,
    /// How the frozen projections are held (QLoRA-style `int8` / `int4`, or the model's dtype).
    #[serde(default)]
    pub base_quantization: BaseQuantization,
}

impl LoraSettings {
    /// The settings of the API's LoRA section, on `layers` (all when `None`).
    pub fn from_spec(l: &finetune_api::LoraSpec, layers: Option<Vec<usize>>) -> Self {
        Self {
            rank: l.rank as usize,
            alpha: l.alpha,
            dropout: l.dropout as f32,
            target_modules: l.target_modules.iter().map(target_name).collect(),
            layers,
            train_label_tokens: l.train_label_tokens,
            head_token_ids: Vec::new(),
            base_quantization: l.base_quantization,
        }
    }

    /// Scale alpha / rank.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank.max(1) as f64
    }

    /// Checks ranks and module names.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(TrainerError::Config("lora rank must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(TrainerError::Config("lora dropout must be in [0,1)".into()));
        }
        for m in &self.target_modules {
            if !ALL_TARGETS.contains(&m.as_str()) {
                return Err(TrainerError::Config(format!(
                    "unknown LoRA target module {m}; expected one of {ALL_TARGETS:?}"
                )));
            }
        }
        Ok(())
    }
}

/// HF module path of a linear layer, e.g. `model.layers.0.self_attn.q_proj`.
pub fn module_path(layer: usize, module: &str) -> String {
    let group = match module {
        "gate_proj" | "up_proj" | "down_proj" => "mlp",
        _ => "self_attn",
    };
    format!("model.layers.{layer}.{group}.{module}")
}

/// PEFT tensor name of an adapter matrix (`which` is `A` or `B`).
pub fn peft_name(layer: usize, module: &str, which: char) -> String {
    format!(
        "base_model.model.{}.lora_{which}.weight",
        module_path(layer, module)
    )
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` in PEFT layout.
pub fn write_peft_adapter(
    dir: &Path,
    settings: &LoraSettings,
    tensors: &HashMap<String, Tensor>,
    base_model: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
    let layers = settings.layers.clone();
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": settings.target_modules,
        "layers_to_transform": layers,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "trainable_token_indices": (!settings.head_token_ids.is_empty())
            .then(|| serde_json::json!({ "lm_head": settings.head_token_ids })),
    });
    let cfg_path = dir.join("adapter_config.json");
    crate::atomic_file::write_atomic(&cfg_path, serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    let sorted: BTreeMap<&String, &Tensor> = tensors.iter().collect();
    let owned: HashMap<String, Tensor> = sorted
        .into_iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    crate::atomic_file::save_safetensors_atomic(&dir.join("adapter_model.safetensors"), &owned)
}

/// The module name (`q_proj`, …) of an API target module (the last part of its HF path).
fn target_name(t: &finetune_api::TargetModule) -> String {
    let path = t.hf_path();
    path.rsplit('.').next().unwrap_or(path).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_match_hf() {
        assert_eq!(
            peft_name(0, "q_proj", 'A'),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            peft_name(3, "down_proj", 'B'),
            "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"
        );
        let bad = LoraSettings {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["qproj".into()],
            layers: None,
            train_label_tokens: false,
            head_token_ids: vec![],
            base_quantization: finetune_api::BaseQuantization::None,
        };
        assert!(bad.validate().is_err());
    }
}
