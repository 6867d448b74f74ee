//! The KV cache: a sequence run in pieces through the cache gives the hidden states of one full
//! forward; cached greedy generation equals recomputing every step (also past the position
//! window); labels scored from one shared prompt prefix equal scoring each candidate in full.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{D, Device, Tensor};
use finetune_trainer::data::encode::Encoded;
use finetune_trainer::eval::{sequence_log_likelihoods, shared_prefix_log_likelihoods};
use finetune_trainer::model::linear::FwdCtx;
use finetune_trainer::model::{KvCache, Llama, TrainableSpec};

const VOCAB: usize = 50;

fn model(kv_heads: usize, max_pos: usize) -> Llama {
    let mut cfg = common::small_config(VOCAB, kv_heads);
    cfg.max_position_embeddings = max_pos;
    let w = common::random_weights(&cfg, 17);
    common::build(&cfg, &w, &TrainableSpec::Frozen)
}

#[test]
fn pieces_through_the_cache_equal_one_full_forward() {
    let ids = [1u32, 7, 3, 9, 22, 41, 5, 8, 13, 2, 30];
    for kv in [4, 2, 1] {
        let m = model(kv, 64);
        let full = m
            .hidden(
                &Tensor::new(&ids, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
                &mut FwdCtx::eval(),
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
        let mut cache = KvCache::new();
        let mut parts = Vec::new();
        for piece in [&ids[..4], &ids[4..5], &ids[5..9], &ids[9..]] {
            parts.push(m.hidden_cached(piece, &mut cache).unwrap());
        }
        assert_eq!(cache.len(), ids.len());
        let cached = Tensor::cat(&parts, 0).unwrap();
        let d = common::max_abs_diff(&full, &cached);
        assert!(d < 1e-5, "kv heads {kv}: max |Δhidden| {d}");
    }
}

/// Greedy decoding by recomputing the whole window every step (the path the cache replaced).
fn recomputed_greedy(m: &Llama, prompt: &[u32], max_new: usize, window: usize) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new {
        let w = &ids[ids.len().saturating_sub(window)..];
        let t = Tensor::new(w, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let row = Tensor::new(&[(w.len() - 1) as u32], &Device::Cpu).unwrap();
        let logits = m.logits_at(&t, None, &row, &mut FwdCtx::eval()).unwrap();
        let tok = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0];
        ids.push(tok);
        out.push(tok);
    }
    out
}

#[test]
fn cached_greedy_generation_equals_recomputing_every_step() {
    let prompt = [1u32, 4, 9, 16, 25];
    for (window, max_new) in [(64, 12), (8, 10)] {
        let m = model(2, window);
        let cached = m.generate_greedy(&prompt, max_new, None).unwrap();
        let recomputed = recomputed_greedy(&m, &prompt, max_new, window);
        assert_eq!(cached.len(), max_new);
        assert_eq!(cached, recomputed, "window {window}");
    }
}

fn candidate(prompt: &[u32], label: &[u32]) -> Encoded {
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(label);
    ids.push(2);
    let mut target = vec![0u8; ids.len()];
    for t in target.iter_mut().skip(prompt.len()) {
        *t = 1;
    }
    Encoded {
        ids,
        target,
        label: None,
        truncated: false,
        prompt_len: prompt.len(),
    }
}

#[test]
fn shared_prefix_scores_equal_scoring_each_label_in_full() {
    let m = model(2, 64);
    let prompt = [1u32, 11, 12, 13, 14, 15, 16, 17];
    // Labels of different lengths, one a prefix of another.
    let labels: [&[u32]; 3] = [&[30, 31], &[30], &[40, 41, 42]];
    let items: Vec<Encoded> = labels.iter().map(|l| candidate(&prompt, l)).collect();
    let refs: Vec<&Encoded> = items.iter().collect();
    let full = sequence_log_likelihoods(&m, &refs, 8, &Device::Cpu).unwrap();
    let shared = shared_prefix_log_likelihoods(&m, &refs, &Device::Cpu).unwrap();
    assert_eq!(full.len(), shared.len());
    for (i, (a, b)) in full.iter().zip(&shared).enumerate() {
        assert_eq!(a.1, b.1, "label {i}: token count");
        assert_eq!(a.1, labels[i].len() + 1);
        assert!((a.0 - b.0).abs() < 1e-4, "label {i}: {} vs {}", a.0, b.0);
    }
    // Scores differ between labels, so the comparison means something.
    assert!((full[0].0 - full[2].0).abs() > 1e-3);
}
