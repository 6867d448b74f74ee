//! Training options that must not change results, and one that bounds evaluation:
//! - `gradientCheckpointing`: eight optimizer steps (LoRA with dropout, and full fine-tuning)
//!   give the same losses and the same trained tensors as without it, to rounding;
//! - `evaluation.maxRows`: an evaluation scores exactly the first `maxRows` validation rows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{params, setup};
use finetune_trainer::model::TrainableSpec;
use finetune_trainer::train::Trainer;

fn full() -> TrainableSpec {
    TrainableSpec::Full {
        layers: None,
        embeddings_and_head: true,
    }
}

fn same_training_with_checkpointing(spec: TrainableSpec, name: &str) {
    let (work, model) = setup(name);
    let mut runs = Vec::new();
    for (run, checkpointing) in [("plain", false), ("recomputed", true)] {
        let mut p = params(&work, &model, run, spec.clone());
        p.gradient_checkpointing = checkpointing;
        let mut t = Trainer::new(p, false, None).unwrap();
        t.run(None).unwrap();
        runs.push(t);
    }
    let (a, b) = (&runs[0], &runs[1]);
    assert_eq!(a.history.len(), 8);
    for (x, y) in a.history.iter().zip(&b.history) {
        let rel = (x.loss - y.loss).abs() / x.loss.abs().max(1.0);
        assert!(rel <= 1e-5, "step {}: {} vs {}", x.step, x.loss, y.loss);
    }
    let (wa, wb) = (a.model.trainable_tensors(), b.model.trainable_tensors());
    assert_eq!(wa.len(), wb.len());
    for (k, t) in &wa {
        let d = common::max_abs_diff(t, &wb[k]);
        assert!(d <= 1e-4, "{k} differs by {d} after 8 steps");
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn lora_training_is_the_same_with_gradient_checkpointing() {
    same_training_with_checkpointing(common::lora_with_dropout(), "ckpt-lora");
}

#[test]
fn full_training_is_the_same_with_gradient_checkpointing() {
    same_training_with_checkpointing(full(), "ckpt-full");
}

#[test]
fn an_evaluation_scores_the_first_max_rows_validation_rows() {
    let (work, model) = setup("max-rows");
    let mut p = params(&work, &model, "a", common::lora_with_dropout());
    p.eval.max_rows = 2;
    let mut t = Trainer::new(p, false, None).unwrap();
    assert!(t.data.val.len() > 2, "the fixture has more validation rows");
    let capped = t.evaluate().unwrap().point.val_loss;
    let first_two =
        finetune_trainer::eval::mean_nll(&t.model, &t.data.val[..2], 32, t.model.device()).unwrap();
    let all =
        finetune_trainer::eval::mean_nll(&t.model, &t.data.val, 32, t.model.device()).unwrap();
    // The evaluation scores the rows through the label-scoring path and `mean_nll` through one
    // forward each: equal up to the summation order of the vectorised softmax (rows of
    // different lengths), far below what the cap changes.
    let tolerance = 1e-6 * first_two.abs();
    assert!(
        (capped - first_two).abs() <= tolerance,
        "{capped} vs {first_two}"
    );
    assert!(
        (capped - all).abs() > 100.0 * tolerance,
        "the cap changes what is scored: {capped} vs {all}"
    );
    let _ = std::fs::remove_dir_all(&work);
}
