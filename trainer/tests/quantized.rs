//! LoRA over a quantized frozen base (`method.lora.baseQuantization`): the quantized op's input
//! gradient equals the dequantized-f32 reference, finite differences agree through it, every
//! trainable tensor gets a gradient and no frozen projection does, the forward stays close to the
//! unquantized model, and merged weights come from the unquantized base.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor, Var};
use finetune_api::BaseQuantization;
use finetune_trainer::model::frozen::quantized_matmul;
use finetune_trainer::model::linear::{FwdCtx, Weight, ggml_dtype};
use finetune_trainer::model::{Llama, LoraSettings, TrainableSpec};

const VOCAB: usize = 50;
const FORMATS: [BaseQuantization; 2] = [BaseQuantization::Int8, BaseQuantization::Int4];

/// The small test model with an MLP width that quantizes (blocks of 32 along each row).
fn quant_config() -> finetune_trainer::model::LlamaConfig {
    let mut c = common::small_config(VOCAB, 2);
    c.intermediate_size = 64;
    c
}

fn weight(out: usize, inp: usize) -> Tensor {
    Tensor::randn(0f32, 0.5, (out, inp), &Device::Cpu).unwrap()
}

#[test]
fn the_input_gradient_equals_the_dequantized_reference() {
    for format in FORMATS {
        let w = weight(48, 64);
        let q = Arc::new(QTensor::quantize(&w, ggml_dtype(format).unwrap()).unwrap());
        let deq = q.dequantize(&Device::Cpu).unwrap();
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 64), &Device::Cpu).unwrap()).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, (5, 48), &Device::Cpu).unwrap();
        let y = quantized_matmul(x.as_tensor(), &q).unwrap();
        let g = (y * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got = g.get(x.as_tensor()).unwrap();
        // d/dx Σ(up ⊙ x·Dᵀ) = up · D with D the dequantized weight, exactly the backward's product.
        let want = upstream.matmul(&deq).unwrap();
        common::assert_close_to_reference(&format!("{format:?} dx"), got, &want, 1e-6);
        // The forward is x·Dᵀ (no activation quantization), so finite differences hold.
        let reference = x.as_tensor().matmul(&deq.t().unwrap()).unwrap();
        let y = quantized_matmul(x.as_tensor(), &q).unwrap();
        common::assert_close_to_reference(&format!("{format:?} y"), &y, &reference, 1e-6);
    }
}

fn lora(format: BaseQuantization) -> TrainableSpec {
    TrainableSpec::Lora(LoraSettings {
        base_quantization: format,
        ..common::lora_all(4)
    })
}

fn loss_of(model: &Llama) -> Tensor {
    common::small_batch_loss(model)
}

#[test]
fn every_adapter_gets_a_gradient_and_finite_differences_agree() {
    let cfg = quant_config();
    let w = common::random_weights(&cfg, 11);
    for format in FORMATS {
        let model = common::build(&cfg, &w, &lora(format));
        common::perturb_lora_b(&model);
        // 2 layers × 7 projections × (A, B): the quantized weights are not trainable.
        assert_eq!(model.trainable().len(), 28);
        let grads = loss_of(&model).backward().unwrap();
        common::assert_every_trainable_has_a_gradient(&model, &grads);
        // Finite differences through two quantized layers (the gradient reaches layer 0's
        // adapters through layer 1's quantized projections).
        common::assert_finite_differences(
            &format!("{format:?}"),
            &model,
            &grads,
            &[
                (
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                    7,
                ),
                (
                    "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight",
                    3,
                ),
                (
                    "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
                    11,
                ),
            ],
        );
    }
}

#[test]
fn the_quantized_model_stays_close_to_the_unquantized_one() {
    let cfg = quant_config();
    let w = common::random_weights(&cfg, 11);
    let dense = common::build(&cfg, &w, &lora(BaseQuantization::None));
    let ids = Tensor::new(&[[1u32, 5, 9, 14, 20, 33]], &Device::Cpu).unwrap();
    let mut ctx = FwdCtx::eval();
    let reference = dense.forward(&ids, None, &mut ctx).unwrap();
    let scale = common::max_abs(&reference);
    let mut errors = Vec::new();
    for format in FORMATS {
        let model = common::build(&cfg, &w, &lora(format));
        let logits = model.forward(&ids, None, &mut ctx).unwrap();
        errors.push(common::max_abs_diff(&logits, &reference) / scale);
    }
    // On these random weights (scaled ×5, so every layer matters): 8 bits within 3 % of the
    // logits' range, 4 bits within 35 % (measured 1.0 % and 24.1 %), and 8 bits closer than 4.
    assert!(errors[0] < 0.03 && errors[1] < 0.35, "{errors:?}");
    assert!(errors[0] < errors[1], "{errors:?}");
}

