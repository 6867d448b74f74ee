//! Import of llama2.c checkpoints into Hugging Face layout (`finetune-trainer import-llama2c`).
//!
//! A llama2.c `model.bin` (the legacy format of Karpathy's llama2.c, in which its TinyStories
//! models such as `stories15M` are published) is a header of seven little-endian `i32` (width,
//! MLP width, layers, query heads, key/value heads, vocabulary size, context length; the
//! vocabulary size is negative when the classifier is stored apart from the embeddings), then
//! every weight as little-endian `f32`, each matrix in PyTorch's `(out, in)` layout:
//! embeddings, attention norms, `wq`, `wk`, `wv`, `wo`, MLP norms, `w1` (gate), `w2` (down),
//! `w3` (up), the final norm, two RoPE tables (skipped: the model recomputes them) and, when not
//! shared, the classifier.
//!
//! llama2.c rotates interleaved pairs of each head's query and key dimensions (`2i`, `2i + 1`);
//! Hugging Face Llama rotates the first half of the head against the second (`i`, `i + d/2`).
//! The import reorders the rows of `q_proj` and `k_proj` within each head
//! ([`interleaved_to_half_rows`]) so that the half rotation of the reordered rows is the reordered
//! interleaved rotation: every attention score, and so every logit, is the checkpoint's own.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::LlamaConfig;
use crate::{Result, TrainerError};

/// Bytes of the header: seven `i32`.
const HEADER_BYTES: usize = 7 * 4;

/// The header of a llama2.c checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Llama2cHeader {
    /// Model width (`dim`).
    pub dim: usize,
    /// MLP inner width (`hidden_dim`).
    pub hidden_dim: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether the classifier is the embedding matrix (a positive vocabulary size in the file).
    pub shared_classifier: bool,
    /// Context length the model was trained with.
    pub seq_len: usize,
}

impl Llama2cHeader {
    /// Reads and checks the header at the start of `bytes` (the file at `path`, for errors).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |reason: String| TrainerError::Import {
            path: path.to_path_buf(),
            reason,
        };
        let head = bytes.get(..HEADER_BYTES).ok_or_else(|| {
            bad(format!(
                "{} bytes, shorter than the {HEADER_BYTES}-byte header",
                bytes.len()
            ))
        })?;
        let field = |i: usize| {
            i32::from_le_bytes([
                head[4 * i],
                head[4 * i + 1],
                head[4 * i + 2],
                head[4 * i + 3],
            ])
        };
        const NAMES: [&str; 7] = [
            "dim",
            "hidden_dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "seq_len",
        ];
        let mut v = [0usize; 7];
        for (i, name) in NAMES.iter().enumerate() {
            let raw = field(i);
            let magnitude = raw.unsigned_abs() as usize;
            if magnitude == 0 || (raw < 0 && i != 5) {
                return Err(bad(format!("header field {name} is {raw}")));
            }
            v[i] = magnitude;
        }
        let h = Llama2cHeader {
            dim: v[0],
            hidden_dim: v[1],
            n_layers: v[2],
            n_heads: v[3],
            n_kv_heads: v[4],
            vocab_size: v[5],
            shared_classifier: field(5) > 0,
            seq_len: v[6],
        };
        if !h.dim.is_multiple_of(h.n_heads) || !(h.dim / h.n_heads).is_multiple_of(2) {
            return Err(bad(format!(
                "dim {} is not an even head width times n_heads {}",
                h.dim, h.n_heads
            )));
        }
        if !h.n_heads.is_multiple_of(h.n_kv_heads) {
            return Err(bad(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                h.n_heads, h.n_kv_heads
            )));
        }
        let expected = h.file_bytes();
        if bytes.len() != expected {
            return Err(bad(format!(
                "{} bytes, but its header ({h:?}) describes {expected}: truncated, or not a \
                 llama2.c checkpoint of the legacy format",
                bytes.len()
            )));
        }
        Ok(h)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// Width of the key and value projections.
    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim()
    }

    /// The tensors in file order: the HF name (for a per-layer tensor, the part after
    /// `model.layers.N.`), rows, columns, and whether the file holds one per layer.
    fn layout(&self) -> [(&'static str, usize, usize, bool); 11] {
        let (d, f, kv) = (self.dim, self.hidden_dim, self.kv_dim());
        [
            ("model.embed_tokens.weight", self.vocab_size, d, false),
            ("input_layernorm.weight", 1, d, true),
            ("self_attn.q_proj.weight", d, d, true),
            ("self_attn.k_proj.weight", kv, d, true),
            ("self_attn.v_proj.weight", kv, d, true),
            ("self_attn.o_proj.weight", d, d, true),
            ("post_attention_layernorm.weight", 1, d, true),
            ("mlp.gate_proj.weight", f, d, true),
            ("mlp.down_proj.weight", d, f, true),
            ("mlp.up_proj.weight", f, d, true),
            ("model.norm.weight", 1, d, false),
        ]
    }

    /// The file's size in bytes.
    pub fn file_bytes(&self) -> usize {
        let weights: usize = self
            .layout()
            .iter()
            .map(|(_, r, c, per_layer)| r * c * if *per_layer { self.n_layers } else { 1 })
            .sum();
        let rope_tables = self.seq_len * self.head_dim();
        let classifier = if self.shared_classifier {
            0
        } else {
            self.vocab_size * self.dim
        };
        HEADER_BYTES + 4 * (weights + rope_tables + classifier)
    }

    /// The Hugging Face configuration of the checkpoint. `lm_head` is written as its own tensor
    /// (a copy when the classifier is shared), so `trainLabelTokens` can train its rows without
    /// touching the embeddings.
    pub fn config(&self) -> LlamaConfig {
        // The tiny preset's Llama 2 settings, which are llama2.c's too (RMSNorm epsilon 1e-5,
        // RoPE base 10000, SiLU, `<s>` 1 and `</s>` 2, f32), in this checkpoint's shape.
        LlamaConfig {
            hidden_size: self.dim,
            intermediate_size: self.hidden_dim,
            num_hidden_layers: self.n_layers,
            num_attention_heads: self.n_heads,
            num_key_value_heads: Some(self.n_kv_heads),
            max_position_embeddings: self.seq_len,
            tie_word_embeddings: false,
            ..super::tiny::tiny_config(self.vocab_size)
        }
    }
}

