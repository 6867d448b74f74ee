//! The Llama decoder built from differentiable candle ops only.
//!
//! RMSNorm, rotary embeddings (HF `rotate_half` form) and softmax are written with primitive ops
//! that have a backward pass; candle's fused kernels (`rms_norm`, `rope`, `softmax_last_dim`) are
//! deliberately not used because they silently cut the gradient.

use candle_core::{D, DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::config::LlamaConfig;
use super::head_rows::{HeadRows, PEFT_HEAD_ROWS_NAME};
use super::linear::FwdCtx;
use super::lora::{ALL_TARGETS, LoraSettings, module_path};
use super::placement::LayerDevices;
use super::rope::Rope;
use super::weights::Weights;
use crate::{Result, TrainerError};

mod attention;
mod attention_core;
mod block;
mod gated;
mod head;
mod mlp;
mod norm;
mod params;
mod positions;
mod recompute;
mod rotary;

use attention::LayerCache;
use block::Block;
pub use head::HeadInput;
use norm::rms_norm;
use params::ParamLoader;
use positions::{PositionTables, padding_bias};
pub use recompute::{Gradients, LossAndGrads};

/// What to train.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainableSpec {
    /// Nothing (inference).
    Frozen,
    /// LoRA adapters on the target modules.
    Lora(LoraSettings),
    /// Full fine-tuning of the selected layers (all when `None`), optionally the embeddings,
    /// the final norm and the LM head.
    Full {
        /// Decoder layers whose weights are trained.
        layers: Option<Vec<usize>>,
        /// Also train `model.embed_tokens`, `model.norm` and `lm_head`.
        embeddings_and_head: bool,
    },
}

/// A Llama causal LM with named trainable tensors.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    /// Trained rows of the frozen `lm_head` (LoRA with trainable label tokens).
    head_rows: Option<HeadRows>,
    /// The device of each layer (one for all unless the layers are split over GPUs).
    placement: LayerDevices,
    dtype: DType,
    trainable: Vec<(String, Var)>,
    rope: Rope,
    /// RoPE tables and the causal bias for the longest sequence seen, on each device of the
    /// placement (by its index).
    position_tables: Mutex<Vec<Option<PositionTables>>>,
}

/// The RoPE tables and the attention bias of a batch, on each device of the placement.
type AttentionInputs = Vec<(Tensor, Tensor, Tensor)>;

/// The rows `rows` (flat positions) of the hidden states `hidden` (n, hidden), the positions
/// moved to `hidden`'s device first (the last layer's when the layers are split over GPUs).
pub fn select_rows(hidden: &Tensor, rows: &Tensor) -> Result<Tensor> {
    Ok(hidden.index_select(&rows.to_device(hidden.device())?, 0)?)
}

