//! Loading a model for inference: a Hugging Face model directory (a base, or merged weights), and
//! optionally a PEFT LoRA adapter on top, as `generate`, `evaluate` and `compare` take them.

use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

use super::{Llama, LlamaConfig, LoraSettings, TrainableSpec};
use crate::model::weights::{Weights, load_checked};
use crate::{Result, TrainerError};

/// A model to run: its directory and an optional PEFT adapter directory.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRef {
    /// Hugging Face model directory (`config.json`, safetensors).
    pub model: PathBuf,
    /// PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
    pub adapter: Option<PathBuf>,
}

impl ModelRef {
    /// How the model is named in reports: the directory, with `+ adapter` when there is one.
    pub fn describe(&self) -> String {
        match &self.adapter {
            Some(a) => format!("{} + {}", self.model.display(), a.display()),
            None => self.model.display().to_string(),
        }
    }
}

/// The LoRA settings of a PEFT `adapter_config.json` (rank, alpha, target modules, layers).
pub fn read_adapter_config(dir: &Path) -> Result<LoraSettings> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainerError::io(&path, e))?;
    let c: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TrainerError::Config(format!("{}: {e}", path.display())))?;
    let field = |name: &str| TrainerError::Config(format!("{}: field {name}", path.display()));
    let rank = c["r"].as_u64().ok_or_else(|| field("r"))? as usize;
    let strings = |v: &serde_json::Value| -> Option<Vec<String>> {
        v.as_array().map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
    };
    Ok(LoraSettings {
        rank,
        alpha: c["lora_alpha"].as_f64().unwrap_or(rank as f64),
        dropout: 0.0,
        target_modules: strings(&c["target_modules"]).ok_or_else(|| field("target_modules"))?,
        layers: c["layers_to_transform"].as_array().map(|v| {
            v.iter()
                .filter_map(|x| x.as_u64().map(|n| n as usize))
                .collect()
        }),
        train_label_tokens: false,
        head_token_ids: head_token_ids(&c["trainable_token_indices"])
            .ok_or_else(|| field("trainable_token_indices"))?,
        base_quantization: finetune_api::BaseQuantization::None,
    })
}

/// The `lm_head` token ids of PEFT's `trainable_token_indices` (absent or null: none). A list
/// alone means the embedding in PEFT, which this trainer does not train: refused (`None`), as
/// is any other layer or a non-integer id.
fn head_token_ids(v: &serde_json::Value) -> Option<Vec<u32>> {
    let map = match v {
        serde_json::Value::Null => return Some(Vec::new()),
        serde_json::Value::Object(m) => m,
        _ => return None,
    };
    if map.keys().any(|k| k != "lm_head") {
        return None;
    }
    let Some(ids) = map.get("lm_head") else {
        return Some(Vec::new());
    };
    ids.as_array()?
        .iter()
        .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect()
}

/// Loads the model (f32) with its adapter, if any, ready for inference.
pub fn load_for_inference(model: &ModelRef, device: &Device) -> Result<(Llama, LlamaConfig)> {
    let cfg = LlamaConfig::from_file(&model.model.join("config.json"))?;
    let weights = Weights::from_dir(&model.model, DType::F32, device)?;
    let Some(adapter) = &model.adapter else {
        let llama = Llama::from_weights(&cfg, weights, &TrainableSpec::Frozen, 0, device)?;
        return Ok((llama, cfg));
    };
    let settings = read_adapter_config(adapter)?;
    let tensors = load_checked(&adapter.join("adapter_model.safetensors"), device)?;
    let llama = Llama::from_weights(&cfg, weights, &TrainableSpec::Lora(settings), 0, device)?;
    llama.load_trainable(&tensors)?;
    Ok((llama, cfg))
}
