//! The Llama decoder built from differentiable candle ops only.
//!
//! RMSNorm, rotary embeddings (HF `rotate_half` form) and softmax are written with primitive ops
//! that have a backward pass; candle's fused kernels (`rms_norm`, `rope`, `softmax_last_dim`) are
//! deliberately not used because they silently cut the gradient.

use candle_core::{D, DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::config::LlamaConfig;
use super::linear::{FwdCtx, Linear, LoraAdapter};
use super::lora::{ALL_TARGETS, LoraSettings, module_path, peft_name};
use super::rope::Rope;
use super::softmax::biased_softmax;
use super::weights::Weights;
use crate::rng::Rng;
use crate::{Result, TrainerError};

mod recompute;
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

#[derive(Debug, Clone)]
struct Block {
    input_norm: Tensor,
    post_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A Llama causal LM with named trainable tensors.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    device: Device,
    dtype: DType,
    trainable: Vec<(String, Var)>,
    rope: Rope,
    /// RoPE tables and the causal bias for the longest sequence seen, on the device.
    position_tables: Mutex<Option<PositionTables>>,
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    let y = x.broadcast_mul(&inv)?.to_dtype(dtype)?;
    Ok(y.broadcast_mul(w)?)
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok((x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?)?)
}

/// Keys and values of the positions a sequence has been run through, per decoder layer, for
/// [`Llama::hidden_cached`]. Cloning is cheap (tensors are shared), so candidates that continue
/// one prefix each start from a clone.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
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

/// Per-position tensors shared by every forward up to `len` tokens.
#[derive(Debug)]
struct PositionTables {
    len: usize,
    cos: Tensor,
    sin: Tensor,
    causal: Tensor,
}

impl PositionTables {
    fn build(rope: &Rope, len: usize, dtype: DType, device: &Device) -> Result<Self> {
        let hd = rope.head_dim;
        let (cos, sin) = rope.tables(len);
        let causal: Vec<f32> = (0..len * len)
            .map(|k| {
                if k % len > k / len {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Self {
            len,
            cos: Tensor::from_vec(cos, (len, hd), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (len, hd), device)?.to_dtype(dtype)?,
            causal: Tensor::from_vec(causal, (1, 1, len, len), device)?,
        })
    }
}

/// The additive bias of right-padded keys, (b, 1, 1, s): `-inf` where a row's mask is 0 (the
/// first position is never masked, so a row always attends to something); `None` without padding.
fn padding_bias(
    mask: Option<&[Vec<u8>]>,
    b: usize,
    s: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    let Some(mask) = mask else { return Ok(None) };
    let mut v = vec![0f32; b * s];
    let mut any = false;
    for (bi, row) in v.chunks_mut(s).enumerate() {
        for (j, x) in row.iter_mut().enumerate() {
            let real = mask
                .get(bi)
                .is_none_or(|m| m.get(j).copied().unwrap_or(0) != 0);
            if !real && j != 0 {
                *x = f32::NEG_INFINITY;
                any = true;
            }
        }
    }
    Ok(if any {
        Some(Tensor::from_vec(v, (b, 1, 1, s), device)?)
    } else {
        None
    })
}

fn make_param(
    trainable: &mut Vec<(String, Var)>,
    name: &str,
    t: Tensor,
    train: bool,
) -> Result<Tensor> {
    if train {
        let var = Var::from_tensor(&t)?;
        let tensor = var.as_tensor().clone();
        trainable.push((name.to_string(), var));
        Ok(tensor)
    } else {
        Ok(t)
    }
}

impl Llama {
    /// Builds the model from loaded weights; trainable tensors become Vars according to `spec`.
    /// LoRA matrices are initialised from `seed` (A Kaiming-uniform, B zero).
    pub fn from_weights(
        cfg: &LlamaConfig,
        mut w: Weights,
        spec: &TrainableSpec,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let rope = cfg.rope()?;
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let qw = cfg.attention_width();
        let kv = cfg.kv_heads() * hd;
        let inter = cfg.intermediate_size;
        let mut trainable: Vec<(String, Var)> = Vec::new();
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
        let embed_t = w.take("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let dtype = embed_t.dtype();
        let embed = make_param(
            &mut trainable,
            "model.embed_tokens.weight",
            embed_t,
            head_trainable,
        )?;
        let mut lora_rng = Rng::derive(seed, 0x10A);
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let full = full_layers(i);
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let mut lin = |module: &str, out: usize, inp: usize| -> Result<Linear> {
                let name = format!("{}.weight", module_path(i, module));
                let t = w.take(&name, &[out, inp])?;
                let weight = make_param(&mut trainable, &name, t, full)?;
                let mut l = Linear::new(weight);
                if let TrainableSpec::Lora(ls) = spec {
                    let layer_ok = ls.layers.as_ref().is_none_or(|v| v.contains(&i));
                    if layer_ok && ls.target_modules.iter().any(|m| m == module) {
                        let bound = (6.0f64 / inp as f64).sqrt() as f32 / 5f32.sqrt();
                        // Kaiming-uniform with a = sqrt(5), as torch.nn.Linear and PEFT use.
                        let a: Vec<f32> = (0..ls.rank * inp)
                            .map(|_| (lora_rng.next_f32() * 2.0 - 1.0) * bound)
                            .collect();
                        let a = Var::from_tensor(&Tensor::from_vec(a, (ls.rank, inp), device)?)?;
                        let b = Var::zeros((out, ls.rank), DType::F32, device)?;
                        trainable.push((peft_name(i, module, 'A'), a.clone()));
                        trainable.push((peft_name(i, module, 'B'), b.clone()));
                        l.lora = Some(LoraAdapter {
                            a,
                            b,
                            scale: ls.scale(),
                            dropout: ls.dropout,
                        });
                    }
                }
                Ok(l)
            };
            let q = lin("q_proj", qw, h)?;
            let k = lin("k_proj", kv, h)?;
            let v = lin("v_proj", kv, h)?;
            let o = lin("o_proj", h, qw)?;
            let gate = lin("gate_proj", inter, h)?;
            let up = lin("up_proj", inter, h)?;
            let down = lin("down_proj", h, inter)?;
            let n1 = p("input_layernorm.weight");
            let n2 = p("post_attention_layernorm.weight");
            let input_norm = w.take(&n1, &[h])?;
            let input_norm = make_param(&mut trainable, &n1, input_norm, full)?;
            let post_norm = w.take(&n2, &[h])?;
            let post_norm = make_param(&mut trainable, &n2, post_norm, full)?;
            blocks.push(Block {
                input_norm,
                post_norm,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        let norm = w.take("model.norm.weight", &[h])?;
        let norm = make_param(&mut trainable, "model.norm.weight", norm, head_trainable)?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            embed.clone()
        } else {
            let t = w.take("lm_head.weight", &[cfg.vocab_size, h])?;
            make_param(&mut trainable, "lm_head.weight", t, head_trainable)?
        };
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
        }
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            device: device.clone(),
            dtype,
            trainable,
            rope,
            position_tables: Mutex::new(None),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
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
    /// (1, 1, s, s) in f32. They are built on the device for the longest length seen so far and
    /// narrowed for shorter batches, so memory stays that of one length.
    fn position_tables(&self, s: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let mut cache = self
            .position_tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let built = cache.as_ref().filter(|t| t.len >= s);
        let tables = match built {
            Some(t) => t,
            None => cache.insert(PositionTables::build(
                &self.rope,
                s,
                self.dtype,
                &self.device,
            )?),
        };
        Ok((
            tables.cos.narrow(0, 0, s)?,
            tables.sin.narrow(0, 0, s)?,
            tables.causal.narrow(2, 0, s)?.narrow(3, 0, s)?,
        ))
    }

    fn act(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.hidden_act.as_str() {
            "gelu" => x.gelu_erf()?,
            "gelu_pytorch_tanh" => x.gelu()?,
            "relu" => x.relu()?,
            _ => x.silu()?,
        })
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
        let (cos, sin, bias) = self.attention_inputs(mask, b, s)?;
        for blk in &self.blocks {
            x = self.layer(blk, &x, (&cos, &sin), &bias, None, ctx)?;
        }
        rms_norm(&x, &ctx.param(&self.norm), self.cfg.rms_norm_eps)
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
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed_ids(&ids, &ctx)?;
        let (cos, sin, causal) = self.position_tables(start + n)?;
        let cos = cos.narrow(0, start, n)?;
        let sin = sin.narrow(0, start, n)?;
        let bias = causal.narrow(2, start, n)?;
        for (blk, slot) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = self.layer(blk, &x, (&cos, &sin), &bias, Some(slot), &mut ctx)?;
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
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (cos, sin, causal) = self.position_tables(s)?;
        let bias = match padding_bias(mask, b, s, &self.device)? {
            Some(pad) => causal.broadcast_add(&pad)?,
            None => causal,
        };
        Ok((cos, sin, bias))
    }

    fn embed_ids(&self, ids: &Tensor, ctx: &FwdCtx) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let embed = ctx.param(&self.embed);
        Ok(embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, self.cfg.hidden_size))?)
    }

    /// One decoder layer on `x` (b, n, hidden). `rope` holds the (n, head_dim) tables of the
    /// n positions, `bias` the additive attention bias (b or 1, 1, n, keys). With `cache`, the
    /// layer's keys and values of earlier positions come first and this call's are appended.
    /// Grouped-query heads share their K/V through a batched matmul (no copy per query head).
    fn layer(
        &self,
        blk: &Block,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        bias: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        ctx: &mut FwdCtx,
    ) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let nh = self.cfg.num_attention_heads;
        let nkv = self.cfg.kv_heads();
        let hd = self.cfg.head_dim();
        let rep = nh / nkv;
        let eps = self.cfg.rms_norm_eps;
        let xn = rms_norm(x, &ctx.param(&blk.input_norm), eps)?;
        let q = blk.q.forward(&xn, ctx)?;
        let k = blk.k.forward(&xn, ctx)?;
        let v = blk.v.forward(&xn, ctx)?;
        let q = q.reshape((b, n, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, n, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, n, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let kv = match slot.take() {
                    None => (k, v),
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                };
                *slot = Some(kv.clone());
                kv
            }
        };
        let keys = k.dim(2)?;
        // Query heads kv·rep … kv·rep + rep − 1 share key/value head kv: fold them into rows.
        let qg = q.reshape((b, nkv, rep * n, hd))?;
        // Scores in the model's dtype (the GEMM accumulates in f32); the softmax widens each row
        // internally and keeps only its bf16 output, so no f32 heads × s × s copy stays alive.
        let scores = qg.matmul(&k.t()?)?.reshape((b, nh, n, keys))?;
        let att = biased_softmax(&scores, bias, 1.0 / (hd as f64).sqrt())?;
        let y = att
            .reshape((b, nkv, rep * n, keys))?
            .matmul(&v)?
            .reshape((b, nh, n, hd))?
            .transpose(1, 2)?
            .reshape((b, n, nh * hd))?;
        let y = blk.o.forward(&y, ctx)?;
        let x = (x + y)?;
        let xn = rms_norm(&x, &ctx.param(&blk.post_norm), eps)?;
        let g = self.act(&blk.gate.forward(&xn, ctx)?)?;
        let u = blk.up.forward(&xn, ctx)?;
        let y = blk.down.forward(&(g * u)?, ctx)?;
        Ok((x + y)?)
    }

    /// Logits (n, vocab) in f32 for the given rows of a (n, hidden) matrix.
    pub fn project(&self, hidden_rows: &Tensor, ctx: &FwdCtx) -> Result<Tensor> {
        let w = ctx.param(&self.lm_head);
        Ok(ctx.matmul_t(hidden_rows, &w)?.to_dtype(DType::F32)?)
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
        let (b, s) = ids.dims2()?;
        let hs = self.hidden(ids, mask, ctx)?;
        let flat = hs.reshape((b * s, self.cfg.hidden_size))?;
        let picked = flat.index_select(rows, 0)?;
        self.project(&picked, ctx)
    }

    /// All base weights with adapters merged, in HF names (for export or the peer check).
    pub fn merged_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        m.insert("model.embed_tokens.weight".to_string(), self.embed.detach());
        m.insert("model.norm.weight".to_string(), self.norm.detach());
        m.insert("lm_head.weight".to_string(), self.lm_head.detach());
        for (i, blk) in self.blocks.iter().enumerate() {
            for (module, lin) in [
                ("q_proj", &blk.q),
                ("k_proj", &blk.k),
                ("v_proj", &blk.v),
                ("o_proj", &blk.o),
                ("gate_proj", &blk.gate),
                ("up_proj", &blk.up),
                ("down_proj", &blk.down),
            ] {
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
            var.set(&t.to_dtype(var.dtype())?.to_device(&self.device)?)?;
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
