//! The CPU's fused LM head and cross-entropy (`trainer/src/loss/linear_ce.rs`): value and
//! gradients equal projecting the rows and taking the cross-entropy (fused and primitive), across
//! block boundaries; finite differences through the op; a frozen head gets no gradient; the
//! upstream gradient scales the result; and through the whole model, for LoRA and full
//! fine-tuning with and without activation checkpointing, every trainable tensor's gradient
//! equals the path it replaced.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{Device, Tensor, Var};
use finetune_trainer::loss::linear_ce::{linear_cross_entropy, linear_cross_entropy_in_blocks};
use finetune_trainer::loss::{masked_cross_entropy, reference_cross_entropy};
use finetune_trainer::model::linear::FwdCtx;
use finetune_trainer::model::{Llama, LossAndGrads, TrainableSpec};

const ROWS: usize = 7;
const HIDDEN: usize = 16;
const VOCAB: usize = 50;

fn operands() -> (Var, Var, Tensor) {
    let dev = Device::Cpu;
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (ROWS, HIDDEN), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (VOCAB, HIDDEN), &dev).unwrap()).unwrap();
    let t = Tensor::new(&[0u32, 49, 3, 3, 17, 8, 25], &dev).unwrap();
    (h, w, t)
}

#[test]
fn value_and_both_gradients_equal_the_projection_then_the_loss_across_blocks() {
    let (h, w, t) = operands();
    let logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
    for (what, reference) in [
        (
            "fused cross-entropy",
            masked_cross_entropy(&logits, &t).unwrap(),
        ),
        ("primitive", reference_cross_entropy(&logits, &t).unwrap()),
    ] {
        let want = reference.to_scalar::<f32>().unwrap();
        let grads = reference.backward().unwrap();
        // Blocks of 3 rows (3 + 3 + 1), of 1 row, and one block for all.
        for block in [3, 1, ROWS, 64] {
            let got =
                linear_cross_entropy_in_blocks(h.as_tensor(), w.as_tensor(), &t, block).unwrap();
            let value = got.to_scalar::<f32>().unwrap();
            assert!(
                (value - want).abs() < 1e-5,
                "{what}, blocks of {block}: {value} vs {want}"
            );
            let ours = got.backward().unwrap();
            for (name, var) in [("hidden", &h), ("head", &w)] {
                let d = common::max_abs_diff(
                    ours.get(var.as_tensor()).unwrap(),
                    grads.get(var.as_tensor()).unwrap(),
                );
                assert!(d < 1e-6, "{what}, blocks of {block}, {name}: {d}");
            }
        }
    }
}

#[test]
fn gradients_agree_with_finite_differences() {
    let (h, w, t) = operands();
    let loss = || linear_cross_entropy_in_blocks(h.as_tensor(), w.as_tensor(), &t, 3).unwrap();
    let grads = loss().backward().unwrap();
    common::assert_finite_differences_of_vars(
        "linear cross-entropy",
        &[("hidden", &h), ("head", &w)],
        |_, var| grads.get(var.as_tensor()).unwrap().clone(),
        &[
            ("hidden", 0),
            ("hidden", 37),
            ("hidden", 111),
            ("head", 0),
            ("head", 3 * HIDDEN + 5),
            ("head", 49 * HIDDEN + 15),
        ],
        loss,
    );
}

#[test]
fn a_frozen_head_gets_no_gradient_and_no_graph_records_nothing() {
    let (h, w, t) = operands();
    let frozen = w.as_tensor().detach();
    let loss = linear_cross_entropy(h.as_tensor(), &frozen, &t).unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(h.as_tensor()).is_some());
    assert!(grads.get(&frozen).is_none());
    // Neither operand tracks a gradient: the value only, as a plain tensor.
    let plain = linear_cross_entropy(&h.as_tensor().detach(), &frozen, &t).unwrap();
    assert!(!plain.track_op());
    let d = (plain.to_scalar::<f32>().unwrap() - loss.to_scalar::<f32>().unwrap()).abs();
    assert!(d < 1e-7, "{d}");
}

#[test]
fn the_upstream_gradient_scales_both_gradients() {
    let (h, w, t) = operands();
    let once = linear_cross_entropy_in_blocks(h.as_tensor(), w.as_tensor(), &t, 2)
        .unwrap()
        .backward()
        .unwrap();
    let scaled = (linear_cross_entropy_in_blocks(h.as_tensor(), w.as_tensor(), &t, 2).unwrap()
        * -2.5)
        .unwrap()
        .backward()
        .unwrap();
    for var in [&h, &w] {
        let want = (once.get(var.as_tensor()).unwrap() * -2.5).unwrap();
        let d = common::max_abs_diff(scaled.get(var.as_tensor()).unwrap(), &want);
        assert!(d < 1e-6, "{d}");
    }
}

#[test]
fn a_target_outside_the_vocabulary_is_refused_by_value() {
    let (h, w, _) = operands();
    let t = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 50], &Device::Cpu).unwrap();
    let err = linear_cross_entropy(h.as_tensor(), w.as_tensor(), &t).unwrap_err();
    assert!(
        err.to_string()
            .contains("target 50 outside a vocabulary of 50"),
        "{err}"
    );
}

/// The small batch's loss and gradients through `loss_and_grads`, with the fused head and loss
/// (`fused`) or the projection followed by the cross-entropy.
fn model_step(model: &Llama, fused: bool, recompute: bool) -> LossAndGrads {
    let ids = Tensor::new(&[[1u32, 5, 9, 13, 7, 2], [1, 8, 3, 2, 0, 0]], &Device::Cpu).unwrap();
    let mask = vec![vec![1, 1, 1, 1, 1, 1], vec![1, 1, 1, 1, 0, 0]];
    let rows = Tensor::new(&[0u32, 1, 2, 3, 4, 6, 7, 8], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[5u32, 9, 13, 7, 2, 8, 3, 2], &Device::Cpu).unwrap();
    let mut ctx = FwdCtx::train(None);
    model
        .loss_and_grads(&ids, Some(&mask), &rows, &mut ctx, recompute, |head| {
            if fused {
                head.cross_entropy(&targets)
            } else {
                masked_cross_entropy(&head.logits()?, &targets)
            }
        })
        .unwrap()
}

#[test]
fn through_the_model_every_trainable_gradient_equals_the_replaced_path() {
    let specs = [
        ("LoRA", TrainableSpec::Lora(common::lora_all(4))),
        (
            "full",
            TrainableSpec::Full {
                layers: None,
                embeddings_and_head: true,
            },
        ),
    ];
    let cfg = common::small_config(VOCAB, 2);
    let w = common::random_weights(&cfg, 23);
    for (what, spec) in specs {
        let model = common::build(&cfg, &w, &spec);
        common::perturb_lora_b(&model);
        let names: Vec<String> = model.trainable().iter().map(|(n, _)| n.clone()).collect();
        for recompute in [false, true] {
            let fused = model_step(&model, true, recompute);
            let plain = model_step(&model, false, recompute);
            assert!(
                (fused.loss - plain.loss).abs() < 1e-5,
                "{what}: {} vs {}",
                fused.loss,
                plain.loss
            );
            assert_eq!(
                fused.grads.len(),
                names.len(),
                "{what}: a gradient is missing"
            );
            assert_eq!(plain.grads.len(), names.len());
            for name in &names {
                let d = common::max_abs_diff(
                    fused.grads.get(name).unwrap(),
                    plain.grads.get(name).unwrap(),
                );
                assert!(d < 1e-5, "{what}, checkpointing {recompute}, {name}: {d}");
            }
        }
    }
}
