//! Shared helpers for the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use candle_core::{Device, Tensor};
use finetune_trainer::model::weights::Weights;
use finetune_trainer::model::{Llama, LlamaConfig, LoraSettings, TrainableSpec, tiny};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use finetune_trainer::data::jsonl::ColumnMapping;
use finetune_trainer::train::TrainParams;

/// A small config (GQA when `kv_heads < 4`).
pub fn small_config(vocab: usize, kv_heads: usize) -> LlamaConfig {
    let mut c = tiny::tiny_config(vocab);
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(kv_heads);
    c.max_position_embeddings = 64;
    c
}

/// Random weights with unit-ish norms perturbed so norm gradients are informative.
pub fn random_weights(cfg: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut w = tiny::init_weights(cfg, seed, &Device::Cpu).unwrap();
    // Larger-than-default init so activations (and gradients) are not tiny.
    for (k, t) in w.iter_mut() {
        if !k.contains("norm") {
            *t = (&*t * 5.0).unwrap();
        }
    }
    w
}

pub fn lora_all(rank: usize) -> LoraSettings {
    LoraSettings {
        rank,
        alpha: 2.0 * rank as f64,
        dropout: 0.0,
        target_modules: finetune_trainer::model::lora::ALL_TARGETS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        layers: None,
        train_label_tokens: false,
        head_token_ids: vec![],
        base_quantization: finetune_api::BaseQuantization::None,
    }
}

pub fn build(cfg: &LlamaConfig, w: &HashMap<String, Tensor>, spec: &TrainableSpec) -> Llama {
    Llama::from_weights(cfg, Weights::from_map(w.clone()), spec, 3, &Device::Cpu).unwrap()
}

/// Directory of the real assets (fetched by scripts/fetch-assets.sh), or None to skip.
pub fn assets_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("FINETUNE_ASSETS_DIR") {
        let p = PathBuf::from(d);
        if p.join("tokenizer.json").exists() {
            return Some(p);
        }
    }
    // The script returns at once when its cache is complete, and replaces a stale tokenizer.
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-assets.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "fetch-assets failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    dir.join("tokenizer.json").exists().then_some(dir)
}

