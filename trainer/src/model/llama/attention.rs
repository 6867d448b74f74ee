//! Grouped-query self-attention with rotary embeddings (HF `rotate_half` form) and an optional
//! key/value cache; the softmax is the own differentiable one.

use candle_core::Tensor;

use super::attention_core::attention_core;
use super::params::ParamLoader;
use super::rotary::rotated_heads;
use crate::Result;
use crate::model::config::LlamaConfig;
use crate::model::linear::{FwdCtx, Linear};

/// The attention projections of one decoder layer (`self_attn.{q,k,v,o}_proj`).
#[derive(Debug, Clone)]
pub(super) struct Attention {
    pub(super) q: Linear,
    pub(super) k: Linear,
    pub(super) v: Linear,
    pub(super) o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// The RoPE `(cos, sin)` tables of the positions of a forward, (n, head_dim) each.
pub(super) type RopeTables<'a> = (&'a Tensor, &'a Tensor);

/// The keys and values one layer holds for earlier positions, (1, kv_heads, len, head_dim).
pub(super) type LayerCache = Option<(Tensor, Tensor)>;

impl Attention {
    /// Loads layer `layer`'s projections (weights trained when `full`, LoRA adapters as the
    /// loader's spec says).
    pub(super) fn load(
        p: &mut ParamLoader<'_>,
        cfg: &LlamaConfig,
        layer: usize,
        full: bool,
    ) -> Result<Self> {
        let (h, qw) = (cfg.hidden_size, cfg.attention_width());
        let kv = cfg.kv_heads() * cfg.head_dim();
        Ok(Self {
            q: p.linear(layer, "q_proj", qw, h, full)?,
            k: p.linear(layer, "k_proj", kv, h, full)?,
            v: p.linear(layer, "v_proj", kv, h, full)?,
            o: p.linear(layer, "o_proj", h, qw, full)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.kv_heads(),
            head_dim: cfg.head_dim(),
        })
    }

    /// Attention output (b, n, hidden) of the normed input `xn` (b, n, hidden). `bias` is the
    /// additive bias (b or 1, 1, n, keys). With `cache`, the layer's keys and values of earlier
    /// positions come first and this call's are appended. Grouped-query heads share their K/V
    /// through a batched matmul (no copy per query head).
    pub(super) fn forward(
        &self,
        xn: &Tensor,
        (cos, sin): RopeTables<'_>,
        bias: &Tensor,
        cache: Option<&mut LayerCache>,
        ctx: &mut FwdCtx,
    ) -> Result<Tensor> {
        let (b, n, _) = xn.dims3()?;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let q = self.q.forward(xn, ctx)?;
        let k = self.k.forward(xn, ctx)?;
        let v = self.v.forward(xn, ctx)?;
        let q = rotated_heads(&q, nh, cos, sin)?;
        let k = rotated_heads(&k, nkv, cos, sin)?;
        let v = v.reshape((b, n, nkv, hd))?.transpose(1, 2)?.contiguous()?;
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
        let y = attention_core(&q, &k, &v, bias, 1.0 / (hd as f64).sqrt())?;
        self.o.forward(&y, ctx)
    }
}
