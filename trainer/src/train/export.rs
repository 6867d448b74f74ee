//! Writing the outputs: the LoRA adapter in PEFT layout, merged or fully trained weights in HF
//! layout (config, safetensors, tokenizer).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use finetune_api::BaseQuantization;
use std::collections::HashMap;

use crate::model::lora::write_peft_adapter;
use crate::model::weights::Weights;
use crate::model::{Llama, LoraSettings, TrainableSpec, tiny};
use crate::{Result, TrainerError};

/// Paths of what was written.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Exported {
    /// PEFT adapter directory.
    pub adapter: Option<String>,
    /// Full HF model directory (merged LoRA or fully trained weights).
    pub model: Option<String>,
}

/// Writes the outputs of a run into `out`.
pub fn export(
    model: &Llama,
    spec: &TrainableSpec,
    out: &Path,
    tokenizer: &Path,
    base_model: &str,
    merge: bool,
) -> Result<Exported> {
    std::fs::create_dir_all(out).map_err(|e| TrainerError::io(out, e))?;
    let mut done = Exported::default();
    if let TrainableSpec::Lora(settings) = spec {
        let dir = out.join("adapter");
        write_peft_adapter(&dir, settings, &model.trainable_tensors(), base_model)?;
        done.adapter = Some(dir.display().to_string());
    }
    let full = matches!(spec, TrainableSpec::Full { .. });
    if full || merge {
        let dir: PathBuf = out.join(if full { "model" } else { "merged" });
        let weights = match spec {
            TrainableSpec::Lora(settings) if !settings.base_quantization.is_none() => {
                merged_into_unquantized_base(model, settings, Path::new(base_model))?
            }
            _ => model.merged_weights()?,
        };
        tiny::write_hf_model_with_tokenizer(&dir, model.config(), &weights, tokenizer)?;
        done.model = Some(dir.display().to_string());
    }
    Ok(done)
}

/// The adapters of `model` (trained over a quantized base) merged into the unquantized base read
/// again from `base_dir`, in the dtype the run used, on the CPU: merged weights never come from
/// the quantized copy.
fn merged_into_unquantized_base(
    model: &Llama,
    settings: &LoraSettings,
    base_dir: &Path,
) -> Result<HashMap<String, Tensor>> {
    let weights = Weights::from_dir(base_dir, model.dtype(), &Device::Cpu)?;
    let unquantized = LoraSettings {
        base_quantization: BaseQuantization::None,
        ..settings.clone()
    };
    let base = Llama::from_weights(
        model.config(),
        weights,
        &TrainableSpec::Lora(unquantized),
        0,
        &Device::Cpu,
    )?;
    base.load_trainable(&model.trainable_tensors())?;
    base.merged_weights()
}