/// Whether tests needing the real assets must fail instead of skipping.
pub fn require_assets() -> bool {
    std::env::var("FINETUNE_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
}

/// An encoded example whose tokens from `first_target` on are the answer (the loss targets).
pub fn encoded(ids: &[u32], first_target: usize) -> finetune_trainer::data::encode::Encoded {
    finetune_trainer::data::encode::Encoded {
        ids: ids.to_vec(),
        target: (0..ids.len())
            .map(|t| u8::from(t >= first_target))
            .collect(),
        label: None,
        truncated: false,
        prompt_len: first_target,
    }
}

/// LoRA B starts at zero, which makes A's gradient zero: gives every B small random values.
pub fn perturb_lora_b(model: &Llama) {
    for (name, var) in model.trainable() {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

/// Masked cross-entropy of a fixed two-row batch (the second right padded) on five positions,
/// with the backward graph: the batch of the gradient tests.
pub fn small_batch_loss(model: &Llama) -> Tensor {
    use finetune_trainer::model::linear::FwdCtx;
    let ids = Tensor::new(&[[1u32, 5, 9, 13, 7, 2], [1, 8, 3, 2, 0, 0]], &Device::Cpu).unwrap();
    let mask = vec![vec![1, 1, 1, 1, 1, 1], vec![1, 1, 1, 1, 0, 0]];
    let rows = Tensor::new(&[2u32, 3, 4, 7, 8], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[13u32, 7, 2, 3, 2], &Device::Cpu).unwrap();
    let mut ctx = FwdCtx::train(None);
    let logits = model.logits_at(&ids, Some(&mask), &rows, &mut ctx).unwrap();
    finetune_trainer::loss::masked_cross_entropy(&logits, &targets).unwrap()
}

/// Asserts that every trainable tensor of `model` has a non-zero, finite gradient in `grads`.
pub fn assert_every_trainable_has_a_gradient(
    model: &Llama,
    grads: &candle_core::backprop::GradStore,
) {
    for (name, var) in model.trainable() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            n > 0.0 && n.is_finite(),
            "zero/NaN gradient for {name}: {n}"
        );
    }
}

/// Asserts, for each `(name, idx)` of `picks`, that the gradient in `grads` of element `idx` of
/// the trainable tensor `name` agrees with the central finite difference (step 1e-2) of
/// [`small_batch_loss`], within 2 % + 2e-4; restores each tensor. `what` prefixes failures.
pub fn assert_finite_differences(
    what: &str,
    model: &Llama,
    grads: &candle_core::backprop::GradStore,
    picks: &[(&str, usize)],
) {
    let analytic = |name: &str, var: &candle_core::Var| {
        let _ = name;
        grads.get(var.as_tensor()).unwrap().clone()
    };
    assert_finite_differences_of(what, model, analytic, picks, || small_batch_loss(model));
}

/// [`assert_finite_differences`] for any scalar `loss` of `model` and gradients given by name
/// and tensor through `analytic`.
pub fn assert_finite_differences_of(
    what: &str,
    model: &Llama,
    analytic: impl Fn(&str, &candle_core::Var) -> Tensor,
    picks: &[(&str, usize)],
    loss: impl Fn() -> Tensor,
) {
    let vars: Vec<(&str, &candle_core::Var)> = picks
        .iter()
        .map(|(name, _)| {
            let (_, var) = model
                .trainable()
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no trainable tensor {name}"));
            (*name, var)
        })
        .collect();
    assert_finite_differences_of_vars(what, &vars, analytic, picks, loss);
}

/// For each `(name, idx)` of `picks`, element `idx` of the tensor `name` of `vars`: its gradient
/// from `analytic` against the central finite difference (step 1e-2) of the scalar `loss`,
/// within 2 % + 2e-4; restores each tensor.
pub fn assert_finite_differences_of_vars(
    what: &str,
    vars: &[(&str, &candle_core::Var)],
    analytic: impl Fn(&str, &candle_core::Var) -> Tensor,
    picks: &[(&str, usize)],
    loss: impl Fn() -> Tensor,
) {
    let loss = || {
        loss()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let eps = 1e-2f64;
    for &(name, idx) in picks {
        let (_, var) = vars
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        let g = analytic(name, var).flatten_all().unwrap();
        let analytic = g.to_vec1::<f32>().unwrap()[idx] as f64;
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let eval_at = |delta: f64| {
            let mut v = orig.clone();
            v[idx] += delta as f32;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss()
        };
        let numeric = (eval_at(eps) - eval_at(-eps)) / (2.0 * eps);
        var.set(&Tensor::from_vec(orig, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let tol = 2e-2 * analytic.abs().max(numeric.abs()) + 2e-4;
        assert!(
            (analytic - numeric).abs() < tol,
            "{what} {name}[{idx}]: autograd {analytic} vs finite difference {numeric}"
        );
    }
}

/// max |t| over all elements, as f32.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts that `reference` is not all zero and that `got` is within `tol` of it, relative to
/// max |reference| (at least 1); `what` names the tensor in the failure.
pub fn assert_close_to_reference(what: &str, got: &Tensor, reference: &Tensor, tol: f32) {
    let scale = max_abs(reference);
    assert!(scale > 0.0, "{what}: zero reference");
    let d = max_abs_diff(got, reference);
    assert!(
        d <= tol * scale.max(1.0),
        "{what}: differs by {d} from the reference (max |reference| {scale})"
    );
}

/// LoRA r=4 on every module with dropout 0.1 (exercises the dropout stream).
pub fn lora_with_dropout() -> TrainableSpec {
    let mut l = lora_all(4);
    l.dropout = 0.1;
    TrainableSpec::Lora(l)
}

/// max |a − b| over all elements, as f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The trainer tests' fixture directory.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A work directory for `name` and a small random model written in it (HF layout).
pub fn setup(name: &str) -> (PathBuf, PathBuf) {
    let work = std::env::temp_dir().join(format!("ft-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let model = work.join("model");
    let cfg = small_config(64, 2);
    let w = random_weights(&cfg, 4);
    tiny::write_hf_model(&model, &cfg, &w).unwrap();
    (work, model)
}

/// Short-run parameters (8 steps, batch 4 × 2 accumulated) on the small review fixture.
pub fn params(work: &Path, model: &Path, run: &str, spec: TrainableSpec) -> TrainParams {
    let mut p = TrainParams::with_defaults(
        model,
        fixtures().join("tokenizer-wordlevel.json"),
        fixtures().join("reviews-small.csv"),
        work.join(run),
    );
    p.cleaning.columns = ColumnMapping {
        text: "ReviewText".into(),
        label: "SentimentLabel".into(),
        ..Default::default()
    };
    p.method = spec;
    p.batch_size = 4;
    p.grad_accum = 2;
    p.max_steps = Some(8);
    p.learning_rate = 5e-3;
    p.warmup_steps = 2;
    p.eval.interval = 3;
    p.checkpoint_interval = 2;
    p.max_seq_len = 48;
    p
}

/// The trainer configuration of `spec` for the `finetune-trainer train` binary, written to
/// `work/trainer.yaml`: the model in `model`, the word-level tokenizer and the small review
/// fixture, checkpoints, outputs and the termination message under `work`.
pub fn trainer_config_file(
    work: &Path,
    model: &Path,
    job: &str,
    spec: &finetune_api::FineTuneJobSpec,
) -> PathBuf {
    let paths = finetune_api::TrainerPaths {
        model_dir: model.display().to_string(),
        tokenizer_file: fixtures()
            .join("tokenizer-wordlevel.json")
            .display()
            .to_string(),
        dataset_file: fixtures().join("reviews-small.csv").display().to_string(),
        retention_file: None,
        test_set_file: None,
        checkpoint_dir: work.join("checkpoints").display().to_string(),
        quantized_cache_dir: None,
        output_dir: work.join("output").display().to_string(),
        termination_message_file: work.join("termination-log").display().to_string(),
    };
    let tc = finetune_api::TrainerConfig::from_spec(
        job.into(),
        String::new(),
        spec,
        paths,
        String::new(),
    );
    let config = work.join("trainer.yaml");
    std::fs::write(&config, serde_yaml::to_string(&tc).unwrap()).unwrap();
    config
}
