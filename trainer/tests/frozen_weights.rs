//! Frozen weights cost no backward work: after `backward()` of a LoRA step the gradient store
//! holds no weight-sized gradient, the adapters' gradients equal the plain-matmul path it
//! replaces, and the op's input gradient agrees with finite differences.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use finetune_trainer::loss::masked_cross_entropy;
use finetune_trainer::model::frozen::frozen_matmul;
use finetune_trainer::model::linear::FwdCtx;
use finetune_trainer::model::{Llama, LlamaConfig, TrainableSpec};

const VOCAB: usize = 50;
/// A LoRA rank no weight dimension equals, so adapter gradients are told apart by shape.
const RANK: usize = 3;

/// Two rows of six tokens (12 activation rows, 5 scored rows): no activation dimension equals a
/// weight dimension (16, 32, 48, 50), so a 2-D gradient with both dimensions among them is a
/// weight's gradient.
fn loss(model: &Llama, reference_matmul: bool) -> Tensor {
    let ids = Tensor::new(&[[1u32, 5, 9, 13, 7, 2], [1, 8, 3, 2, 0, 0]], &Device::Cpu).unwrap();
    let mask = vec![vec![1, 1, 1, 1, 1, 1], vec![1, 1, 1, 1, 0, 0]];
    let rows = Tensor::new(&[2u32, 3, 4, 7, 8], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[13u32, 7, 2, 3, 2], &Device::Cpu).unwrap();
    let mut ctx = FwdCtx::train(None);
    ctx.reference_matmul = reference_matmul;
    let logits = model.logits_at(&ids, Some(&mask), &rows, &mut ctx).unwrap();
    masked_cross_entropy(&logits, &targets).unwrap()
}

fn weight_dims(cfg: &LlamaConfig) -> Vec<usize> {
    let kv = cfg.kv_heads() * cfg.head_dim();
    vec![cfg.hidden_size, cfg.intermediate_size, kv, cfg.vocab_size]
}

/// Gradients in the store shaped like a weight (or its transpose), and all stored elements.
fn weight_sized(grads: &GradStore, dims: &[usize]) -> (usize, usize) {
    let mut weight_like = 0;
    let mut elements = 0;
    for id in grads.get_ids() {
        let g = grads.get_id(*id).unwrap();
        elements += g.elem_count();
        if let [a, b] = g.dims()
            && dims.contains(a)
            && dims.contains(b)
        {
            weight_like += 1;
        }
    }
    (weight_like, elements)
}

fn model(spec: &TrainableSpec) -> (LlamaConfig, Llama) {
    let cfg = common::small_config(VOCAB, 2);
    let w = common::random_weights(&cfg, 13);
    let model = common::build(&cfg, &w, spec);
    common::perturb_lora_b(&model);
    (cfg, model)
}

fn lora_spec(all_modules: bool) -> TrainableSpec {
    let mut ls = common::lora_all(RANK);
    if !all_modules {
        ls.target_modules = vec!["q_proj".into(), "v_proj".into()];
    }
    TrainableSpec::Lora(ls)
}

/// The same step through both paths: equal gradients for every trainable tensor.
fn assert_same_gradients(spec: &TrainableSpec, tol: f32) -> (GradStore, GradStore) {
    let (_, m) = model(spec);
    let ours = loss(&m, false).backward().unwrap();
    let reference = loss(&m, true).backward().unwrap();
    for (name, var) in m.trainable() {
        let a = ours
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let b = reference.get(var.as_tensor()).unwrap();
        common::assert_close_to_reference(name, a, b, tol);
    }
    (ours, reference)
}

#[test]
fn lora_gradients_equal_the_plain_matmul_path() {
    for all_modules in [false, true] {
        assert_same_gradients(&lora_spec(all_modules), 1e-6);
    }
}

#[test]
fn full_training_of_selected_layers_equals_the_plain_matmul_path() {
    // Layer 0 frozen (its linears use the frozen op), layer 1 trained in full.
    let spec = TrainableSpec::Full {
        layers: Some(vec![1]),
        embeddings_and_head: false,
    };
    assert_same_gradients(&spec, 1e-6);
}

