//! The one optimizer step (`train::step::optimizer_step`, used by the training loop, the tiny
//! base's pretraining and the benchmark): equal to the hand-written step it replaced in the
//! pretraining and the benchmark, micro-batches averaged, empty micro-batches counted, the
//! dropout stream advanced.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{Device, Tensor};
use finetune_trainer::data::batch::Batch;
use finetune_trainer::loss::masked_cross_entropy;
use finetune_trainer::model::linear::FwdCtx;
use finetune_trainer::model::{Llama, TrainableSpec};
use finetune_trainer::optim::{AdamW, AdamWParams, clip_grad_norm};
use finetune_trainer::rng::Rng;
use finetune_trainer::train::step::{StepSettings, optimizer_step};
use std::collections::HashMap;

const VOCAB: usize = 50;

fn full() -> TrainableSpec {
    TrainableSpec::Full {
        layers: None,
        embeddings_and_head: true,
    }
}

/// Two rows of different lengths (the second is padded), loss on their last tokens.
fn batch() -> Batch {
    let a = common::encoded(&[1, 5, 9, 13, 7, 2], 3);
    let b = common::encoded(&[1, 8, 3, 2], 2);
    Batch::new(&[&a, &b], 0, &Device::Cpu).unwrap()
}

/// A row without a target token (all prompt).
fn batch_without_targets() -> Batch {
    let a = common::encoded(&[1, 4, 6, 2], 9);
    Batch::new(&[&a], 0, &Device::Cpu).unwrap()
}

fn model(spec: &TrainableSpec) -> Llama {
    let cfg = common::small_config(VOCAB, 2);
    let w = common::random_weights(&cfg, 21);
    common::build(&cfg, &w, spec)
}

fn optimizer() -> AdamW {
    AdamW::new(AdamWParams {
        weight_decay: 0.01,
        ..Default::default()
    })
}

/// The largest difference between the two models' trainable tensors.
fn max_difference(a: &Llama, b: &Llama) -> f32 {
    let b = b.trainable_tensors();
    a.trainable_tensors()
        .iter()
        .map(|(n, t)| common::max_abs_diff(t, &b[n]))
        .fold(0.0, f32::max)
}

/// The step the pretraining and the benchmark wrote by hand before they called the shared one.
fn hand_written_step(model: &Llama, opt: &mut AdamW, b: &Batch, lr: f64) -> f32 {
    let mut ctx = FwdCtx::train(None);
    let logits = model
        .logits_at(&b.ids, Some(&b.attention), &b.rows, &mut ctx)
        .unwrap();
    let loss = masked_cross_entropy(&logits, &b.targets).unwrap();
    let value = loss.to_scalar::<f32>().unwrap();
    let g = loss.backward().unwrap();
    let mut grads: HashMap<String, Tensor> = model
        .trainable()
        .iter()
        .filter_map(|(n, v)| g.get(v.as_tensor()).map(|t| (n.clone(), t.clone())))
        .collect();
    clip_grad_norm(model.trainable(), &mut grads, 1.0).unwrap();
    opt.step(model.trainable(), &grads, lr).unwrap();
    value
}

#[test]
fn the_shared_step_is_the_hand_written_one() {
    let (ours, theirs) = (model(&full()), model(&full()));
    let (mut opt_ours, mut opt_theirs) = (optimizer(), optimizer());
    let settings = StepSettings::clipped_at(1.0);
    for lr in [3e-3, 1e-3, 2e-3] {
        let got = optimizer_step(&ours, &mut opt_ours, [Ok(batch())], lr, &settings, None).unwrap();
        let want = hand_written_step(&theirs, &mut opt_theirs, &batch(), lr);
        assert!(
            (got.loss - want).abs() <= 1e-6,
            "loss at lr {lr}: {} vs {want}",
            got.loss
        );
        assert_eq!(got.tokens, 10);
    }
    // The shared step takes the CPU's fused head and loss (`loss::linear_ce`), whose value and
    // gradients equal the projection-then-loss path above up to f32 rounding
    // (`tests/linear_ce.rs`), hence the tolerances.
    let d = max_difference(&ours, &theirs);
    assert!(d <= 1e-6, "weights after 3 steps differ by {d}");
}

