//! A short language-model pretraining of the tiny preset on general text (all positions in the
//! loss), through the training loop's optimizer step.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

use crate::data::batch::Batch;
use crate::data::encode::Encoder;
use crate::eval::encode_lm_lines;
use crate::model::weights::Weights;
use crate::model::{Llama, LlamaConfig, TrainableSpec};
use crate::optim::{AdamW, AdamWParams, Schedule};
use crate::rng::Rng;
use crate::train::step::{StepSettings, optimizer_step};
use crate::{Result, TrainerError};
use finetune_api::LrScheduler;

/// Pretraining settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainSettings {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for PretrainSettings {
    fn default() -> Self {
        Self {
            steps: 300,
            batch_size: 16,
            seq_len: 64,
            learning_rate: 3e-3,
            seed: 7,
        }
    }
}

/// Trains all weights on the lines of `text_file` (all positions in the loss) and returns the
/// updated weights with the mean loss of the first and last 10 % of steps.
pub fn pretrain(
    cfg: &LlamaConfig,
    weights: HashMap<String, Tensor>,
    encoder: &Encoder,
    text_file: &Path,
    s: &PretrainSettings,
) -> Result<(HashMap<String, Tensor>, f32, f32)> {
    let device = Device::Cpu;
    let text = std::fs::read_to_string(text_file).map_err(|e| TrainerError::io(text_file, e))?;
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let data = encode_lm_lines(encoder, &lines, s.seq_len, true)?;
    if data.is_empty() {
        return Err(TrainerError::Data(format!(
            "{}: no text",
            text_file.display()
        )));
    }
    let spec = TrainableSpec::Full {
        layers: None,
        embeddings_and_head: true,
    };
    let model = Llama::from_weights(cfg, Weights::from_map(weights), &spec, s.seed, &device)?;
    let mut opt = AdamW::new(AdamWParams {
        weight_decay: 0.01,
        ..Default::default()
    });
    let sched = Schedule {
        base_lr: s.learning_rate,
        warmup: s.steps / 20,
        total: s.steps,
        kind: LrScheduler::Cosine,
    };
    let mut rng = Rng::new(s.seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut pos = order.len();
    let mut losses = Vec::with_capacity(s.steps);
    let mut bar = finetune_api::console::ProgressBar::new("pretrain", "steps", s.steps as u64);
    for step in 0..s.steps {
        let mut items = Vec::with_capacity(s.batch_size);
        for _ in 0..s.batch_size {
            if pos >= order.len() {
                rng.shuffle(&mut order);
                pos = 0;
            }
            items.push(&data[order[pos]]);
            pos += 1;
        }
        let batch = Batch::new(&items, 0, &device);
        let outcome = optimizer_step(
            &model,
            &mut opt,
            [batch],
            sched.lr(step),
            &StepSettings::clipped_at(1.0),
            None,
        )?;
        losses.push(outcome.loss);
        bar.set(step as u64 + 1, &format!("loss {:.4}", losses[step]));
        if !bar.enabled() && step % 25 == 0 {
            tracing::info!(step, loss = losses[step], "pretrain");
        }
    }
    let k = (s.steps / 10).max(1);
    let first = losses.iter().take(k).sum::<f32>() / k as f32;
    let last = losses.iter().rev().take(k).sum::<f32>() / k as f32;
    let w = model
        .merged_weights()?
        .into_iter()
        .map(|(n, t)| t.to_dtype(DType::F32).map(|t| (n, t)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    Ok((w, first, last))
}
