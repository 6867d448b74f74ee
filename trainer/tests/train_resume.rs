//! Exact resume: K steps after a resume give bit-identical losses to an uninterrupted run, and a
//! corrupt newer checkpoint is reported and skipped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{fixtures, params, setup};
use finetune_trainer::checkpoint::RunIdentity;
use finetune_trainer::model::TrainableSpec;
use finetune_trainer::train::{StopReason, Trainer};
use std::path::PathBuf;

fn check_resume(spec: TrainableSpec, name: &str) {
    let (work, model) = setup(name);
    let mut a = Trainer::new(params(&work, &model, "a", spec.clone()), false, None).unwrap();
    let out = a.run(None).unwrap();
    assert_eq!(out.reason, StopReason::Completed);
    let full: Vec<f32> = a.history.iter().map(|r| r.loss).collect();
    assert_eq!(full.len(), 8);

    let mut b = Trainer::new(params(&work, &model, "b", spec.clone()), false, None).unwrap();
    let out = b.run(Some(5)).unwrap();
    assert_eq!(out.reason, StopReason::Interrupted);
    drop(b);
    let mut c = Trainer::new(params(&work, &model, "b", spec), true, None).unwrap();
    assert_eq!(c.step(), 5);
    c.run(None).unwrap();
    let resumed: Vec<f32> = c.history.iter().map(|r| r.loss).collect();
    assert_eq!(resumed.len(), 8);
    for (i, (x, y)) in full.iter().zip(&resumed).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "step {}: {x} vs {y}", i + 1);
    }
    let wa = a.model.trainable_tensors();
    let wc = c.model.trainable_tensors();
    for (k, t) in &wa {
        let d = common::max_abs_diff(t, &wc[k]);
        assert_eq!(d, 0.0, "{k} differs after resume");
    }
    // Loss moved (training happened).
    assert!(full.iter().any(|l| (l - full[0]).abs() > 1e-4));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn lora_resume_is_bit_identical() {
    check_resume(common::lora_with_dropout(), "resume-lora");
}

#[test]
fn full_resume_is_bit_identical() {
    check_resume(
        TrainableSpec::Full {
            layers: Some(vec![1]),
            embeddings_and_head: false,
        },
        "resume-full",
    );
}

#[test]
fn corrupt_newest_checkpoint_is_skipped() {
    let (work, model) = setup("corrupt");
    let mut b = Trainer::new(
        params(&work, &model, "b", common::lora_with_dropout()),
        false,
        None,
    )
    .unwrap();
    b.run(Some(4)).unwrap();
    drop(b);
    let ckpts = work.join("b/checkpoints");
    // A partial checkpoint (crash before the manifest) and a corrupted one, both newer.
    let partial = ckpts.join("checkpoint-00000050");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("trainable.safetensors"), b"garbage").unwrap();
    let newest = ckpts.join("checkpoint-00000004");
    let corrupt = ckpts.join("checkpoint-00000060");
    std::fs::create_dir_all(&corrupt).unwrap();
    for f in [
        "trainable.safetensors",
        "optimizer.safetensors",
        "state.json",
        "manifest.json",
    ] {
        std::fs::copy(newest.join(f), corrupt.join(f)).unwrap();
    }
    let mut bytes = std::fs::read(corrupt.join("optimizer.safetensors")).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(corrupt.join("optimizer.safetensors"), bytes).unwrap();
    let c = Trainer::new(
        params(&work, &model, "b", common::lora_with_dropout()),
        true,
        None,
    )
    .unwrap();
    let (from, skipped) = c.resumed_from.clone().unwrap();
    assert!(from.ends_with("checkpoint-00000004"), "{from}");
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(
        skipped
            .iter()
            .any(|s| s.contains("checksum mismatch for optimizer.safetensors")),
        "{skipped:?}"
    );
    assert_eq!(c.step(), 4);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn peft_adapter_export_roundtrips() {
    use finetune_trainer::model::Llama;
    use finetune_trainer::model::weights::Weights;
    let (work, model) = setup("peft");
    let spec = common::lora_with_dropout();
    let mut t = Trainer::new(params(&work, &model, "p", spec.clone()), false, None).unwrap();
    t.run(Some(2)).unwrap();
    let out = work.join("out");
    let done = finetune_trainer::train::export::export(
        &t.model,
        &spec,
        &out,
        &fixtures().join("tokenizer-wordlevel.json"),
        "base",
        true,
    )
    .unwrap();
    let adapter = PathBuf::from(done.adapter.unwrap());
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    let tensors = candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(tensors.len(), 2 * 7 * 2);
    assert!(tensors.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(tensors.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    // Reload base + adapter and compare logits with the trained model; and the merged model.
    let cfg = finetune_trainer::model::LlamaConfig::from_file(&model.join("config.json")).unwrap();
    let m2 = Llama::from_weights(
        &cfg,
        Weights::from_dir(&model, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        &spec,
        99,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    m2.load_trainable(&tensors).unwrap();
    let merged_dir = PathBuf::from(done.model.unwrap());
    let m3 = Llama::from_weights(
        &cfg,
        Weights::from_dir(
            &merged_dir,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
        &TrainableSpec::Frozen,
        0,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 14, 20]], &candle_core::Device::Cpu).unwrap();
    let mut ctx = finetune_trainer::model::linear::FwdCtx::eval();
    let a = t.model.forward(&ids, None, &mut ctx).unwrap();
    let b = m2.forward(&ids, None, &mut ctx).unwrap();
    let c = m3.forward(&ids, None, &mut ctx).unwrap();
    let d1 = common::max_abs_diff(&a, &b);
    let d2 = common::max_abs_diff(&a, &c);
    assert_eq!(d1, 0.0);
    assert!(d2 < 1e-4, "{d2}");
    let _ = std::fs::remove_dir_all(&work);
}

/// A run resumes only its own checkpoints: another job's, or one whose weights come from
/// another training, is refused with both identities in the error (and nothing is loaded).
#[test]
fn another_runs_checkpoint_is_refused() {
    let (work, model) = setup("foreign");
    let with = |uid: &str, fingerprint: &str| {
        let mut p = params(&work, &model, "b", common::lora_with_dropout());
        p.run = RunIdentity {
            job_uid: uid.into(),
            training_fingerprint: fingerprint.into(),
            ..RunIdentity::default()
        };
        p
    };
    let mut first = Trainer::new(with("uid-1", "f-a"), false, None).unwrap();
    first.run(Some(4)).unwrap();
    drop(first);
    let err = Trainer::new(with("uid-2", "f-a"), true, None)
        .err()
        .expect("another job's checkpoint was resumed")
        .to_string();
    assert!(
        err.contains("uid-1") && err.contains("uid-2") && err.contains("checkpoint-00000004"),
        "{err}"
    );
    let err = Trainer::new(with("uid-1", "f-b"), true, None)
        .err()
        .expect("another training's checkpoint was resumed")
        .to_string();
    assert!(err.contains("f-a") && err.contains("f-b"), "{err}");
    let same = Trainer::new(with("uid-1", "f-a"), true, None).unwrap();
    assert_eq!(same.step(), 4, "its own checkpoint resumes");
    let _ = std::fs::remove_dir_all(&work);
}
