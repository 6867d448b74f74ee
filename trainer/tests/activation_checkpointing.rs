//! Activation checkpointing changes memory, not results: with the decoder layers recomputed in
//! the backward, the loss, every trainable tensor's gradient and the dropout stream equal the
//! plain backward's (f32, ≤ 1e-5 relative) for LoRA with dropout, LoRA on selected layers, full
//! fine-tuning of selected layers, and full fine-tuning with tied embeddings and head.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{Device, Tensor};
use finetune_trainer::model::linear::FwdCtx;
use finetune_trainer::model::{Llama, LlamaConfig, LoraSettings, LossAndGrads, TrainableSpec};
use finetune_trainer::rng::Rng;

const VOCAB: usize = 50;

fn config(tied: bool) -> LlamaConfig {
    let mut cfg = common::small_config(VOCAB, 2);
    cfg.num_hidden_layers = 3;
    cfg.tie_word_embeddings = tied;
    cfg
}

fn model(cfg: &LlamaConfig, spec: &TrainableSpec) -> Llama {
    let mut w = common::random_weights(cfg, 17);
    if cfg.tie_word_embeddings {
        w.remove("lm_head.weight");
    }
    let model = common::build(cfg, &w, spec);
    common::perturb_lora_b(&model);
    model
}

/// One padded batch; returns the result and the dropout stream after it.
fn run(model: &Llama, recompute: bool) -> (LossAndGrads, Option<Rng>) {
    let ids = Tensor::new(&[[1u32, 5, 9, 13, 7, 2], [1, 8, 3, 2, 0, 0]], &Device::Cpu).unwrap();
    let mask = vec![vec![1, 1, 1, 1, 1, 1], vec![1, 1, 1, 1, 0, 0]];
    let rows = Tensor::new(&[2u32, 3, 4, 7, 8], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[13u32, 7, 2, 3, 2], &Device::Cpu).unwrap();
    let mut ctx = FwdCtx::train(Some(Rng::derive(5, 1)));
    let out = model
        .loss_and_grads(&ids, Some(&mask), &rows, &mut ctx, recompute, |h| {
            h.cross_entropy(&targets)
        })
        .unwrap();
    (out, ctx.dropout_rng)
}

/// Every trainable tensor has a nonzero gradient on both paths, and they agree.
fn assert_same(spec: TrainableSpec, tied: bool) {
    let cfg = config(tied);
    let model = model(&cfg, &spec);
    let (plain, rng_plain) = run(&model, false);
    let (again, rng_again) = run(&model, true);
    assert_eq!(
        plain.loss, again.loss,
        "the forward is the same computation"
    );
    assert_eq!(
        rng_plain, rng_again,
        "the dropout stream advances as one forward"
    );
    assert_eq!(plain.grads.len(), model.trainable().len(), "{spec:?}");
    assert_eq!(again.grads.len(), plain.grads.len(), "{spec:?}");
    for (name, _) in model.trainable() {
        let (reference, recomputed) = (
            plain.grads.get(name).unwrap(),
            again.grads.get(name).unwrap(),
        );
        common::assert_close_to_reference(name, recomputed, reference, 1e-5);
    }
}

fn lora(dropout: f32, layers: Option<Vec<usize>>) -> TrainableSpec {
    TrainableSpec::Lora(LoraSettings {
        dropout,
        layers,
        ..common::lora_all(4)
    })
}

#[test]
fn lora_with_dropout_matches_the_plain_backward() {
    assert_same(lora(0.2, None), false);
}

#[test]
fn lora_on_selected_layers_matches_the_plain_backward() {
    assert_same(lora(0.0, Some(vec![1])), false);
    assert_same(lora(0.1, Some(vec![0, 2])), false);
}

#[test]
fn full_fine_tuning_of_selected_layers_matches_the_plain_backward() {
    let spec = TrainableSpec::Full {
        layers: Some(vec![2]),
        embeddings_and_head: false,
    };
    assert_same(spec, false);
}

#[test]
fn full_fine_tuning_with_tied_embeddings_matches_the_plain_backward() {
    for tied in [true, false] {
        let spec = TrainableSpec::Full {
            layers: None,
            embeddings_and_head: true,
        };
        assert_same(spec, tied);
    }
}
