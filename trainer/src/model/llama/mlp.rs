//! The gated feed-forward network: `down(act(gate(x)) · up(x))`.

use candle_core::Tensor;

use super::gated::silu_product;
use super::params::ParamLoader;
use crate::Result;
use crate::model::config::LlamaConfig;
use crate::model::linear::{FwdCtx, Linear};

/// The MLP of one decoder layer (`mlp.{gate,up,down}_proj`) and its activation.
#[derive(Debug, Clone)]
pub(super) struct Mlp {
    pub(super) gate: Linear,
    pub(super) up: Linear,
    pub(super) down: Linear,
    act: Activation,
}

/// The gate's activation, from `config.json`'s `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    /// `silu` (Llama's own; also what any other name falls back to).
    Silu,
    /// `gelu`: the exact, erf form.
    GeluErf,
    /// `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
}

impl Activation {
    fn from_hf_name(name: &str) -> Self {
        match name {
            "gelu" => Self::GeluErf,
            "gelu_pytorch_tanh" => Self::GeluTanh,
            "relu" => Self::Relu,
            _ => Self::Silu,
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::GeluErf => x.gelu_erf()?,
            Self::GeluTanh => x.gelu()?,
            Self::Relu => x.relu()?,
            Self::Silu => x.silu()?,
        })
    }
}

impl Mlp {
    /// Loads layer `layer`'s MLP (weights trained when `full`, LoRA adapters as the loader's
    /// spec says).
    pub(super) fn load(
        p: &mut ParamLoader<'_>,
        cfg: &LlamaConfig,
        layer: usize,
        full: bool,
    ) -> Result<Self> {
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate: p.linear(layer, "gate_proj", inter, h, full)?,
            up: p.linear(layer, "up_proj", inter, h, full)?,
            down: p.linear(layer, "down_proj", h, inter, full)?,
            act: Activation::from_hf_name(&cfg.hidden_act),
        })
    }

    /// The MLP's output for the normed input `xn` (b, n, hidden).
    pub(super) fn forward(&self, xn: &Tensor, ctx: &mut FwdCtx) -> Result<Tensor> {
        let (gate, up) = (self.gate.forward(xn, ctx)?, self.up.forward(xn, ctx)?);
        let product = match self.act {
            Activation::Silu => silu_product(&gate, &up)?,
            other => (other.apply(&gate)? * up)?,
        };
        self.down.forward(&product, ctx)
    }
}
