//! The decoder layers split over devices (`resources.spread: layers`): the split model computes
//! what the one-device model computes, the loss, every trainable tensor's gradient (plain and
//! activation-checkpointed backward), greedy generation with its KV cache, and a whole training
//! run with `layerGpus` set.
//!
//! Here every device of the split is the CPU (the trainer's CPU stand-in for a split), so these
//! tests run the split code path (per-device placement of weights and adapters, per-device RoPE
//! tables and attention bias, the hidden state and its gradient handed between layers' devices,
//! gradient clipping per device) but not a real transfer between two memories: that runs on a
//! GPU in `scripts/gpu-check.sh` (a LoRA step over `cuda:0` and the CPU against one device).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{Device, Tensor};
use finetune_trainer::model::linear::FwdCtx;
use finetune_trainer::model::weights::Weights;
use finetune_trainer::model::{LayerDevices, Llama, LlamaConfig, LoraSettings, TrainableSpec};
use finetune_trainer::rng::Rng;
use finetune_trainer::train::Trainer;

const VOCAB: usize = 50;

fn config() -> LlamaConfig {
    let mut cfg = common::small_config(VOCAB, 2);
    cfg.num_hidden_layers = 3;
    cfg
}

/// The model on one device, and split: layer 0 on the first device, layers 1-2 on the second.
fn both(spec: &TrainableSpec) -> (Llama, Llama) {
    let cfg = config();
    let w = common::random_weights(&cfg, 23);
    let one = common::build(&cfg, &w, spec);
    let placement = LayerDevices::new(vec![Device::Cpu, Device::Cpu], vec![0, 1, 1]).unwrap();
    let split =
        Llama::from_weights_placed(&cfg, Weights::from_map(w), spec, 3, &placement).unwrap();
    assert!(split.placement().is_split());
    common::perturb_lora_b(&one);
    split.load_trainable(&one.trainable_tensors()).unwrap();
    (one, split)
}

fn loss_and_grads(model: &Llama, recompute: bool) -> finetune_trainer::model::LossAndGrads {
    let ids = Tensor::new(&[[1u32, 5, 9, 13, 7, 2], [1, 8, 3, 2, 0, 0]], &Device::Cpu).unwrap();
    let mask = vec![vec![1, 1, 1, 1, 1, 1], vec![1, 1, 1, 1, 0, 0]];
    let rows = Tensor::new(&[2u32, 3, 4, 7, 8], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[13u32, 7, 2, 3, 2], &Device::Cpu).unwrap();
    let mut ctx = FwdCtx::train(Some(Rng::derive(5, 1)));
    model
        .loss_and_grads(&ids, Some(&mask), &rows, &mut ctx, recompute, |h| {
            h.cross_entropy(&targets)
        })
        .unwrap()
}

fn assert_split_equals_one_device(spec: TrainableSpec) {
    let (one, split) = both(&spec);
    assert_eq!(one.trainable().len(), split.trainable().len());
    for recompute in [false, true] {
        let (a, b) = (
            loss_and_grads(&one, recompute),
            loss_and_grads(&split, recompute),
        );
        assert!(
            (a.loss - b.loss).abs() <= 1e-6,
            "{spec:?}: {} vs {}",
            a.loss,
            b.loss
        );
        assert_eq!(a.grads.len(), one.trainable().len(), "{spec:?}");
        assert_eq!(b.grads.len(), a.grads.len(), "{spec:?}");
        for (name, _) in one.trainable() {
            let (x, y) = (a.grads.get(name).unwrap(), b.grads.get(name).unwrap());
            assert!(common::max_abs(x) > 0.0, "{name}: no gradient");
            assert!(
                common::max_abs_diff(x, y) <= 1e-6 * common::max_abs(x).max(1.0),
                "{spec:?} recompute {recompute}: {name}"
            );
        }
    }
}

#[test]
fn lora_with_dropout_and_label_rows_gets_the_one_device_gradients() {
    assert_split_equals_one_device(TrainableSpec::Lora(LoraSettings {
        dropout: 0.1,
        head_token_ids: vec![3, 7],
        ..common::lora_all(4)
    }));
}

#[test]
fn full_fine_tuning_with_embeddings_and_head_gets_the_one_device_gradients() {
    assert_split_equals_one_device(TrainableSpec::Full {
        layers: None,
        embeddings_and_head: true,
    });
}

#[test]
fn generation_with_the_kv_cache_is_the_one_device_generation() {
    let (one, split) = both(&TrainableSpec::Lora(common::lora_all(2)));
    let prompt = [1u32, 4, 9, 16, 25];
    assert_eq!(
        one.generate_greedy(&prompt, 8, None).unwrap(),
        split.generate_greedy(&prompt, 8, None).unwrap()
    );
}

