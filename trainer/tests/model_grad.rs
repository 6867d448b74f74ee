//! Gradient correctness of the own Llama: every trainable tensor receives a gradient, autograd
//! agrees with finite differences, and the forward matches candle-transformers' llama.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use finetune_trainer::model::TrainableSpec;
use finetune_trainer::model::linear::FwdCtx;
use std::collections::HashMap;

const VOCAB: usize = 50;

fn loss_of(model: &finetune_trainer::model::Llama) -> Tensor {
    common::small_batch_loss(model)
}

fn assert_all_grads(spec: TrainableSpec, kv: usize, expected_count: usize) {
    let cfg = common::small_config(VOCAB, kv);
    let w = common::random_weights(&cfg, 11);
    let model = common::build(&cfg, &w, &spec);
    common::perturb_lora_b(&model);
    assert_eq!(model.trainable().len(), expected_count);
    let grads = loss_of(&model).backward().unwrap();
    common::assert_every_trainable_has_a_gradient(&model, &grads);
}

#[test]
fn every_lora_adapter_gets_a_gradient() {
    // 2 layers × 7 modules × (A, B); GQA with 2 kv heads.
    assert_all_grads(TrainableSpec::Lora(common::lora_all(4)), 2, 28);
}

#[test]
fn every_full_trainable_tensor_gets_a_gradient() {
    // 2 layers × (7 linears + 2 norms) + embed + final norm + lm_head.
    assert_all_grads(
        TrainableSpec::Full {
            layers: None,
            embeddings_and_head: true,
        },
        4,
        2 * 9 + 3,
    );
}

#[test]
fn selected_layers_only() {
    let cfg = common::small_config(VOCAB, 4);
    let w = common::random_weights(&cfg, 11);
    let model = common::build(
        &cfg,
        &w,
        &TrainableSpec::Full {
            layers: Some(vec![1]),
            embeddings_and_head: false,
        },
    );
    assert_eq!(model.trainable().len(), 9);
    assert!(
        model
            .trainable()
            .iter()
            .all(|(n, _)| n.starts_with("model.layers.1."))
    );
}

#[test]
fn finite_differences_agree_with_autograd() {
    let cfg = common::small_config(VOCAB, 2);
    let w = common::random_weights(&cfg, 5);
    let model = common::build(
        &cfg,
        &w,
        &TrainableSpec::Full {
            layers: None,
            embeddings_and_head: true,
        },
    );
    let loss = loss_of(&model);
    let grads = loss.backward().unwrap();
    let picks = [
        ("model.layers.0.input_layernorm.weight", 3usize),
        ("model.layers.0.self_attn.q_proj.weight", 17),
        ("model.layers.1.self_attn.k_proj.weight", 5),
        ("model.layers.1.mlp.down_proj.weight", 40),
        ("model.norm.weight", 7),
        ("model.embed_tokens.weight", 5 * 32 + 2),
    ];
    common::assert_finite_differences("full", &model, &grads, &picks);
}

fn peer_logits(
    cfg: &finetune_trainer::model::LlamaConfig,
    w: &HashMap<String, Tensor>,
    ids: &[u32],
) -> Vec<f32> {
    use candle_transformers::models::llama as peer;
    let json = serde_json::to_string(cfg).unwrap();
    let pc: peer::LlamaConfig = serde_json::from_str(&json).unwrap();
    let pc = pc.into_config(false);
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let model = peer::Llama::load(vb, &pc).unwrap();
    let mut cache = peer::Cache::new(false, DType::F32, &pc, &Device::Cpu).unwrap();
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(&x, 0, &mut cache)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn our_last_logits(model: &finetune_trainer::model::Llama, ids: &[u32]) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&x, None, &mut FwdCtx::eval()).unwrap();
    logits
        .squeeze(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn forward_matches_candle_transformers_llama() {
    for kv in [4, 2] {
        let cfg = common::small_config(VOCAB, kv);
        let w = common::random_weights(&cfg, 21);
        let ours = common::build(&cfg, &w, &TrainableSpec::Frozen);
        let ids = [1u32, 4, 9, 16, 25, 36, 49, 3];
        let a = our_last_logits(&ours, &ids);
        let b = peer_logits(&cfg, &w, &ids);
        let d = max_diff(&a, &b);
        assert!(d < 1e-4, "kv={kv}: max |Δlogit| = {d}");
        // And it is not trivially equal: logits vary.
        assert!(a.iter().fold(0f32, |m, x| m.max(x.abs())) > 1e-2);
    }
}

#[test]
fn padding_does_not_change_real_positions() {
    let cfg = common::small_config(VOCAB, 2);
    let w = common::random_weights(&cfg, 2);
    let m = common::build(&cfg, &w, &TrainableSpec::Frozen);
    let short = Tensor::new(&[[1u32, 8, 3, 2]], &Device::Cpu).unwrap();
    let padded = Tensor::new(&[[1u32, 8, 3, 2, 0, 0]], &Device::Cpu).unwrap();
    let a = m.forward(&short, None, &mut FwdCtx::eval()).unwrap();
    let b = m
        .forward(
            &padded,
            Some(&[vec![1, 1, 1, 1, 0, 0]]),
            &mut FwdCtx::eval(),
        )
        .unwrap()
        .narrow(1, 0, 4)
        .unwrap();
    let d = common::max_abs_diff(&a, &b);
    assert!(d < 1e-5, "{d}");
}

#[test]
fn merged_lora_equals_adapters_in_candle_transformers() {
    use finetune_trainer::optim::{AdamW, AdamWParams};
    let cfg = common::small_config(VOCAB, 2);
    let w = common::random_weights(&cfg, 8);
    let model = common::build(&cfg, &w, &TrainableSpec::Lora(common::lora_all(4)));
    let mut opt = AdamW::new(AdamWParams::default());
    for _ in 0..3 {
        let loss = loss_of(&model);
        let g = loss.backward().unwrap();
        let grads: HashMap<String, Tensor> = model
            .trainable()
            .iter()
            .filter_map(|(n, v)| g.get(v.as_tensor()).map(|t| (n.clone(), t.clone())))
            .collect();
        opt.step(model.trainable(), &grads, 1e-2).unwrap();
    }
    let ids = [1u32, 7, 14, 21, 28, 35];
    let ours = our_last_logits(&model, &ids);
    let base = peer_logits(&cfg, &w, &ids);
    assert!(max_diff(&ours, &base) > 1e-3, "adapters had no effect");
    let merged = model.merged_weights().unwrap();
    let peer = peer_logits(&cfg, &merged, &ids);
    let d = max_diff(&ours, &peer);
    assert!(d < 1e-4, "merged vs adapters: {d}");
}
