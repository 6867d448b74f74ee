//! A linear layer with a frozen or trainable weight and an optional LoRA adapter.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor, Var};
use finetune_api::BaseQuantization;

use super::dropout::{CpuDropout, RowShard, dropout};
use super::frozen::{FrozenWeight, frozen_matmul, quantized_matmul};
use super::lora_node::lora_projection;
use crate::Result;
use crate::rng::Rng;

/// Per-forward context: training behaviour, whether to build the backward graph, and the
/// dropout stream.
#[derive(Debug, Default)]
pub struct FwdCtx {
    /// Training behaviour: LoRA dropout is applied (when [`FwdCtx::dropout_rng`] is set).
    pub train: bool,
    /// Build the backward graph: trainable tensors enter the ops as themselves. When false they
    /// are detached, so no op records its inputs.
    pub graph: bool,
    /// Random stream for LoRA dropout; dropout is applied only when training and this is set.
    pub dropout_rng: Option<Rng>,
    /// Multiply frozen weights with candle's plain `matmul`, whose backward also computes the
    /// (unused) weight gradient: the path [`frozen_matmul`] replaces, kept for equality tests.
    pub reference_matmul: bool,
    /// The base model's forward: LoRA adapters and trained `lm_head` rows are left out (the
    /// reference distribution of the forgetting penalty).
    pub base_only: bool,
    /// The rows of a batch this forward computes, when a CPU worker computes a share of it: its
    /// dropout masks are the whole batch's at those rows.
    pub shard: Option<RowShard>,
}

impl FwdCtx {
    /// Forward pass for training.
    pub fn train(dropout_rng: Option<Rng>) -> Self {
        Self {
            train: true,
            graph: true,
            dropout_rng,
            reference_matmul: false,
            base_only: false,
            shard: None,
        }
    }

    /// Forward pass without a backward graph (evaluation, generation).
    pub fn eval() -> Self {
        Self {
            train: false,
            graph: false,
            dropout_rng: None,
            reference_matmul: false,
            base_only: false,
            shard: None,
        }
    }

    /// The frozen base model's forward, without a backward graph: adapters and trained head
    /// rows left out.
    pub fn base_model() -> Self {
        Self {
            base_only: true,
            ..Self::eval()
        }
    }

    /// This pass with training behaviour but no backward graph: the first forward of activation
    /// checkpointing, whose layers are recomputed with the graph in the backward.
    pub fn without_graph(&self) -> Self {
        Self {
            train: self.train,
            graph: false,
            dropout_rng: self.dropout_rng,
            reference_matmul: self.reference_matmul,
            base_only: self.base_only,
            shard: self.shard,
        }
    }

    /// This pass for the rows `shard` of its batch: a CPU worker's part of a micro-batch, with
    /// the batch's dropout masks at those rows.
    pub fn for_rows(&self, shard: RowShard) -> Self {
        Self {
            shard: Some(shard),
            graph: self.graph,
            ..self.without_graph()
        }
    }

    /// The tensor to use for a parameter in this pass.
    pub fn param(&self, t: &Tensor) -> Tensor {
        if self.graph { t.clone() } else { t.detach() }
    }

    /// `x · wᵀ` for a rank-2 `x` and a weight `w` already passed through [`FwdCtx::param`]:
    /// candle's matmul when `w` is trained (it needs its gradient) or [`FwdCtx::reference_matmul`]
    /// is set, [`frozen_matmul`] otherwise (no gradient for `w`).
    pub fn matmul_t(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if w.is_variable() || self.reference_matmul {
            Ok(x.matmul(&w.t()?)?)
        } else {
            frozen_matmul(x, w)
        }
    }
}

/// LoRA adapter `scale · B·A` with trainable `A` (rank × in) and `B` (out × rank).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Down projection, Kaiming-uniform initialised.
    pub a: Var,
    /// Up projection, zero initialised.
    pub b: Var,
    /// `alpha / rank`.
    pub scale: f64,
    /// Dropout probability applied to the adapter input.
    pub dropout: f32,
}

/// A projection's weight (out × in).
#[derive(Debug, Clone)]
pub enum Weight {
    /// In the model's dtype: a plain tensor when frozen, a Var's tensor when trained in full.
    Dense(Tensor),
    /// Frozen and quantized (LoRA over an `int8` / `int4` base).
    Quantized(Arc<QTensor>),
}

/// The GGML format of a base quantization (`None` for the model's dtype): `int8` is `Q8_0`,
/// `int4` is `Q4_0` (blocks of 32 weights, so every Llama width qualifies).
pub fn ggml_dtype(q: BaseQuantization) -> Option<GgmlDType> {
    match q {
        BaseQuantization::None => None,
        BaseQuantization::Int8 => Some(GgmlDType::Q8_0),
        BaseQuantization::Int4 => Some(GgmlDType::Q4_0),
    }
}

