//! LoRA with trainable `lm_head` rows (`method.lora.trainLabelTokens`, PEFT's
//! `trainable_token_indices` on `lm_head`): every trainable tensor gets a gradient, the rows'
//! gradient agrees with finite differences and equals the full head's gradient at those rows
//! (the path it replaces), only the chosen tokens' logits move, and the PEFT adapter round-trips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{Device, IndexOp, Tensor};
use finetune_trainer::model::head_rows::PEFT_HEAD_ROWS_NAME;
use finetune_trainer::model::linear::FwdCtx;
use finetune_trainer::model::load::{ModelRef, load_for_inference, read_adapter_config};
use finetune_trainer::model::lora::write_peft_adapter;
use finetune_trainer::model::{Llama, LoraSettings, TrainableSpec};

const VOCAB: usize = 50;
/// The rows trained: two of the batch's targets (13, 2) and one token no target uses (40).
const ROWS: [u32; 3] = [13, 40, 2];

fn settings() -> LoraSettings {
    LoraSettings {
        head_token_ids: ROWS.to_vec(),
        ..common::lora_all(4)
    }
}

fn loss_of(model: &Llama) -> Tensor {
    common::small_batch_loss(model)
}

fn head_rows_var(model: &Llama) -> &candle_core::Var {
    &model
        .trainable()
        .iter()
        .find(|(n, _)| n == PEFT_HEAD_ROWS_NAME)
        .expect("the head rows are trainable")
        .1
}

fn model_with_rows() -> (Llama, finetune_trainer::model::LlamaConfig) {
    let cfg = common::small_config(VOCAB, 2);
    let w = common::random_weights(&cfg, 11);
    (
        common::build(&cfg, &w, &TrainableSpec::Lora(settings())),
        cfg,
    )
}

#[test]
fn every_tensor_gets_a_gradient_and_the_rows_agree_with_finite_differences() {
    let (model, _) = model_with_rows();
    common::perturb_lora_b(&model);
    // 2 layers × 7 modules × (A, B), and the rows.
    assert_eq!(model.trainable().len(), 29);
    let grads = loss_of(&model).backward().unwrap();
    common::assert_every_trainable_has_a_gradient(&model, &grads);
    // Rows of a target (13), of no target (40) and of the padding-adjacent EOS (2).
    let hidden = head_rows_var(&model).dims()[1];
    let picks: Vec<(&str, usize)> = [(0usize, 3usize), (2, 17), (1, 5)]
        .iter()
        .map(|(row, col)| (PEFT_HEAD_ROWS_NAME, row * hidden + col))
        .collect();
    common::assert_finite_differences("lm_head rows", &model, &grads, &picks);
}

#[test]
fn the_rows_gradient_equals_the_full_heads_gradient_at_those_rows() {
    // With LoRA B at zero both models compute the base's function, so the trained rows' gradient
    // must equal rows 13, 40 and 2 of the gradient full fine-tuning gives the whole head.
    let cfg = common::small_config(VOCAB, 2);
    let w = common::random_weights(&cfg, 11);
    let lora = common::build(&cfg, &w, &TrainableSpec::Lora(settings()));
    let full = common::build(
        &cfg,
        &w,
        &TrainableSpec::Full {
            layers: None,
            embeddings_and_head: true,
        },
    );
    let g_rows = loss_of(&lora).backward().unwrap();
    let g_rows = g_rows.get(head_rows_var(&lora).as_tensor()).unwrap();
    let head = &full
        .trainable()
        .iter()
        .find(|(n, _)| n == "lm_head.weight")
        .unwrap()
        .1;
    let g_full = loss_of(&full).backward().unwrap();
    let ids = Tensor::new(&ROWS, &Device::Cpu).unwrap();
    let g_full = g_full
        .get(head.as_tensor())
        .unwrap()
        .index_select(&ids, 0)
        .unwrap();
    // Row 40 is no target: its gradient is the softmax's alone, still non-zero.
    common::assert_close_to_reference("lm_head rows", g_rows, &g_full, 1e-6);
}