/// Keys and values of the positions a sequence has been run through, per decoder layer, for
/// [`Llama::hidden_cached`]. Cloning is cheap (tensors are shared), so candidates that continue
/// one prefix each start from a clone.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Llama {
    /// Builds the model from loaded weights on one device; trainable tensors become Vars
    /// according to `spec`. LoRA matrices are initialised from `seed` (A Kaiming-uniform, B
    /// zero).
    pub fn from_weights(
        cfg: &LlamaConfig,
        w: Weights,
        spec: &TrainableSpec,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let placement = LayerDevices::single(device, cfg.num_hidden_layers);
        Self::from_weights_placed(cfg, w, spec, seed, &placement)
    }

    /// As [`Llama::from_weights`], each layer (with its weights, adapters and trained tensors)
    /// on its device of `placement`, the embeddings on the first layer's, the final norm and
    /// LM head on the last layer's. Weights are moved there when loaded elsewhere.
    pub fn from_weights_placed(
        cfg: &LlamaConfig,
        mut w: Weights,
        spec: &TrainableSpec,
        seed: u64,
        placement: &LayerDevices,
    ) -> Result<Self> {
        cfg.validate()?;
        if placement.layers() != cfg.num_hidden_layers {
            return Err(TrainerError::Config(format!(
                "the layer placement covers {} layers; the model has {}",
                placement.layers(),
                cfg.num_hidden_layers
            )));
        }
        let rope = cfg.rope()?;
        let h = cfg.hidden_size;
        let full_layers = |i: usize| match spec {
            TrainableSpec::Full { layers, .. } => layers.as_ref().is_none_or(|l| l.contains(&i)),
            _ => false,
        };
        let head_trainable = matches!(
            spec,
            TrainableSpec::Full {
                embeddings_and_head: true,
                ..
            }
        );
        let mut p = ParamLoader::new(&mut w, spec, seed, placement);
        let embed = p.param(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, h],
            head_trainable,
        )?;
        let dtype = embed.dtype();
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(&mut p, cfg, i, full_layers(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = p.param("model.norm.weight", &[h], head_trainable)?;
        let lm_head = if cfg.tie_word_embeddings && !p.contains("lm_head.weight") {
            embed.clone()
        } else {
            p.param("lm_head.weight", &[cfg.vocab_size, h], head_trainable)?
        };
        let mut trainable = p.trainable;
        let mut head_rows = None;
        if let TrainableSpec::Lora(ls) = spec {
            ls.validate()?;
            if trainable.is_empty() {
                return Err(TrainerError::Config(
                    "LoRA selects no module (check targetModules and layers)".into(),
                ));
            }
            for m in &ls.target_modules {
                if !ALL_TARGETS.contains(&m.as_str()) {
                    return Err(TrainerError::Config(format!("unknown module {m}")));
                }
            }
            if !ls.head_token_ids.is_empty() {
                if cfg.tie_word_embeddings {
                    return Err(TrainerError::Config(
                        "trainable label tokens need an lm_head of its own; this model ties it \
                         to the embeddings (turn off method.lora.trainLabelTokens)"
                            .into(),
                    ));
                }
                let rows = HeadRows::new(&lm_head, &ls.head_token_ids)?;
                trainable.push((PEFT_HEAD_ROWS_NAME.to_string(), rows.var().clone()));
                head_rows = Some(rows);
            }
        }
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            head_rows,
            placement: placement.clone(),
            dtype,
            trainable,
            rope,
            position_tables: Mutex::new(placement.devices().iter().map(|_| None).collect()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The dtype of the weights (and activations) of the run.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the input and the embeddings (the only device unless the layers are
    /// split).
    pub fn device(&self) -> &Device {
        self.placement.input()
    }

    /// The device of each layer.
    pub fn placement(&self) -> &LayerDevices {
        &self.placement
    }

    /// Trainable tensors with their names (PEFT names for LoRA, HF names for full training).
    pub fn trainable(&self) -> &[(String, Var)] {
        &self.trainable
    }

    /// Number of trainable scalars.
    pub fn trainable_count(&self) -> usize {
        self.trainable.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The rotary embedding in use.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The `(cos, sin)` RoPE tables (s, head_dim) in the model's dtype and the causal bias
    /// (1, 1, s, s) in f32, on each device of the placement. They are built on each device for
    /// the longest length seen so far and narrowed for shorter batches, so memory stays that of
    /// one length.
    fn position_tables(&self, s: usize) -> Result<AttentionInputs> {
        let mut cache = self
            .position_tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::with_capacity(cache.len());
        for (slot, device) in cache.iter_mut().zip(self.placement.devices()) {
            let tables = match slot {
                Some(t) if t.len >= s => t,
                _ => slot.insert(PositionTables::build(&self.rope, s, self.dtype, device)?),
            };
            out.push((
                tables.cos.narrow(0, 0, s)?,
                tables.sin.narrow(0, 0, s)?,
                tables.causal.narrow(2, 0, s)?.narrow(3, 0, s)?,
            ));
        }
        Ok(out)
    }

    /// Final hidden states (b, s, hidden) after the last norm. `ids` is (b, s) u32; `mask` holds
    /// 1 for real tokens and 0 for right padding, per row.
    pub fn hidden(
        &self,
        ids: &Tensor,
        mask: Option<&[Vec<u8>]>,
        ctx: &mut FwdCtx,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let mut x = self.embed_ids(ids, ctx)?;
        let inputs = self.attention_inputs(mask, b, s)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let (cos, sin, bias) = self.layer_inputs(&inputs, i)?;
            x = blk.forward(&self.to_layer(&x, i)?, (cos, sin), bias, None, ctx)?;
        }
        rms_norm(&x, &ctx.param(&self.norm), self.cfg.rms_norm_eps)
    }

    /// `x` on layer `i`'s device (itself when already there; a recorded op otherwise, whose
    /// backward moves the gradient back).
    fn to_layer(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        Ok(x.to_device(self.placement.of_layer(i))?)
    }

    /// Layer `i`'s RoPE tables and attention bias, from those of every device.
    fn layer_inputs<'a>(
        &self,
        inputs: &'a AttentionInputs,
        i: usize,
    ) -> Result<(&'a Tensor, &'a Tensor, &'a Tensor)> {
        let (cos, sin, bias) = inputs
            .get(self.placement.index_of_layer(i))
            .ok_or_else(|| TrainerError::Config(format!("no attention inputs for layer {i}")))?;
        Ok((cos, sin, bias))
    }

    /// Final hidden states (n, hidden) of `ids`, the tokens at positions `cache.len()..` of one
    /// sequence, attending to the keys and values `cache` holds for the earlier positions (which
    /// it then extends). No backward graph. Equal to the last n rows of [`Llama::hidden`] of the
    /// whole sequence.
    pub fn hidden_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let n = ids.len();
        let start = cache.len;
        if cache.layers.len() != self.blocks.len() {
            cache.layers = vec![None; self.blocks.len()];
        }
        let mut ctx = FwdCtx::eval();
        let ids = Tensor::new(ids, self.device())?.unsqueeze(0)?;
        let mut x = self.embed_ids(&ids, &ctx)?;
        let inputs = self
            .position_tables(start + n)?
            .into_iter()
            .map(|(cos, sin, causal)| {
                Ok((
                    cos.narrow(0, start, n)?,
                    sin.narrow(0, start, n)?,
                    causal.narrow(2, start, n)?,
                ))
            })
            .collect::<Result<AttentionInputs>>()?;
        for (i, (blk, slot)) in self.blocks.iter().zip(cache.layers.iter_mut()).enumerate() {
            let (cos, sin, bias) = self.layer_inputs(&inputs, i)?;
            x = blk.forward(
                &self.to_layer(&x, i)?,
                (cos, sin),
                bias,
                Some(slot),
                &mut ctx,
            )?;
        }
        cache.len = start + n;
        let x = rms_norm(&x, &ctx.param(&self.norm), self.cfg.rms_norm_eps)?;
        Ok(x.squeeze(0)?)
    }

    /// The RoPE tables of `s` positions and the attention bias (causal, plus the right padding
    /// of `mask`) of a (b, s) batch.
    fn attention_inputs(
        &self,
        mask: Option<&[Vec<u8>]>,
        b: usize,
        s: usize,
    ) -> Result<AttentionInputs> {
        let pad = padding_bias(mask, b, s, self.device())?;
        self.position_tables(s)?
            .into_iter()
            .map(|(cos, sin, causal)| {
                let bias = match &pad {
                    Some(pad) => causal.broadcast_add(&pad.to_device(causal.device())?)?,
                    None => causal,
                };
                Ok((cos, sin, bias))
            })
            .collect()
    }

    fn embed_ids(&self, ids: &Tensor, ctx: &FwdCtx) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let embed = ctx.param(&self.embed);
        Ok(embed
            .index_select(&ids.flatten_all()?.to_device(embed.device())?, 0)?
            .reshape((b, s, self.cfg.hidden_size))?)
    }

    /// Logits (n, vocab) in f32 for the given rows of a (n, hidden) matrix.
    pub fn project(&self, hidden_rows: &Tensor, ctx: &FwdCtx) -> Result<Tensor> {
        let w = ctx.param(&self.lm_head);
        let logits = ctx.matmul_t(hidden_rows, &w)?;
        let logits = match (&self.head_rows, ctx.base_only) {
            (Some(rows), false) => rows.apply(hidden_rows, &logits, ctx)?,
            _ => logits,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// All-position logits (b, s, vocab), f32.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: Option<&[Vec<u8>]>,
        ctx: &mut FwdCtx,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let hs = self.hidden(ids, mask, ctx)?;
        let logits = self.project(&hs.reshape((b * s, self.cfg.hidden_size))?, ctx)?;
        Ok(logits.reshape((b, s, self.cfg.vocab_size))?)
    }

    /// Logits only at flat positions `rows` (indices into b·s), as (rows, vocab).
    pub fn logits_at(
        &self,
        ids: &Tensor,
        mask: Option<&[Vec<u8>]>,
        rows: &Tensor,
        ctx: &mut FwdCtx,
    ) -> Result<Tensor> {
        self.project(&self.hidden_at(ids, mask, rows, ctx)?, ctx)
    }

    /// Final hidden states only at flat positions `rows` (indices into b·s), as (rows, hidden).
    fn hidden_at(
        &self,
        ids: &Tensor,
        mask: Option<&[Vec<u8>]>,
        rows: &Tensor,
        ctx: &mut FwdCtx,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let hs = self.hidden(ids, mask, ctx)?;
        let flat = hs.reshape((b * s, self.cfg.hidden_size))?;
        select_rows(&flat, rows)
    }

    /// All base weights with adapters merged, in HF names (for export or the peer check).
    pub fn merged_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        m.insert("model.embed_tokens.weight".to_string(), self.embed.detach());
        m.insert("model.norm.weight".to_string(), self.norm.detach());
        let lm_head = match &self.head_rows {
            Some(rows) => rows.merge(&self.lm_head)?,
            None => self.lm_head.detach(),
        };
        m.insert("lm_head.weight".to_string(), lm_head);
        for (i, blk) in self.blocks.iter().enumerate() {
            for (module, lin) in blk.linears() {
                m.insert(
                    format!("{}.weight", module_path(i, module)),
                    lin.merged_weight()?,
                );
            }
            m.insert(
                format!("model.layers.{i}.input_layernorm.weight"),
                blk.input_norm.detach(),
            );
            m.insert(
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                blk.post_norm.detach(),
            );
        }
        Ok(m)
    }

    /// Current values of the trainable tensors, by name.
    pub fn trainable_tensors(&self) -> HashMap<String, Tensor> {
        self.trainable
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// Overwrites the trainable tensors from a map (resume, or loading an adapter). Every
    /// trainable name must be present with the right shape.
    pub fn load_trainable(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.trainable {
            let t = tensors.get(name).ok_or_else(|| TrainerError::Weight {
                name: name.clone(),
                reason: "missing from checkpoint/adapter".into(),
            })?;
            if t.dims() != var.dims() {
                return Err(TrainerError::Weight {
                    name: name.clone(),
                    reason: format!("shape {:?}, expected {:?}", t.dims(), var.dims()),
                });
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Greedy decoding of up to `max_new` tokens after `prompt`, with a KV cache. Past
    /// `max_position_embeddings` tokens it keeps the last window of that size (recomputed).
    pub fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new: usize,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        let window = self.cfg.max_position_embeddings.max(1);
        let mut ids = prompt.to_vec();
        let mut out = Vec::new();
        let mut cache = KvCache::new();
        let mut pending = ids[ids.len().saturating_sub(window)..].to_vec();
        for _ in 0..max_new {
            if cache.len() + pending.len() > window {
                cache = KvCache::new();
                pending = ids[ids.len().saturating_sub(window)..].to_vec();
            }
            if pending.is_empty() {
                break;
            }
            let hidden = self.hidden_cached(&pending, &mut cache)?;
            let last = hidden.narrow(0, pending.len() - 1, 1)?;
            let logits = self.project(&last, &FwdCtx::eval())?;
            let next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let Some(&tok) = next.first() else { break };
            if Some(tok) == eos {
                break;
            }
            ids.push(tok);
            out.push(tok);
            pending = vec![tok];
        }
        Ok(out)
    }
}
