//! The KL-to-base penalty (`method.lora.klToBase`): the base it compares with is the model
//! without its adapters and trained head rows, the objective's gradient reaches every trainable
//! tensor and agrees with finite differences and with an independent formulation (a separately
//! built frozen base), it is zero at initialisation (the tuned model is the base), activation
//! checkpointing gives the same gradients, and a weight of zero is the plain objective.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use finetune_trainer::data::batch::Batch;
use finetune_trainer::loss::{masked_cross_entropy, reference_kl};
use finetune_trainer::model::head_rows::PEFT_HEAD_ROWS_NAME;
use finetune_trainer::model::linear::FwdCtx;
use finetune_trainer::model::{Llama, LlamaConfig, LoraSettings, TrainableSpec};
use finetune_trainer::train::step::{BaseKl, StepSettings, micro_batch_grads};
use std::collections::HashMap;

const VOCAB: usize = 50;
const WEIGHT: f64 = 0.7;
const STRIDE: usize = 2;

fn lora_with_rows() -> TrainableSpec {
    TrainableSpec::Lora(LoraSettings {
        head_token_ids: vec![13, 2],
        ..common::lora_all(4)
    })
}

struct Fixture {
    tuned: Llama,
    /// The same weights with nothing trainable: the base, built on its own.
    base: Llama,
}

fn fixture(perturbed: bool) -> Fixture {
    let cfg: LlamaConfig = common::small_config(VOCAB, 2);
    let w: HashMap<String, Tensor> = common::random_weights(&cfg, 17);
    let tuned = common::build(&cfg, &w, &lora_with_rows());
    if perturbed {
        common::perturb_lora_b(&tuned);
        let (_, rows) = tuned
            .trainable()
            .iter()
            .find(|(n, _)| n == PEFT_HEAD_ROWS_NAME)
            .unwrap();
        let moved = (rows.as_tensor() + Tensor::randn(0f32, 0.5, rows.shape(), &Device::Cpu))
            .unwrap()
            .detach();
        rows.set(&moved).unwrap();
    }
    let base = common::build(&cfg, &w, &TrainableSpec::Frozen);
    Fixture { tuned, base }
}

/// Two rows of different lengths (the second padded): prompts of 5 and 3 tokens, answers after.
fn batch() -> Batch {
    let a = common::encoded(&[1, 5, 9, 11, 4, 13, 2], 5);
    let b = common::encoded(&[1, 8, 3, 2], 3);
    Batch::new(&[&a, &b], 0, &Device::Cpu).unwrap()
}

fn settings(weight: f64, recompute: bool) -> StepSettings {
    StepSettings {
        base_kl: Some(BaseKl {
            weight,
            stride: STRIDE,
        }),
        gradient_checkpointing: recompute,
        ..StepSettings::clipped_at(1.0)
    }
}

fn compared(b: &Batch) -> Vec<u32> {
    b.context_rows.iter().copied().step_by(STRIDE).collect()
}