#[test]
fn only_the_chosen_tokens_logits_move_and_the_adapter_round_trips() {
    let (model, cfg) = model_with_rows();
    common::perturb_lora_b(&model);
    let frozen_w = common::random_weights(&cfg, 11);
    let base = common::build(&cfg, &frozen_w, &TrainableSpec::Frozen);
    let trained = Tensor::randn(0f32, 1.0, (ROWS.len(), cfg.hidden_size), &Device::Cpu).unwrap();
    head_rows_var(&model).set(&trained).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 14, 20]], &Device::Cpu).unwrap();
    let mut ctx = FwdCtx::eval();
    let ours = model.forward(&ids, None, &mut ctx).unwrap().i(0).unwrap();
    // The same model without the rows: LoRA alone.
    let lora_only = common::build(&cfg, &frozen_w, &TrainableSpec::Lora(common::lora_all(4)));
    lora_only
        .load_trainable(&model.trainable_tensors())
        .unwrap();
    let without = lora_only
        .forward(&ids, None, &mut ctx)
        .unwrap()
        .i(0)
        .unwrap();
    let moved: Vec<u32> = (0..VOCAB as u32)
        .filter(|&t| {
            let a = ours.i((.., t as usize)).unwrap();
            let b = without.i((.., t as usize)).unwrap();
            common::max_abs_diff(&a, &b) > 0.0
        })
        .collect();
    let mut want = ROWS.to_vec();
    want.sort_unstable();
    assert_eq!(moved, want, "only the trained rows' logits change");
    assert!(
        common::max_abs_diff(
            &ours,
            &base.forward(&ids, None, &mut ctx).unwrap().i(0).unwrap()
        ) > 0.0
    );

    // The PEFT adapter names the rows and reloads to the same logits; merged weights too.
    let dir = std::env::temp_dir().join(format!("head-rows-{}", std::process::id()));
    let model_dir = dir.join("base");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::write(
        model_dir.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(&frozen_w, model_dir.join("model.safetensors")).unwrap();
    let adapter = dir.join("adapter");
    write_peft_adapter(&adapter, &settings(), &model.trainable_tensors(), "base").unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["trainable_token_indices"]["lm_head"],
        serde_json::json!(ROWS)
    );
    assert_eq!(read_adapter_config(&adapter).unwrap().head_token_ids, ROWS);
    let (reloaded, _) = load_for_inference(
        &ModelRef {
            model: model_dir.clone(),
            adapter: Some(adapter),
        },
        &Device::Cpu,
    )
    .unwrap();
    let again = reloaded
        .forward(&ids, None, &mut ctx)
        .unwrap()
        .i(0)
        .unwrap();
    assert_eq!(common::max_abs_diff(&ours, &again), 0.0);
    let merged = common::build(
        &cfg,
        &model.merged_weights().unwrap(),
        &TrainableSpec::Frozen,
    );
    let merged = merged.forward(&ids, None, &mut ctx).unwrap().i(0).unwrap();
    assert!(common::max_abs_diff(&ours, &merged) < 1e-4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_tied_head_or_a_list_for_the_embedding_is_refused() {
    let mut cfg = common::small_config(VOCAB, 2);
    cfg.tie_word_embeddings = true;
    let mut w = common::random_weights(&cfg, 11);
    w.remove("lm_head.weight");
    let err = Llama::from_weights(
        &cfg,
        finetune_trainer::model::weights::Weights::from_map(w),
        &TrainableSpec::Lora(settings()),
        3,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("trainLabelTokens"), "{err}");

    // PEFT's plain list means the input embedding, which this trainer does not train.
    let dir = std::env::temp_dir().join(format!("head-rows-list-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "trainable_token_indices": [3, 4]}"#,
    )
    .unwrap();
    let err = read_adapter_config(&dir).unwrap_err().to_string();
    assert!(err.contains("trainable_token_indices"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
