//! Writing the outputs: the LoRA adapter in PEFT layout, merged or fully trained weights in HF
//! layout (config, safetensors, tokenizer).

use std::path::{Path, PathBuf};

use crate::model::lora::write_peft_adapter;
use crate::model::{Llama, TrainableSpec, tiny};
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
        tiny::write_hf_model(&dir, model.config(), &model.merged_weights()?)?;
        let tok = dir.join("tokenizer.json");
        std::fs::copy(tokenizer, &tok).map_err(|e| TrainerError::io(&tok, e))?;
        done.model = Some(dir.display().to_string());
    }
    Ok(done)
}
