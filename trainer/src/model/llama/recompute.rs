//! The loss of a batch and the gradients of every trainable tensor, with or without activation
//! checkpointing.
//!
//! With checkpointing the forward runs without a backward graph and keeps only each decoder
//! layer's input (and the dropout stream where the layer began). The backward then walks the
//! layers from the top: it recomputes one layer with its graph and back-propagates the gradient
//! `g` of that layer's output, as the gradient of the scalar `Σ y ⊙ g` with `g` held fixed, into
//! the layer's parameters and its input, whose gradient is the next layer's `g`. Activation
//! memory becomes one (b, s, hidden) tensor per layer plus one layer's graph, for one more
//! forward of the layers that need a gradient.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::block::Block;
use super::{HeadInput, Llama, rms_norm, select_rows};
use crate::Result;
use crate::model::linear::FwdCtx;

/// Gradients of trainable tensors by trainable name, in f32, summed over what was added.
#[derive(Debug, Default)]
pub struct Gradients(HashMap<String, Tensor>);

impl Gradients {
    /// No gradient yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the gradient `store` holds for each of `trainable` (absent ones are skipped).
    pub fn add_store(&mut self, trainable: &[(String, Var)], store: &GradStore) -> Result<()> {
        for (name, var) in trainable {
            if let Some(g) = store.get(var.as_tensor()) {
                self.add(name, g)?;
            }
        }
        Ok(())
    }

    /// Adds every gradient of `other`.
    pub fn merge(&mut self, other: Gradients) -> Result<()> {
        for (name, g) in other.0 {
            self.add(&name, &g)?;
        }
        Ok(())
    }

    fn add(&mut self, name: &str, g: &Tensor) -> Result<()> {
        let g = g.to_dtype(DType::F32)?;
        let sum = match self.0.remove(name) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        self.0.insert(name.to_string(), sum);
        Ok(())
    }

    /// The gradient of `name`, if any was added.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.get(name)
    }

    /// Tensors with a gradient.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no gradient was added.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The gradients by name.
    pub fn into_map(self) -> HashMap<String, Tensor> {
        self.0
    }
}

/// A batch's loss and the gradients it gives.
#[derive(Debug)]
pub struct LossAndGrads {
    /// The loss value.
    pub loss: f32,
    /// The gradient of every trainable tensor the loss depends on.
    pub grads: Gradients,
}

impl Llama {
    /// The loss `loss(head)` of the final hidden states at flat positions `rows` (as in
    /// [`Llama::logits_at`], before the LM head: [`HeadInput`] projects them) and its gradients.
    /// With `recompute_layers` the decoder layers are activation-checkpointed (see the module
    /// documentation); the gradients are those of the plain backward, up to rounding. `ctx` must
    /// build a graph; its dropout stream advances as one forward would advance it.
    pub fn loss_and_grads(
        &self,
        ids: &Tensor,
        mask: Option<&[Vec<u8>]>,
        rows: &Tensor,
        ctx: &mut FwdCtx,
        recompute_layers: bool,
        loss: impl Fn(&HeadInput) -> Result<Tensor>,
    ) -> Result<LossAndGrads> {
        let mut grads = Gradients::new();
        if !recompute_layers {
            let hidden = self.hidden_at(ids, mask, rows, ctx)?;
            let value = loss(&HeadInput::new(self, hidden, ctx))?;
            grads.add_store(&self.trainable, &value.backward()?)?;
            let loss = value.to_scalar::<f32>()?;
            return Ok(LossAndGrads { loss, grads });
        }
        let (b, s) = ids.dims2()?;
        let positions = self.attention_inputs(mask, b, s)?;

        // Forward without a graph, keeping each layer's input (on the layer's device) and
        // dropout stream.
        let mut plain = ctx.without_graph();
        let mut x = self.embed_ids(ids, &plain)?;
        let mut inputs = Vec::with_capacity(self.blocks.len());
        for (i, blk) in self.blocks.iter().enumerate() {
            let start = plain.dropout_rng;
            let (cos, sin, bias) = self.layer_inputs(&positions, i)?;
            let input = self.to_layer(&x, i)?;
            let y = blk.forward(&input, (cos, sin), bias, None, &mut plain)?;
            inputs.push((input, start));
            x = y;
        }
        let after_forward = plain.dropout_rng;

        // The head (final norm, LM head, loss) with its graph, from the top layer's output.
        let top = Var::from_tensor(&x)?;
        let hidden = rms_norm(
            top.as_tensor(),
            &ctx.param(&self.norm),
            self.cfg.rms_norm_eps,
        )?;
        let flat = hidden.reshape((b * s, self.cfg.hidden_size))?;
        let value = loss(&HeadInput::new(self, select_rows(&flat, rows)?, ctx))?;
        let store = value.backward()?;
        grads.add_store(&self.trainable, &store)?;
        let mut upstream = store.get(top.as_tensor()).cloned();
        drop(store);

        // The layers from the top down to the lowest one that needs a gradient.
        let embed_trained = self.embed.is_variable();
        let lowest = if embed_trained {
            0
        } else {
            let first = self.blocks.iter().position(Block::is_trained);
            first.unwrap_or(self.blocks.len())
        };
        for i in (lowest..self.blocks.len()).rev() {
            let (Some(g), Some((input, start))) = (upstream.take(), inputs.pop()) else {
                break;
            };
            let needs_input_grad = i > lowest || embed_trained;
            let input = if needs_input_grad {
                Var::from_tensor(&input)?.as_tensor().clone()
            } else {
                input
            };
            let mut again = FwdCtx {
                graph: true,
                dropout_rng: start,
                ..ctx.without_graph()
            };
            let (cos, sin, bias) = self.layer_inputs(&positions, i)?;
            let y = self.blocks[i].forward(&input, (cos, sin), bias, None, &mut again)?;
            // The gradient of this layer's output comes from the next layer's device.
            let g = g.to_device(y.device())?;
            let store = (y * g)?.sum_all()?.backward()?;
            grads.add_store(&self.trainable, &store)?;
            if needs_input_grad {
                upstream = store.get(&input).cloned();
            }
        }
        if let (true, Some(g)) = (embed_trained, upstream) {
            let x0 = self.embed_ids(ids, ctx)?;
            let g = g.to_device(x0.device())?;
            let store = (x0 * g)?.sum_all()?.backward()?;
            grads.add_store(&self.trainable, &store)?;
        }
        ctx.dropout_rng = after_forward;
        let loss = value.to_scalar::<f32>()?;
        Ok(LossAndGrads { loss, grads })
    }
}