#[test]
fn two_equal_micro_batches_step_as_one() {
    let (twice, once) = (model(&full()), model(&full()));
    let (mut opt_twice, mut opt_once) = (optimizer(), optimizer());
    let settings = StepSettings::clipped_at(1e9);
    let a = optimizer_step(
        &twice,
        &mut opt_twice,
        [Ok(batch()), Ok(batch())],
        1e-3,
        &settings,
        None,
    )
    .unwrap();
    let b = optimizer_step(&once, &mut opt_once, [Ok(batch())], 1e-3, &settings, None).unwrap();
    assert_eq!(a.loss, b.loss);
    assert_eq!(a.tokens, 2 * b.tokens);
    assert!((a.grad_norm - b.grad_norm).abs() <= 1e-6 * b.grad_norm);
    assert!(max_difference(&twice, &once) < 1e-7);
    // The step moved the weights at all (the comparison above is not of two untouched models).
    assert!(max_difference(&twice, &model(&full())) > 1e-5);
}

#[test]
fn a_micro_batch_without_targets_counts_in_the_mean_and_adds_no_gradient() {
    let settings = StepSettings::clipped_at(1e9);
    let m = model(&full());
    let alone = optimizer_step(&m, &mut optimizer(), [Ok(batch())], 0.0, &settings, None).unwrap();
    let m = model(&full());
    let with_empty = optimizer_step(
        &m,
        &mut optimizer(),
        [Ok(batch()), Ok(batch_without_targets())],
        0.0,
        &settings,
        None,
    )
    .unwrap();
    assert_eq!(with_empty.tokens, alone.tokens + 4);
    assert!((with_empty.loss - alone.loss / 2.0).abs() < 1e-6);
    let half = alone.grad_norm / 2.0;
    assert!(
        (with_empty.grad_norm - half).abs() <= 1e-6 * half,
        "{} vs {half}",
        with_empty.grad_norm
    );
}

#[test]
fn the_dropout_stream_advances_and_replays() {
    let spec = common::lora_with_dropout();
    let settings = StepSettings::clipped_at(1.0);
    let start = model(&spec);
    common::perturb_lora_b(&start);
    let run = |seed: u64| {
        let m = model(&spec);
        m.load_trainable(&start.trainable_tensors()).unwrap();
        let mut rng = Rng::new(seed);
        let before = rng;
        let out = optimizer_step(
            &m,
            &mut optimizer(),
            [Ok(batch())],
            1e-3,
            &settings,
            Some(&mut rng),
        )
        .unwrap();
        assert_ne!(rng, before, "the dropout stream did not advance");
        (out.loss, rng)
    };
    assert_eq!(run(5), run(5), "the same stream gives the same step");
    assert_ne!(run(5).0, run(6).0, "dropout masks come from the stream");
}

#[test]
fn a_step_with_recomputed_layers_matches_the_plain_step() {
    let spec = TrainableSpec::Lora(common::lora_all(4));
    let (plain, recomputed) = (model(&spec), model(&spec));
    common::perturb_lora_b(&plain);
    recomputed
        .load_trainable(&plain.trainable_tensors())
        .unwrap();
    let (mut opt_plain, mut opt_recomputed) = (optimizer(), optimizer());
    let settings = StepSettings::clipped_at(1.0);
    let checkpointed = StepSettings {
        gradient_checkpointing: true,
        ..settings
    };
    for _ in 0..2 {
        let a =
            optimizer_step(&plain, &mut opt_plain, [Ok(batch())], 1e-2, &settings, None).unwrap();
        let b = optimizer_step(
            &recomputed,
            &mut opt_recomputed,
            [Ok(batch())],
            1e-2,
            &checkpointed,
            None,
        )
        .unwrap();
        assert!((a.loss - b.loss).abs() < 1e-5);
    }
    assert!(max_difference(&plain, &recomputed) < 1e-5);
}
