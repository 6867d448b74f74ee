//! A micro-batch split by rows between CPU workers (`train::shards`) computes what the whole
//! batch computes: the same loss, penalty and gradients of every trainable tensor (up to
//! rounding), the same dropout masks and the dropout stream advanced as far, for LoRA with
//! dropout, full fine-tuning with activation checkpointing, the KL-to-base penalty, and parts
//! with no loss position; and a training step with workers equals one without.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{Device, Tensor};
use finetune_trainer::data::batch::Batch;
use finetune_trainer::data::encode::Encoded;
use finetune_trainer::eval::sequence_log_likelihoods;
use finetune_trainer::model::linear::FwdCtx;
use finetune_trainer::model::{Llama, LoraSettings, TrainableSpec};
use finetune_trainer::optim::{AdamW, AdamWParams};
use finetune_trainer::rng::Rng;
use finetune_trainer::train::step::{
    BaseKl, MicroBatchGrads, StepSettings, micro_batch_grads, optimizer_step,
};

const VOCAB: usize = 50;

/// Five rows of different lengths (padded to 9); row 3 has no loss position (all prompt).
fn rows() -> Vec<Encoded> {
    vec![
        common::encoded(&[1, 5, 9, 13, 7, 2], 3),
        common::encoded(&[1, 8, 3, 2], 2),
        common::encoded(&[1, 4, 6, 11, 12, 17, 19, 23, 2], 5),
        common::encoded(&[1, 4, 6, 2], 9),
        common::encoded(&[1, 30, 31, 32, 33, 2], 4),
    ]
}

fn batch(items: &[Encoded]) -> Batch {
    let refs: Vec<&Encoded> = items.iter().collect();
    Batch::new(&refs, 0, &Device::Cpu).unwrap()
}

