//! The `tiny` preset: a Llama-shaped model small enough to train on a CPU in minutes, with the
//! real 32k Llama 2 vocabulary, initialised locally and written in HF layout.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

use super::config::LlamaConfig;
use super::lora::module_path;
use crate::rng::Rng;
use crate::{Result, TrainerError};

/// The tiny preset's configuration for a vocabulary size (32000 for the Llama 2 tokenizer): the
/// architecture of `finetune_api::ModelPreset::Tiny` (the one the fit check sizes), with the
/// tokenizer's vocabulary.
pub fn tiny_config(vocab_size: usize) -> LlamaConfig {
    let a = finetune_api::ModelPreset::Tiny.architecture();
    LlamaConfig {
        hidden_size: a.hidden_size as usize,
        intermediate_size: a.intermediate_size as usize,
        vocab_size,
        num_hidden_layers: a.num_layers as usize,
        num_attention_heads: a.num_heads as usize,
        num_key_value_heads: Some(a.num_kv_heads as usize),
        rms_norm_eps: 1e-5,
        head_dim: None,
        rope_theta: Some(super::rope::DEFAULT_ROPE_THETA),
        rope_scaling: None,
        rope_parameters: None,
        hidden_act: "silu".into(),
        max_position_embeddings: a.max_position_embeddings as usize,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        tie_word_embeddings: false,
        extra: serde_json::Map::from_iter([
            (
                "architectures".to_string(),
                serde_json::json!(["LlamaForCausalLM"]),
            ),
            ("model_type".to_string(), serde_json::json!("llama")),
            ("torch_dtype".to_string(), serde_json::json!("float32")),
        ]),
    }
}

/// Random initial weights in HF names: normal(0, 0.02) matrices, unit norms.
pub fn init_weights(
    cfg: &LlamaConfig,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = Rng::new(seed);
    let mut normal = |rows: usize, cols: usize| -> Result<Tensor> {
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * 0.02).collect();
        Ok(Tensor::from_vec(v, (rows, cols), device)?)
    };
    let h = cfg.hidden_size;
    let kv = cfg.kv_heads() * cfg.head_dim();
    let qw = cfg.attention_width();
    let inter = cfg.intermediate_size;
    let mut m = HashMap::new();
    m.insert(
        "model.embed_tokens.weight".into(),
        normal(cfg.vocab_size, h)?,
    );
    for i in 0..cfg.num_hidden_layers {
        for (module, out, inp) in [
            ("q_proj", qw, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, qw),
            ("gate_proj", inter, h),
            ("up_proj", inter, h),
            ("down_proj", h, inter),
        ] {
            m.insert(
                format!("{}.weight", module_path(i, module)),
                normal(out, inp)?,
            );
        }
        m.insert(
            format!("model.layers.{i}.input_layernorm.weight"),
            Tensor::ones(h, candle_core::DType::F32, device)?,
        );
        m.insert(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            Tensor::ones(h, candle_core::DType::F32, device)?,
        );
    }
    m.insert(
        "model.norm.weight".into(),
        Tensor::ones(h, candle_core::DType::F32, device)?,
    );
    if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".into(), normal(cfg.vocab_size, h)?);
    }
    Ok(m)
}

/// Writes `config.json` and `model.safetensors` into `dir` (HF layout).
pub fn write_hf_model(
    dir: &Path,
    cfg: &LlamaConfig,
    weights: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
    crate::atomic_file::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(cfg)?.as_bytes(),
    )?;
    crate::atomic_file::save_safetensors_atomic(&dir.join("model.safetensors"), weights)
}

/// [`write_hf_model`] with `tokenizer` copied beside the weights as `tokenizer.json`: a model
/// directory that loads on its own.
pub fn write_hf_model_with_tokenizer(
    dir: &Path,
    cfg: &LlamaConfig,
    weights: &HashMap<String, Tensor>,
    tokenizer: &Path,
) -> Result<()> {
    write_hf_model(dir, cfg, weights)?;
    let copy = dir.join("tokenizer.json");
    std::fs::copy(tokenizer, &copy).map_err(|e| TrainerError::io(&copy, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiny_model_is_the_preset_the_fit_check_sizes() {
        let preset = finetune_api::ModelPreset::Tiny.architecture();
        let cfg = tiny_config(preset.vocab_size as usize);
        assert_eq!(cfg.num_parameters() as u64, preset.parameters);
        assert_eq!(cfg.intermediate_size as u32, preset.intermediate_size);
    }
}