/// The objective written independently of the trainer's path: the targets' cross-entropy plus
/// `WEIGHT ·` the KL (from primitive ops, where the trainer fuses it) from the separately built
/// base, at every `STRIDE`-th prompt position.
fn independent_objective(f: &Fixture, b: &Batch) -> Tensor {
    let rows = Tensor::new(compared(b).as_slice(), &Device::Cpu).unwrap();
    let mut ctx = FwdCtx::train(None);
    let tuned = f
        .tuned
        .logits_at(&b.ids, Some(&b.attention), &b.rows, &mut ctx)
        .unwrap();
    let ce = masked_cross_entropy(&tuned, &b.targets).unwrap();
    let at_prompt = f
        .tuned
        .logits_at(&b.ids, Some(&b.attention), &rows, &mut ctx)
        .unwrap();
    let base = f
        .base
        .logits_at(&b.ids, Some(&b.attention), &rows, &mut FwdCtx::eval())
        .unwrap();
    let kl = reference_kl(&at_prompt, &base).unwrap();
    (ce + (kl * WEIGHT).unwrap()).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn trainer_grads(
    f: &Fixture,
    b: &Batch,
    s: &StepSettings,
) -> (f32, Option<f32>, HashMap<String, Tensor>) {
    let mut ctx = FwdCtx::train(None);
    let got = micro_batch_grads(&f.tuned, b, &mut ctx, s).unwrap();
    (got.loss, got.base_kl, got.grads.into_map())
}

#[test]
fn the_batch_lists_the_positions_that_predict_prompt_tokens() {
    let b = batch();
    // Row 0 (length 7, prompt 5): positions 0..=3 predict prompt tokens; row 1 (length 4,
    // prompt 3, offset 7): positions 7 and 8.
    assert_eq!(b.context_rows, vec![0, 1, 2, 3, 7, 8]);
    assert_eq!(compared(&b), vec![0, 2, 7]);
}

#[test]
fn the_base_forward_leaves_out_adapters_and_trained_rows() {
    let f = fixture(true);
    let b = batch();
    let all = Tensor::new(&[0u32, 3, 5, 8], &Device::Cpu).unwrap();
    let base_only = f
        .tuned
        .logits_at(&b.ids, Some(&b.attention), &all, &mut FwdCtx::base_model())
        .unwrap();
    let separate = f
        .base
        .logits_at(&b.ids, Some(&b.attention), &all, &mut FwdCtx::eval())
        .unwrap();
    let tuned = f
        .tuned
        .logits_at(&b.ids, Some(&b.attention), &all, &mut FwdCtx::eval())
        .unwrap();
    assert!(common::max_abs_diff(&base_only, &separate) < 1e-5);
    // The perturbed adapters do move the tuned model's logits (the comparison can fail).
    assert!(common::max_abs_diff(&tuned, &separate) > 1e-2);
}

#[test]
fn gradients_equal_the_independent_objective_for_every_trainable_tensor() {
    let f = fixture(true);
    let b = batch();
    let objective = independent_objective(&f, &b);
    let reference: GradStore = objective.backward().unwrap();
    let (loss, kl, grads) = trainer_grads(&f, &b, &settings(WEIGHT, false));
    // The reported loss is the targets' alone; the penalty is reported unweighted.
    let ce = masked_cross_entropy(
        &f.tuned
            .logits_at(&b.ids, Some(&b.attention), &b.rows, &mut FwdCtx::eval())
            .unwrap(),
        &b.targets,
    )
    .unwrap();
    assert!((f64::from(loss) - scalar(&ce)).abs() < 1e-5);
    let kl = f64::from(kl.expect("the penalty is reported"));
    assert!(kl > 1e-3, "the perturbed model differs from its base: {kl}");
    assert!((scalar(&ce) + WEIGHT * kl - scalar(&objective)).abs() < 1e-4);
    assert_eq!(grads.len(), f.tuned.trainable().len());
    for (name, var) in f.tuned.trainable() {
        let ours = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let theirs = reference.get(var.as_tensor()).unwrap();
        let d = common::max_abs_diff(ours, theirs);
        assert!(
            d < 1e-4 * (1.0 + common::max_abs(theirs)),
            "{name}: {d} against {}",
            common::max_abs(theirs)
        );
    }
}

#[test]
fn gradients_agree_with_finite_differences_for_every_trainable_tensor() {
    let f = fixture(true);
    let b = batch();
    let (_, _, grads) = trainer_grads(&f, &b, &settings(WEIGHT, false));
    // For each trainable tensor its element with the largest gradient: finite differences
    // measure it best.
    let picks: Vec<(&str, usize)> = f
        .tuned
        .trainable()
        .iter()
        .map(|(name, _)| {
            let g = grads[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let idx = (0..g.len())
                .max_by(|&i, &j| g[i].abs().total_cmp(&g[j].abs()))
                .unwrap();
            (name.as_str(), idx)
        })
        .collect();
    common::assert_finite_differences_of(
        "klToBase objective",
        &f.tuned,
        |name, _| grads[name].clone(),
        &picks,
        || independent_objective(&f, &b),
    );
}

#[test]
fn at_initialisation_the_penalty_is_zero_and_changes_no_gradient() {
    // Fresh adapters (B = 0) and head rows equal to the base's: the tuned model is the base.
    let f = fixture(false);
    let b = batch();
    let plain = StepSettings::clipped_at(1.0);
    let (loss_plain, none, without) = trainer_grads(&f, &b, &plain);
    assert_eq!(none, None);
    let (loss, kl, with) = trainer_grads(&f, &b, &settings(WEIGHT, false));
    assert!(kl.unwrap().abs() < 1e-6, "{kl:?}");
    assert!((loss - loss_plain).abs() < 1e-6);
    for (name, g) in &without {
        let d = common::max_abs_diff(g, &with[name]);
        assert!(d < 1e-5 * (1.0 + common::max_abs(g)), "{name}: {d}");
    }
}

#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    let f = fixture(true);
    let b = batch();
    let (l1, k1, plain) = trainer_grads(&f, &b, &settings(WEIGHT, false));
    let (l2, k2, recomputed) = trainer_grads(&f, &b, &settings(WEIGHT, true));
    assert!((l1 - l2).abs() < 1e-5);
    assert!((k1.unwrap() - k2.unwrap()).abs() < 1e-5);
    for (name, g) in &plain {
        let d = common::max_abs_diff(g, &recomputed[name]);
        assert!(d < 1e-4 * (1.0 + common::max_abs(g)), "{name}: {d}");
    }
}

#[test]
fn a_zero_weight_is_the_plain_objective() {
    let f = fixture(true);
    let b = batch();
    let (l0, k0, zero) = trainer_grads(&f, &b, &settings(0.0, false));
    let (l1, k1, plain) = trainer_grads(&f, &b, &StepSettings::clipped_at(1.0));
    assert_eq!((k0, k1), (None, None));
    assert_eq!(l0, l1);
    for (name, g) in &plain {
        assert_eq!(common::max_abs_diff(g, &zero[name]), 0.0, "{name}");
    }
    // And the penalty does change them once the model has moved from its base.
    let (_, _, penalised) = trainer_grads(&f, &b, &settings(WEIGHT, false));
    let moved = plain
        .iter()
        .map(|(n, g)| common::max_abs_diff(g, &penalised[n]))
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "{moved}");
}
