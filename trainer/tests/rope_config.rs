//! RoPE settings from `config.json`: both layouts (`rope_theta` + `rope_scaling`, and
//! transformers 5's `rope_parameters`), the `default`, `linear`, `dynamic` and `llama3` scalings
//! against reference numbers from the published formulas (transformers'
//! `modeling_rope_utils.py`, evaluated independently in Python, float64), unsupported kinds
//! refused by name, and `head_dim` honoured by the model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{Device, Tensor};
use finetune_trainer::model::linear::FwdCtx;
use finetune_trainer::model::rope::RopeScaling;
use finetune_trainer::model::{LlamaConfig, TrainableSpec, tiny};

fn config(extra: &str) -> LlamaConfig {
    let json = format!(
        r#"{{"hidden_size":32,"intermediate_size":48,"num_attention_heads":4,
        "num_hidden_layers":2,"vocab_size":50,"max_position_embeddings":64{extra}}}"#
    );
    serde_json::from_str(&json).unwrap()
}

fn assert_close(got: &[f64], want: &[(usize, f64)]) {
    for &(i, w) in want {
        let g = got[i];
        assert!(
            (g - w).abs() <= 1e-12 + 1e-9 * w.abs(),
            "inv_freq[{i}] = {g}, reference {w}"
        );
    }
}