fn model(spec: &TrainableSpec) -> Llama {
    let cfg = common::small_config(VOCAB, 2);
    let w = common::random_weights(&cfg, 29);
    let m = common::build(&cfg, &w, spec);
    // LoRA's B starts at zero (A's gradient would be zero): seeded values, the same each call.
    let mut rng = Rng::new(13);
    for (name, var) in m.trainable() {
        if name.contains("lora_B") {
            let values: Vec<f32> = (0..var.elem_count()).map(|_| 0.1 * rng.normal()).collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    m
}

fn lora_with_dropout_and_rows() -> TrainableSpec {
    let TrainableSpec::Lora(l) = common::lora_with_dropout() else {
        unreachable!()
    };
    TrainableSpec::Lora(LoraSettings {
        head_token_ids: vec![13, 2],
        ..l
    })
}

fn full() -> TrainableSpec {
    TrainableSpec::Full {
        layers: None,
        embeddings_and_head: true,
    }
}

/// The micro-batch's gradients with `workers`, and the dropout stream after it.
fn grads(
    model: &Llama,
    b: &Batch,
    settings: &StepSettings,
    workers: usize,
) -> (MicroBatchGrads, Option<Rng>) {
    let mut ctx = FwdCtx::train(Some(Rng::new(41)));
    let settings = StepSettings {
        cpu_workers: workers,
        ..*settings
    };
    let g = micro_batch_grads(model, b, &mut ctx, &settings).unwrap();
    (g, ctx.dropout_rng)
}

/// Asserts the split computation equals the whole one for 2, 3 and 5 workers (one row each).
fn assert_split_equals_whole(model: &Llama, b: &Batch, settings: &StepSettings) {
    let (whole, whole_rng) = grads(model, b, settings, 1);
    assert_eq!(whole.grads.len(), model.trainable().len());
    for workers in [2, 3, 5] {
        let (split, split_rng) = grads(model, b, settings, workers);
        assert_eq!(
            split_rng, whole_rng,
            "{workers} workers: the dropout stream"
        );
        let rel = |a: f32, b: f32| (a - b).abs() / b.abs().max(1e-6);
        assert!(
            rel(split.loss, whole.loss) < 1e-5,
            "{workers} workers: loss {} vs {}",
            split.loss,
            whole.loss
        );
        match (split.base_kl, whole.base_kl) {
            (Some(s), Some(w)) => assert!(rel(s, w) < 1e-4, "penalty {s} vs {w}"),
            (s, w) => assert_eq!(s.is_some(), w.is_some()),
        }
        assert_eq!(split.grads.len(), whole.grads.len(), "{workers} workers");
        for (name, _) in model.trainable() {
            let (s, w) = (
                split.grads.get(name).unwrap(),
                whole.grads.get(name).unwrap(),
            );
            let scale = common::max_abs(w);
            assert!(scale > 0.0, "{name}: no gradient to compare");
            let diff = common::max_abs_diff(s, w);
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "{workers} workers, {name}: differs by {diff} (largest {scale})"
            );
        }
    }
}

#[test]
fn lora_with_dropout_split_by_rows_equals_the_whole_batch() {
    let m = model(&lora_with_dropout_and_rows());
    let b = batch(&rows());
    assert_split_equals_whole(&m, &b, &StepSettings::clipped_at(1.0));
}

#[test]
fn full_fine_tuning_with_checkpointing_split_by_rows_equals_the_whole_batch() {
    let m = model(&full());
    let b = batch(&rows());
    let settings = StepSettings {
        gradient_checkpointing: true,
        ..StepSettings::clipped_at(1.0)
    };
    assert_split_equals_whole(&m, &b, &settings);
}

#[test]
fn the_kl_penalty_split_by_rows_equals_the_whole_batch() {
    let m = model(&lora_with_dropout_and_rows());
    let b = batch(&rows());
    for gradient_checkpointing in [false, true] {
        let settings = StepSettings {
            base_kl: Some(BaseKl {
                weight: 0.7,
                stride: 3,
            }),
            gradient_checkpointing,
            ..StepSettings::clipped_at(1.0)
        };
        assert_split_equals_whole(&m, &b, &settings);
    }
}

#[test]
fn a_part_without_loss_positions_still_carries_its_penalty() {
    // Rows 0 and 1 have loss positions, row 2 (prompt only) has compared positions alone: with
    // three workers its part is the penalty alone.
    let items = [rows()[0].clone(), rows()[1].clone(), rows()[3].clone()];
    let m = model(&lora_with_dropout_and_rows());
    let settings = StepSettings {
        base_kl: Some(BaseKl {
            weight: 0.7,
            stride: 1,
        }),
        ..StepSettings::clipped_at(1.0)
    };
    assert_split_equals_whole(&m, &batch(&items), &settings);
    // Without the penalty that part has nothing to compute and is left out.
    assert_split_equals_whole(&m, &batch(&items), &StepSettings::clipped_at(1.0));
}

#[test]
fn steps_with_workers_train_the_model_the_whole_batch_trains() {
    let items = rows();
    let trained = |workers: usize| {
        let m = model(&lora_with_dropout_and_rows());
        let mut opt = AdamW::new(AdamWParams::default());
        let mut rng = Rng::new(7);
        let settings = StepSettings {
            cpu_workers: workers,
            ..StepSettings::clipped_at(1.0)
        };
        let mut losses = Vec::new();
        for _ in 0..3 {
            let batches = [Ok(batch(&items)), Ok(batch(&items[1..]))];
            let out = optimizer_step(&m, &mut opt, batches, 1e-2, &settings, Some(&mut rng));
            losses.push(out.unwrap().loss);
        }
        (m.trainable_tensors(), losses, rng)
    };
    let (whole, whole_losses, whole_rng) = trained(1);
    let (split, split_losses, split_rng) = trained(2);
    assert_eq!(split_rng, whole_rng);
    assert!(
        whole_losses[2] < whole_losses[0],
        "it learns: {whole_losses:?}"
    );
    for (a, b) in split_losses.iter().zip(&whole_losses) {
        assert!(
            (a - b).abs() < 1e-4 * b.abs(),
            "{split_losses:?} vs {whole_losses:?}"
        );
    }
    for (name, w) in &whole {
        let diff = common::max_abs_diff(&split[name], w);
        assert!(diff < 1e-5, "{name}: {diff}");
    }
    // The models moved: the comparison is not of two initial states.
    let initial = model(&lora_with_dropout_and_rows()).trainable_tensors();
    let moved = whole
        .iter()
        .map(|(n, t)| common::max_abs_diff(t, &initial[n]))
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "moved {moved}");
}

#[test]
fn evaluation_split_between_workers_scores_each_row_as_it_scores_alone() {
    let m = model(&lora_with_dropout_and_rows());
    let mut items = rows();
    items.extend(rows().into_iter().rev().map(|mut e| {
        e.ids[1] += 1;
        e
    }));
    let refs: Vec<&Encoded> = items.iter().collect();
    // Five batches of two: on a machine with several cores they are split between workers.
    let together = sequence_log_likelihoods(&m, &refs, 2, &Device::Cpu).unwrap();
    assert_eq!(together.len(), items.len());
    for (i, item) in refs.iter().enumerate() {
        let alone = sequence_log_likelihoods(&m, &[*item], 1, &Device::Cpu).unwrap()[0];
        assert_eq!(together[i].1, alone.1, "row {i}: token count");
        assert!(
            (together[i].0 - alone.0).abs() <= 1e-4 * alone.0.abs().max(1.0),
            "row {i}: {} vs {}",
            together[i].0,
            alone.0
        );
    }
    assert!(together.iter().filter(|s| s.1 > 0).count() >= 8);
}
