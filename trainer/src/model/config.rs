//! Serde mirror of a Hugging Face Llama `config.json`.

use serde::{Deserialize, Serialize};
use std::path::Path;

use super::rope::{Rope, RopeParameters};
use crate::{Result, TrainerError};

fn default_act() -> String {
    "silu".to_string()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_max_pos() -> usize {
    4096
}

/// The fields of HF `LlamaForCausalLM` `config.json` that the model uses; unknown fields are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA, e.g. 8 for 70B); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Per-head width; `hidden_size / num_attention_heads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Rotary base frequency (classic layout; see [`LlamaConfig::rope`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Rotary scaling (classic layout), e.g. `{"rope_type": "llama3", "factor": 8, …}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    /// Base frequency and scaling together (the layout transformers 5 writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// MLP activation (`silu`, `gelu`, `relu`).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Maximum positions.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Everything else in the file, preserved on write.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl LlamaConfig {
    /// Key/value heads (GQA aware).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Width of all query heads together (`q_proj`'s output, `o_proj`'s input).
    pub fn attention_width(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    /// The rotary embedding, from either layout of the config.
    pub fn rope(&self) -> Result<Rope> {
        Rope::resolve(
            self.rope_theta,
            self.rope_scaling.as_ref(),
            self.rope_parameters.as_ref(),
            self.head_dim(),
            self.max_position_embeddings,
        )
    }

    /// Checks divisibility constraints.
    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || (self.head_dim.is_none()
                && !self.hidden_size.is_multiple_of(self.num_attention_heads))
            || self.head_dim() == 0
            || self.kv_heads() == 0
            || !self.num_attention_heads.is_multiple_of(self.kv_heads())
            || !self.head_dim().is_multiple_of(2)
        {
            return Err(TrainerError::Config(format!(
                "inconsistent heads: hidden {} heads {} kv heads {}",
                self.hidden_size,
                self.num_attention_heads,
                self.kv_heads()
            )));
        }
        match self.hidden_act.as_str() {
            "silu" | "gelu" | "gelu_pytorch_tanh" | "relu" => {}
            other => {
                return Err(TrainerError::Config(format!(
                    "unsupported hidden_act {other}"
                )));
            }
        }
        self.rope().map(|_| ())
    }

    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Number of parameters (untied lm_head unless tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let kv = self.kv_heads() * self.head_dim();
        let q = self.attention_width();
        let per_layer = h * q * 2 + h * kv * 2 + 3 * h * self.intermediate_size + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * per_layer + h + head
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama2_70b_config_with_gqa() {
        let json = r#"{"architectures":["LlamaForCausalLM"],"bos_token_id":1,"eos_token_id":2,
        "hidden_act":"silu","hidden_size":8192,"intermediate_size":28672,"max_position_embeddings":4096,
        "num_attention_heads":64,"num_hidden_layers":80,"num_key_value_heads":8,"pretraining_tp":1,
        "rms_norm_eps":1e-05,"rope_scaling":null,"tie_word_embeddings":false,"torch_dtype":"float16","vocab_size":32000}"#;
        let c: LlamaConfig = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        assert_eq!(c.kv_heads(), 8);
        assert_eq!(c.head_dim(), 128);
        assert_eq!(c.rope().unwrap().theta, 10_000.0);
        assert_eq!(c.num_parameters(), 68_976_648_192);
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["torch_dtype"], "float16");
    }

    #[test]
    fn seven_b_parameter_count() {
        let json = r#"{"hidden_size":4096,"intermediate_size":11008,"num_attention_heads":32,
        "num_hidden_layers":32,"vocab_size":32000}"#;
        let c: LlamaConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.num_parameters(), 6_738_415_616);
    }

    #[test]
    fn every_activation_of_the_api_is_one_the_model_runs() {
        let json = r#"{"hidden_size":64,"intermediate_size":128,"num_attention_heads":4,
        "num_hidden_layers":1,"vocab_size":300}"#;
        for a in finetune_api::Activation::ALL {
            let mut c: LlamaConfig = serde_json::from_str(json).unwrap();
            c.hidden_act = a.hf_name();
            assert!(c.validate().is_ok(), "{a:?} -> {:?}", c.hidden_act);
        }
    }
}
