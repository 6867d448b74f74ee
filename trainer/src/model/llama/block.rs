//! One decoder layer: pre-norm attention and pre-norm MLP, each with its residual.

use candle_core::Tensor;

use super::attention::{Attention, LayerCache, RopeTables};
use super::mlp::Mlp;
use super::norm::rms_norm;
use super::params::ParamLoader;
use crate::Result;
use crate::model::config::LlamaConfig;
use crate::model::linear::{FwdCtx, Linear};

/// Decoder layer `model.layers.{i}`.
#[derive(Debug, Clone)]
pub(super) struct Block {
    pub(super) input_norm: Tensor,
    pub(super) post_norm: Tensor,
    pub(super) attn: Attention,
    pub(super) mlp: Mlp,
    eps: f64,
}

impl Block {
    /// Loads layer `layer`; its weights and norms are trained when `full`. The trainable
    /// tensors are registered in the order q, k, v, o, gate, up, down (each weight, then its
    /// LoRA A and B), then the two norms.
    pub(super) fn load(
        p: &mut ParamLoader<'_>,
        cfg: &LlamaConfig,
        layer: usize,
        full: bool,
    ) -> Result<Self> {
        let attn = Attention::load(p, cfg, layer, full)?;
        let mlp = Mlp::load(p, cfg, layer, full)?;
        let h = cfg.hidden_size;
        let input_norm = p.param(
            &format!("model.layers.{layer}.input_layernorm.weight"),
            &[h],
            full,
        )?;
        let post_norm = p.param(
            &format!("model.layers.{layer}.post_attention_layernorm.weight"),
            &[h],
            full,
        )?;
        Ok(Self {
            input_norm,
            post_norm,
            attn,
            mlp,
            eps: cfg.rms_norm_eps,
        })
    }

    /// The layer on `x` (b, n, hidden); see [`Attention::forward`] for `rope`, `bias` and
    /// `cache`.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        rope: RopeTables<'_>,
        bias: &Tensor,
        cache: Option<&mut LayerCache>,
        ctx: &mut FwdCtx,
    ) -> Result<Tensor> {
        let xn = rms_norm(x, &ctx.param(&self.input_norm), self.eps)?;
        let x = (x + self.attn.forward(&xn, rope, bias, cache, ctx)?)?;
        let xn = rms_norm(&x, &ctx.param(&self.post_norm), self.eps)?;
        Ok((&x + self.mlp.forward(&xn, ctx)?)?)
    }

    /// The layer's projections with their module names, in checkpoint order.
    pub(super) fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("q_proj", &self.attn.q),
            ("k_proj", &self.attn.k),
            ("v_proj", &self.attn.v),
            ("o_proj", &self.attn.o),
            ("gate_proj", &self.mlp.gate),
            ("up_proj", &self.mlp.up),
            ("down_proj", &self.mlp.down),
        ]
    }

    /// Whether any tensor of the layer is trained (a LoRA adapter, a weight or a norm).
    pub(super) fn is_trained(&self) -> bool {
        self.input_norm.is_variable()
            || self.post_norm.is_variable()
            || self
                .linears()
                .iter()
                .any(|(_, l)| l.lora.is_some() || l.weight_trained())
    }
}