#[test]
fn transformers_5_rope_parameters_give_the_base_frequency() {
    let c = config(r#","rope_parameters":{"rope_type":"default","rope_theta":50000.0}"#);
    c.validate().unwrap();
    let rope = c.rope().unwrap();
    assert_eq!(rope.theta, 50_000.0);
    assert_eq!(rope.scaling, RopeScaling::Default);
    let want = [
        (0, 1.0),
        (1, 0.0668740304976422),
        (2, 0.00447213595499958),
        (3, 0.0002990697562442441),
    ];
    assert_close(&rope.inv_freq(16), &want);
    // The classic layout with the same theta is the same rotation.
    assert_eq!(config(r#","rope_theta":50000.0"#).rope().unwrap(), rope);
}

#[test]
fn no_rope_fields_means_theta_ten_thousand() {
    let rope = config("").rope().unwrap();
    assert_eq!(rope.theta, 10_000.0);
    assert_eq!(rope.scaling, RopeScaling::Default);
}

#[test]
fn linear_scaling_in_the_legacy_spelling() {
    let c = config(r#","rope_scaling":{"type":"linear","factor":2.0}"#);
    let rope = c.rope().unwrap();
    assert_eq!(rope.scaling, RopeScaling::Linear { factor: 2.0 });
    assert_close(
        &rope.inv_freq(16),
        &[(0, 0.5), (1, 0.05), (2, 0.005), (3, 0.0005)],
    );
    // transformers writes both spellings; that is accepted too.
    let both = config(r#","rope_scaling":{"type":"linear","rope_type":"linear","factor":2.0}"#);
    assert_eq!(both.rope().unwrap(), rope);
}

#[test]
fn dynamic_ntk_grows_theta_only_past_the_pretraining_length() {
    let c = config(r#","rope_scaling":{"rope_type":"dynamic","factor":2.0}"#);
    let rope = c.rope().unwrap();
    // Within 64 positions: plain theta 10000.
    assert_close(&rope.inv_freq(64), &[(1, 0.1), (3, 0.001)]);
    // 128 positions: base = 10000 · (2·128/64 − 1)^(8/6).
    assert_close(
        &rope.inv_freq(128),
        &[
            (0, 1.0),
            (1, 0.06933612743506347),
            (2, 0.004807498567691361),
            (3, 0.0003333333333333334),
        ],
    );
}

#[test]
fn llama3_scaling_matches_the_published_formula() {
    // Llama 3.1 8B's settings.
    let json = r#"{"hidden_size":4096,"intermediate_size":14336,"num_attention_heads":32,
        "num_key_value_heads":8,"num_hidden_layers":32,"vocab_size":128256,
        "max_position_embeddings":131072,"rope_theta":500000.0,
        "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
        "original_max_position_embeddings":8192,"rope_type":"llama3"}}"#;
    let c: LlamaConfig = serde_json::from_str(json).unwrap();
    c.validate().unwrap();
    let rope = c.rope().unwrap();
    assert_close(
        &rope.inv_freq(2048),
        &[
            (0, 1.0),
            (20, 0.016560440080994446),
            (30, 0.0013718935677611381),
            (40, 3.428102195952591e-05),
            (63, 3.068925988914511e-07),
        ],
    );
}

#[test]
fn unsupported_or_incomplete_scalings_are_refused_by_name() {
    for (extra, needle) in [
        (
            r#","rope_scaling":{"rope_type":"yarn","factor":4.0}"#,
            "`yarn` is not supported",
        ),
        (
            r#","rope_parameters":{"rope_type":"longrope"}"#,
            "`longrope` is not supported",
        ),
        (
            r#","rope_scaling":{"rope_type":"linear"}"#,
            "needs `factor`",
        ),
        (
            r#","rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0}"#,
            "needs `high_freq_factor`",
        ),
        (
            r#","rope_theta":10000.0,"rope_parameters":{"rope_theta":500000.0}"#,
            "disagrees",
        ),
    ] {
        let c = config(extra);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(needle), "{extra}: {err}");
    }
}

#[test]
fn the_model_uses_the_configured_rope() {
    let ids = Tensor::new(&[[1u32, 4, 9, 16, 25, 36, 49, 3]], &Device::Cpu).unwrap();
    let logits = |c: &LlamaConfig| {
        let w = tiny::init_weights(c, 4, &Device::Cpu).unwrap();
        let w: std::collections::HashMap<_, _> = w
            .into_iter()
            .map(|(k, t)| (k, (t * 20.0).unwrap()))
            .collect();
        let m = common::build(c, &w, &TrainableSpec::Frozen);
        m.forward(&ids, None, &mut FwdCtx::eval()).unwrap()
    };
    let classic = logits(&config(r#","rope_theta":50000.0"#));
    let v5 = logits(&config(
        r#","rope_parameters":{"rope_type":"default","rope_theta":50000.0}"#,
    ));
    let old = logits(&config(""));
    let diff = common::max_abs_diff;
    assert_eq!(diff(&classic, &v5), 0.0);
    assert!(diff(&classic, &old) > 1e-4, "theta had no effect");
}

#[test]
fn head_dim_wider_than_hidden_over_heads_is_honoured() {
    // Gemma-style: 4 heads of 16 on a 32-wide model (q_proj 64 × 32, o_proj 32 × 64).
    let c = config(r#","head_dim":16,"num_key_value_heads":2"#);
    c.validate().unwrap();
    assert_eq!(c.attention_width(), 64);
    let w = tiny::init_weights(&c, 2, &Device::Cpu).unwrap();
    assert_eq!(
        w["model.layers.0.self_attn.q_proj.weight"].dims(),
        &[64, 32]
    );
    assert_eq!(
        w["model.layers.0.self_attn.k_proj.weight"].dims(),
        &[32, 32]
    );
    assert_eq!(
        w["model.layers.0.self_attn.o_proj.weight"].dims(),
        &[32, 64]
    );
    let m = common::build(&c, &w, &TrainableSpec::Frozen);
    assert_eq!(m.rope().head_dim, 16);
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let logits = m.forward(&ids, None, &mut FwdCtx::eval()).unwrap();
    assert_eq!(logits.dims(), &[1, 3, 50]);
    assert_eq!(c.num_parameters(), {
        let per_layer = 2 * 32 * 64 + 2 * 32 * 32 + 3 * 32 * 48 + 2 * 32;
        50 * 32 * 2 + 2 * per_layer + 32
    });
}