/// Reorders the rows of a query or key projection `(heads * head_dim, in)` from llama2.c's
/// interleaved rotary pairs to Hugging Face's halves: within each head, row `2i + k` moves to
/// row `k * head_dim / 2 + i`.
pub fn interleaved_to_half_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / heads / 2;
    Ok(w.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Reads the llama2.c checkpoint at `path` as Hugging Face configuration and weights.
pub fn read_llama2c(path: &Path) -> Result<(LlamaConfig, HashMap<String, Tensor>)> {
    let bytes = std::fs::read(path).map_err(|e| TrainerError::io(path, e))?;
    let h = Llama2cHeader::parse(&bytes, path)?;
    let floats: Vec<f32> = bytes[HEADER_BYTES..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let mut at = 0usize;
    let mut take = |rows: usize, cols: usize| -> Result<Tensor> {
        let n = rows * cols;
        let t = Tensor::from_slice(&floats[at..at + n], (rows, cols), &Device::Cpu)?;
        at += n;
        Ok(t)
    };
    let mut weights = HashMap::new();
    for (name, rows, cols, per_layer) in h.layout() {
        if !per_layer {
            let t = take(rows, cols)?;
            let t = if rows == 1 { t.squeeze(0)? } else { t };
            weights.insert(name.to_string(), t);
            continue;
        }
        for layer in 0..h.n_layers {
            let mut t = take(rows, cols)?;
            if rows == 1 {
                t = t.squeeze(0)?;
            } else if name == "self_attn.q_proj.weight" {
                t = interleaved_to_half_rows(&t, h.n_heads)?;
            } else if name == "self_attn.k_proj.weight" {
                t = interleaved_to_half_rows(&t, h.n_kv_heads)?;
            }
            weights.insert(format!("model.layers.{layer}.{name}"), t);
        }
    }
    // The RoPE tables llama2.c stores (real and imaginary parts) are recomputed by the model.
    let _ = take(h.seq_len, h.head_dim())?;
    let lm_head = if h.shared_classifier {
        weights
            .get("model.embed_tokens.weight")
            .cloned()
            .ok_or_else(|| TrainerError::Import {
                path: path.to_path_buf(),
                reason: "no embeddings read".into(),
            })?
    } else {
        take(h.vocab_size, h.dim)?
    };
    weights.insert("lm_head.weight".into(), lm_head);
    Ok((h.config(), weights))
}