#[test]
fn a_training_run_with_layer_gpus_equals_the_one_device_run() {
    let (work, model) = common::setup("layer-split");
    let run = |name: &str, layer_gpus: Vec<usize>| {
        let mut p = common::params(
            &work,
            &model,
            name,
            TrainableSpec::Lora(LoraSettings {
                dropout: 0.05,
                ..common::lora_all(4)
            }),
        );
        p.layer_gpus = layer_gpus;
        p.gradient_checkpointing = true;
        p.max_grad_norm = 0.5;
        let mut t = Trainer::new(p, false, None).unwrap();
        t.run(None).unwrap();
        let losses: Vec<f32> = t.history.iter().map(|r| r.loss).collect();
        (
            losses,
            t.model.trainable_tensors(),
            t.model.placement().is_split(),
        )
    };
    let (one_losses, one_weights, one_split) = run("one", vec![]);
    let (split_losses, split_weights, split) = run("split", vec![0, 1]);
    assert!(!one_split && split);
    assert_eq!(one_losses.len(), 8);
    assert_eq!(one_losses, split_losses);
    for (name, w) in &one_weights {
        assert!(
            common::max_abs_diff(w, &split_weights[name]) <= 1e-6,
            "{name}"
        );
    }
    // A placement that does not cover the model's layers is refused by name.
    let mut p = common::params(
        &work,
        &model,
        "bad",
        TrainableSpec::Lora(common::lora_all(4)),
    );
    p.layer_gpus = vec![0, 1, 1];
    let err = Trainer::new(p, false, None).err().unwrap().to_string();
    assert!(err.contains("layerGpus"), "{err}");
    let _ = std::fs::remove_dir_all(&work);
}

/// `finetune-trainer split-check` on `model` with `ids`.
fn split_check(model: &std::path::Path, ids: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_finetune-trainer"))
        .args(["split-check", "--model"])
        .arg(model)
        .args(["--ids", ids])
        .output()
        .unwrap()
}

#[test]
fn the_split_check_command_compares_every_gradient_and_passes() {
    let (work, model) = common::setup("split-check");
    let out = split_check(&model, "1,5,9,13,7,2");
    let line: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{line}");
    assert_eq!(line["devices"], "cpu+cpu");
    // Two passes (plain and checkpointed) over every LoRA A and B of 2 layers × 7 modules.
    assert_eq!(line["gradients_compared"], 2 * 2 * 7 * 2);
    assert_eq!(line["ok"], true);
    let one = split_check(&model, "1");
    assert!(!one.status.success());
    assert!(String::from_utf8_lossy(&one.stderr).contains("--ids"));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_quantized_base_loads_onto_its_layers_devices_and_trains_as_on_one_device() {
    use finetune_trainer::model::linear::ggml_dtype;
    use finetune_trainer::model::weights::weight_files;
    let work = std::env::temp_dir().join(format!("ft-split-quantized-{}", std::process::id()));
    let model_dir = work.join("model");
    let mut cfg = common::small_config(64, 2);
    cfg.intermediate_size = 64; // every projection's rows split into blocks of 32
    let w = common::random_weights(&cfg, 4);
    finetune_trainer::model::tiny::write_hf_model(&model_dir, &cfg, &w).unwrap();
    let files = weight_files(&model_dir).unwrap();
    let quantized = finetune_api::BaseQuantization::Int8;
    let spec = TrainableSpec::Lora(LoraSettings {
        base_quantization: quantized,
        ..common::lora_all(4)
    });
    let load = |placement: &LayerDevices| {
        let w = Weights::load_quantizing(
            &files,
            candle_core::DType::F32,
            placement,
            ggml_dtype(quantized),
        )
        .unwrap();
        Llama::from_weights_placed(&cfg, w, &spec, 3, placement).unwrap()
    };
    let one = load(&LayerDevices::single(&Device::Cpu, cfg.num_hidden_layers));
    let split = load(&LayerDevices::new(vec![Device::Cpu, Device::Cpu], vec![0, 1]).unwrap());
    common::perturb_lora_b(&one);
    split.load_trainable(&one.trainable_tensors()).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 13, 7, 2]], &Device::Cpu).unwrap();
    let rows = Tensor::new(&[1u32, 2, 3, 4], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[9u32, 13, 7, 2], &Device::Cpu).unwrap();
    let run = |m: &Llama| {
        m.loss_and_grads(&ids, None, &rows, &mut FwdCtx::train(None), true, |h| {
            h.cross_entropy(&targets)
        })
        .unwrap()
    };
    let (a, b) = (run(&one), run(&split));
    assert_eq!(a.loss, b.loss);
    assert_eq!(a.grads.len(), one.trainable().len());
    for (name, _) in one.trainable() {
        let (x, y) = (a.grads.get(name).unwrap(), b.grads.get(name).unwrap());
        assert!(
            common::max_abs_diff(x, y) <= 1e-6 * common::max_abs(x).max(1.0),
            "{name}"
        );
    }
    let _ = std::fs::remove_dir_all(&work);
}