/// `y = x·Wᵀ (+ scale·dropout(x)·Aᵀ·Bᵀ)`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight.
    pub weight: Weight,
    /// Optional LoRA adapter.
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// A linear layer without adapter.
    pub fn new(weight: Tensor) -> Self {
        Self {
            weight: Weight::Dense(weight),
            lora: None,
        }
    }

    /// A frozen linear layer whose weight is quantized to `format` (kept dense for `None`).
    pub fn frozen(weight: Tensor, format: BaseQuantization) -> Result<Self> {
        let Some(dtype) = ggml_dtype(format) else {
            return Ok(Self::new(weight));
        };
        let q = QTensor::quantize(&weight, dtype)?;
        Ok(Self {
            weight: Weight::Quantized(Arc::new(q)),
            lora: None,
        })
    }

    /// A frozen linear layer over a weight quantized while loading.
    pub fn quantized(weight: Arc<QTensor>) -> Self {
        Self {
            weight: Weight::Quantized(weight),
            lora: None,
        }
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        let dims = match &self.weight {
            Weight::Dense(w) => w.dims(),
            Weight::Quantized(q) => q.shape().dims(),
        };
        dims.first().copied().unwrap_or(0)
    }

    /// Whether the weight itself is trained (full fine-tuning).
    pub fn weight_trained(&self) -> bool {
        matches!(&self.weight, Weight::Dense(w) if w.is_variable())
    }

    /// The weight in the model's dtype (dequantized to f32 when quantized).
    pub fn dense_weight(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            Weight::Dense(w) => w.detach(),
            Weight::Quantized(q) => q.dequantize(&q.device())?,
        })
    }

    /// Applies the layer to `x` of shape (.., in).
    pub fn forward(&self, x: &Tensor, ctx: &mut FwdCtx) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.out_dim();
        }
        if let Some(y) = self.fused_lora(&x2, ctx)? {
            return Ok(y.reshape(out)?);
        }
        let mut y = match &self.weight {
            Weight::Dense(w) => ctx.matmul_t(&x2, &ctx.param(w))?,
            Weight::Quantized(q) => quantized_matmul(&x2, q)?,
        };
        if let (Some(l), false) = (&self.lora, ctx.base_only) {
            let a = ctx.param(l.a.as_tensor());
            let b = ctx.param(l.b.as_tensor());
            let xin = match (&mut ctx.dropout_rng, ctx.train && l.dropout > 0.0) {
                (Some(rng), true) => dropout(&x2, l.dropout, rng, ctx.shard)?,
                _ => x2.clone(),
            };
            let xin = if a.dtype() == xin.dtype() {
                xin
            } else {
                xin.to_dtype(a.dtype())?
            };
            let delta = xin.matmul(&a.t()?)?.matmul(&b.t()?)?;
            let delta = (delta * l.scale)?;
            let delta = if delta.dtype() == y.dtype() {
                delta
            } else {
                delta.to_dtype(y.dtype())?
            };
            y = (y + delta)?;
        }
        Ok(y.reshape(out)?)
    }

    /// On the CPU in f32, a frozen weight with an adapter in a pass that records a graph: the
    /// projection as one node ([`lora_projection`]), the same values and gradients as the ops
    /// it replaces. `None` where those ops run (elsewhere, and with
    /// [`FwdCtx::reference_matmul`], which keeps the path for the equality tests).
    fn fused_lora(&self, x: &Tensor, ctx: &mut FwdCtx) -> Result<Option<Tensor>> {
        let Some(l) = &self.lora else {
            return Ok(None);
        };
        let on_cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !ctx.graph
            || ctx.base_only
            || ctx.reference_matmul
            || !on_cpu_f32(x)
            || !on_cpu_f32(l.a.as_tensor())
        {
            return Ok(None);
        }
        let frozen = match &self.weight {
            Weight::Dense(w) if w.is_variable() => return Ok(None),
            Weight::Dense(w) => FrozenWeight::Dense(w.detach()),
            Weight::Quantized(q) => FrozenWeight::Quantized(q.clone()),
        };
        let mask = match (&mut ctx.dropout_rng, ctx.train && l.dropout > 0.0) {
            (Some(rng), true) => CpuDropout::draw(x, l.dropout, rng, ctx.shard),
            _ => None,
        };
        let (a, b) = (ctx.param(l.a.as_tensor()), ctx.param(l.b.as_tensor()));
        lora_projection(x, frozen, &a, &b, l.scale, mask).map(Some)
    }

    /// The weight with the adapter merged in: `W + scale·B·A` (in the weight's dtype; from the
    /// dequantized weight when quantized, which export never uses: it merges into the
    /// unquantized base).
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w = self.dense_weight()?;
        match &self.lora {
            None => Ok(w),
            Some(l) => {
                let ba =
                    l.b.as_tensor()
                        .detach()
                        .to_dtype(DType::F32)?
                        .matmul(&l.a.as_tensor().detach().to_dtype(DType::F32)?)?;
                let ba = (ba * l.scale)?.to_dtype(w.dtype())?;
                Ok((w + ba)?)
            }
        }
    }
}