#[test]
fn the_projections_are_quantized_and_the_merge_uses_the_unquantized_base() {
    let cfg = quant_config();
    let w = common::random_weights(&cfg, 11);
    let model = common::build(&cfg, &w, &lora(BaseQuantization::Int4));
    common::perturb_lora_b(&model);
    let dir = std::env::temp_dir().join(format!("quantized-merge-{}", std::process::id()));
    let base_dir = dir.join("base");
    std::fs::create_dir_all(&base_dir).unwrap();
    std::fs::write(
        base_dir.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(&w, base_dir.join("model.safetensors")).unwrap();
    let tokenizer = common::fixtures().join("tokenizer-wordlevel.json");
    let out = dir.join("out");
    let done = finetune_trainer::train::export::export(
        &model,
        &lora(BaseQuantization::Int4),
        &out,
        &tokenizer,
        base_dir.to_str().unwrap(),
        true,
    )
    .unwrap();
    let merged = candle_core::safetensors::load(
        std::path::Path::new(&done.model.unwrap()).join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    // The same adapters on the f32 base, merged: equal to what was written.
    let dense = common::build(&cfg, &w, &lora(BaseQuantization::None));
    dense.load_trainable(&model.trainable_tensors()).unwrap();
    let want = dense.merged_weights().unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    assert_eq!(common::max_abs_diff(&merged[name], &want[name]), 0.0);
    // …and not what the dequantized 4-bit copy would give.
    let from_quantized = model.merged_weights().unwrap();
    assert!(common::max_abs_diff(&merged[name], &from_quantized[name]) > 1e-3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_quantized_projection_holds_no_dense_weight() {
    let cfg = quant_config();
    let w = common::random_weights(&cfg, 11);
    let linear = finetune_trainer::model::Linear::frozen(
        w["model.layers.0.mlp.gate_proj.weight"].clone(),
        BaseQuantization::Int8,
    )
    .unwrap();
    assert!(matches!(linear.weight, Weight::Quantized(_)));
    assert_eq!(linear.out_dim(), cfg.intermediate_size);
    assert!(!linear.weight_trained());
}

#[test]
fn loading_quantizes_the_projections_one_tensor_at_a_time_and_equals_quantizing_after() {
    use finetune_trainer::model::weights::{Weights, is_projection_weight};
    let cfg = quant_config();
    let w = common::random_weights(&cfg, 11);
    let dir = std::env::temp_dir().join(format!("quantized-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("model.safetensors");
    candle_core::safetensors::save(&w, &file).unwrap();
    assert!(is_projection_weight("model.layers.12.mlp.down_proj.weight"));
    assert!(!is_projection_weight(
        "model.layers.0.input_layernorm.weight"
    ));
    assert!(!is_projection_weight("lm_head.weight"));
    let mut loaded = Weights::load_quantizing(
        std::slice::from_ref(&file),
        DType::F32,
        &Device::Cpu,
        ggml_dtype(BaseQuantization::Int4),
    )
    .unwrap();
    let q = loaded
        .take_quantized("model.layers.0.self_attn.q_proj.weight", &[32, 32])
        .unwrap()
        .expect("a projection is quantized while loading");
    assert_eq!(q.dtype(), ggml_dtype(BaseQuantization::Int4).unwrap());
    assert!(
        loaded
            .take_quantized("model.norm.weight", &[32])
            .unwrap()
            .is_none(),
        "norms stay dense"
    );
    // A model built from the quantizing loader equals one quantized after a dense load.
    let from_loader = Llama::from_weights(
        &cfg,
        Weights::load_quantizing(
            std::slice::from_ref(&file),
            DType::F32,
            &Device::Cpu,
            ggml_dtype(BaseQuantization::Int4),
        )
        .unwrap(),
        &lora(BaseQuantization::Int4),
        3,
        &Device::Cpu,
    )
    .unwrap();
    let after = common::build(&cfg, &w, &lora(BaseQuantization::Int4));
    let ids = Tensor::new(&[[1u32, 5, 9, 14]], &Device::Cpu).unwrap();
    let mut ctx = FwdCtx::eval();
    let a = from_loader.forward(&ids, None, &mut ctx).unwrap();
    let b = after.forward(&ids, None, &mut ctx).unwrap();
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    // A quantized weight with a full fine-tuning spec is refused by name.
    let err = Llama::from_weights(
        &cfg,
        Weights::load_quantizing(
            std::slice::from_ref(&file),
            DType::F32,
            &Device::Cpu,
            ggml_dtype(BaseQuantization::Int8),
        )
        .unwrap(),
        &TrainableSpec::Full {
            layers: None,
            embeddings_and_head: true,
        },
        3,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("only LoRA trains over a quantized base"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