#[test]
fn a_lora_backward_stores_no_gradient_for_a_frozen_weight() {
    let spec = lora_spec(true);
    let (cfg, _) = model(&spec);
    let dims = weight_dims(&cfg);
    let (ours, reference) = assert_same_gradients(&spec, 1e-6);
    let (ours_weights, ours_elems) = weight_sized(&ours, &dims);
    let (ref_weights, ref_elems) = weight_sized(&reference, &dims);
    eprintln!(
        "gradient store after a LoRA backward: frozen op {ours_weights} weight-sized gradients, \
         {ours_elems} elements; plain matmul {ref_weights}, {ref_elems}"
    );
    assert_eq!(ours_weights, 0, "a frozen weight got a gradient");
    // The plain path computes one per frozen linear whose input tracks a gradient: every linear
    // but layer 0's q, k and v (their input, the embedding, is constant), plus lm_head.
    let expected = cfg.num_hidden_layers * 7 - 3 + 1;
    assert_eq!(
        ref_weights, expected,
        "the reference path's wasted gradients"
    );
    let h = cfg.hidden_size;
    let kv = cfg.kv_heads() * cfg.head_dim();
    let i = cfg.intermediate_size;
    let per_layer = 2 * h * h + 2 * kv * h + 3 * i * h;
    let wasted =
        (cfg.num_hidden_layers - 1) * per_layer + (per_layer - h * h - 2 * kv * h) + VOCAB * h;
    // At least: on the CPU in f32 a LoRA projection is also one graph node, so the store holds
    // fewer intermediate gradients too.
    assert!(
        ref_elems - ours_elems >= wasted,
        "the store shrinks by the frozen weights' gradients: {} < {wasted}",
        ref_elems - ours_elems
    );
}

#[test]
fn nothing_is_recorded_when_the_input_tracks_no_gradient() {
    let x = Tensor::randn(0f32, 1.0, (4, 6), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 1.0, (5, 6), &Device::Cpu).unwrap();
    let y = frozen_matmul(&x, &w).unwrap();
    assert!(!y.track_op());
    let reference = x.matmul(&w.t().unwrap()).unwrap();
    assert_eq!(common::max_abs_diff(&y, &reference), 0.0);
}

#[test]
fn the_input_gradient_agrees_with_finite_differences() {
    let x0: Vec<f64> = (0..24).map(|k| ((k * 7 % 11) as f64 - 5.0) / 3.0).collect();
    let w = Tensor::randn(0f64, 1.0, (5, 6), &Device::Cpu).unwrap();
    let probe = Tensor::randn(0f64, 1.0, (4, 5), &Device::Cpu).unwrap();
    // A nonlinear scalar of the output, so the gradient differs per element.
    let f = |x: &Tensor| -> Tensor {
        let y = frozen_matmul(x, &w).unwrap();
        (y.tanh().unwrap() * &probe).unwrap().sum_all().unwrap()
    };
    let x = Var::from_vec(x0.clone(), (4, 6), &Device::Cpu).unwrap();
    let grads = f(x.as_tensor()).backward().unwrap();
    let analytic = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(grads.get(&w).is_none(), "the frozen weight got a gradient");
    let eps = 1e-6;
    for k in 0..x0.len() {
        let at = |d: f64| {
            let mut v = x0.clone();
            v[k] += d;
            f(&Tensor::from_vec(v, (4, 6), &Device::Cpu).unwrap())
                .to_scalar::<f64>()
                .unwrap()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (analytic[k] - numeric).abs() < 1e-6 * numeric.abs().max(1.0),
            "x[{k}]: autograd {} vs finite difference {numeric}",
            analytic[k]
        );
    }
}

#[test]
fn bf16_products_match_the_plain_matmul() {
    let x = Var::from_tensor(
        &Tensor::randn(0f32, 1.0, (7, 16), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap(),
    )
    .unwrap();
    let w = Tensor::randn(0f32, 1.0, (9, 16), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let ours = frozen_matmul(x.as_tensor(), &w).unwrap();
    let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
    let as_f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    assert_eq!(common::max_abs_diff(&as_f32(&ours), &as_f32(&plain)), 0.0);
    let g_ours = ours.sum_all().unwrap().backward().unwrap();
    let g_plain = plain.sum_all().unwrap().backward().unwrap();
    let d = common::max_abs_diff(
        &as_f32(g_ours.get(x.as_tensor()).unwrap()),
        &as_f32(g_plain.get(x.as_tensor()).unwrap()),
    );
    assert_eq!(d, 0.0, "bf16 input gradients differ by {d}");
}
