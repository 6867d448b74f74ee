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
use finetune_trainer::model::{LayerDevices, Llama, LoraSettings, TrainableSpec};

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
        &LayerDevices::single(&Device::Cpu, 0),
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
            &LayerDevices::single(&Device::Cpu, 0),
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
            &LayerDevices::single(&Device::Cpu, 0),
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

// ---- The quantized base cache (issue 18 item 3) ----

mod cache {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use finetune_trainer::model::quantized_cache::{
        CacheOutcome, CacheProblem, GGUF_FILE, MANIFEST_FILE, QuantizedCache, planned_projections,
    };
    use finetune_trainer::model::shard::Shard;
    use finetune_trainer::model::weights::{Weights, weight_files};
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    /// A work directory with the quantizable test model written as two shards and an index
    /// (layer 0 and the embeddings in the first, the rest in the second).
    fn sharded_model(name: &str, seed: u64) -> (PathBuf, Vec<PathBuf>) {
        let work = std::env::temp_dir().join(format!("qcache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let model = work.join("model");
        std::fs::create_dir_all(&model).unwrap();
        write_shards(
            &model,
            &common::random_weights(&quant_config(), seed),
            DType::F32,
        );
        (work.clone(), weight_files(&model).unwrap())
    }

    fn write_shards(model: &Path, w: &HashMap<String, Tensor>, dtype: DType) {
        let (first, second): (HashMap<_, _>, HashMap<_, _>) = w
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(dtype).unwrap()))
            .partition(|(k, _)| k.starts_with("model.layers.0.") || k.contains("embed"));
        let mut weight_map = serde_json::Map::new();
        for (file, part) in [("a.safetensors", &first), ("b.safetensors", &second)] {
            candle_core::safetensors::save(part, model.join(file)).unwrap();
            for k in part.keys() {
                weight_map.insert(k.clone(), file.into());
            }
        }
        let index = serde_json::json!({ "weight_map": weight_map });
        std::fs::write(
            model.join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
    }

    fn cache_in(work: &Path, commit: &str) -> QuantizedCache {
        QuantizedCache {
            dir: work.join("quantized-base"),
            model_commit: commit.into(),
        }
    }

    fn load(
        files: &[PathBuf],
        format: GgmlDType,
        cache: &QuantizedCache,
    ) -> (Weights, CacheOutcome) {
        Weights::load_quantizing_cached(
            files,
            DType::F32,
            &LayerDevices::single(&Device::Cpu, 0),
            format,
            cache,
        )
        .unwrap()
    }

    fn fresh(files: &[PathBuf], format: GgmlDType) -> Weights {
        Weights::load_quantizing(
            files,
            DType::F32,
            &LayerDevices::single(&Device::Cpu, 0),
            Some(format),
        )
        .unwrap()
    }

    /// Asserts that two loads hold the same tensors: every projection quantized to `format`
    /// with the same bytes, every other tensor equal.
    fn assert_same_weights(files: &[PathBuf], format: GgmlDType, mut a: Weights, mut b: Weights) {
        let shards: Vec<Shard> = files.iter().map(|f| Shard::open(f).unwrap()).collect();
        let planned = planned_projections(&shards);
        // 2 layers × 7 projections.
        assert_eq!(planned.len(), 14);
        for p in &planned {
            let qa = a.take_quantized(&p.name, &p.shape).unwrap().unwrap();
            let qb = b.take_quantized(&p.name, &p.shape).unwrap().unwrap();
            assert_eq!((qa.dtype(), qb.dtype()), (format, format), "{}", p.name);
            assert!(
                qa.data().unwrap() == qb.data().unwrap(),
                "{} differs",
                p.name
            );
        }
        for info in shards.iter().flat_map(|s| s.header.tensors.iter()) {
            if planned.iter().any(|p| p.name == info.name) {
                continue;
            }
            let ta = a.take(&info.name, &info.shape).unwrap();
            let tb = b.take(&info.name, &info.shape).unwrap();
            assert_eq!(common::max_abs_diff(&ta, &tb), 0.0, "{}", info.name);
        }
        assert!(a.remaining().is_empty() && b.remaining().is_empty());
    }

    fn cache_files(cache: &QuantizedCache) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&cache.dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn the_first_load_writes_the_cache_and_the_second_uses_it_without_quantizing() {
        let (work, files) = sharded_model("hit", 11);
        let cache = cache_in(&work, "0123456789abcdef0123456789abcdef01234567");
        for format in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let _ = std::fs::remove_dir_all(&cache.dir);
            let started = std::time::Instant::now();
            let (first, outcome) = load(&files, format, &cache);
            let miss = started.elapsed();
            assert_eq!(outcome, CacheOutcome::Miss { written: true });
            assert_eq!(cache_files(&cache), [GGUF_FILE, MANIFEST_FILE]);
            assert_same_weights(&files, format, first, fresh(&files, format));
            let started = std::time::Instant::now();
            let (second, outcome) = load(&files, format, &cache);
            let hit = started.elapsed();
            assert_eq!(outcome, CacheOutcome::Hit);
            // The cached projections are bit for bit those quantized from the shards.
            assert_same_weights(&files, format, second, fresh(&files, format));
            eprintln!("{format:?}: quantizing load {miss:?}, cache hit {hit:?}");
        }
        // A hit does not read the projections from the shards: with the bytes of one projection
        // changed in place (same header, same commit), the cache's are still loaded, while the
        // shards' other tensors are read.
        let shard = Shard::open(&files[0]).unwrap();
        let info = shard
            .header
            .tensors
            .iter()
            .find(|t| t.name == "model.layers.0.mlp.up_proj.weight")
            .unwrap();
        let mut bytes = std::fs::read(&files[0]).unwrap();
        let at = 8 + shard.header.header_len + info.data_offsets.0;
        bytes[at..at + 64].fill(0);
        std::fs::write(&files[0], &bytes).unwrap();
        let (mut cached, outcome) = load(&files, GgmlDType::Q4_0, &cache);
        assert_eq!(outcome, CacheOutcome::Hit);
        let mut requantized = fresh(&files, GgmlDType::Q4_0);
        let from_cache = cached
            .take_quantized(&info.name, &[64, 32])
            .unwrap()
            .unwrap();
        let from_shard = requantized
            .take_quantized(&info.name, &[64, 32])
            .unwrap()
            .unwrap();
        assert!(from_cache.data().unwrap() != from_shard.data().unwrap());
        let _ = std::fs::remove_dir_all(&work);
    }

    /// Damages a written cache.
    type Damage = Box<dyn Fn(&QuantizedCache)>;

    /// Damages of a written cache, each named.
    fn damages() -> Vec<(&'static str, Damage)> {
        let gguf = |c: &QuantizedCache| c.dir.join(GGUF_FILE);
        let manifest = |c: &QuantizedCache| c.dir.join(MANIFEST_FILE);
        vec![
            (
                "a byte flipped in the middle",
                Box::new(move |c| {
                    let mut b = std::fs::read(gguf(c)).unwrap();
                    let mid = b.len() / 2;
                    b[mid] ^= 0x10;
                    std::fs::write(gguf(c), b).unwrap();
                }),
            ),
            (
                "a byte flipped in the header",
                Box::new(move |c| {
                    let mut b = std::fs::read(gguf(c)).unwrap();
                    b[100] ^= 0x01;
                    std::fs::write(gguf(c), b).unwrap();
                }),
            ),
            (
                "a byte flipped in the last tensor's padding",
                Box::new(move |c| {
                    let mut b = std::fs::read(gguf(c)).unwrap();
                    let last = b.len() - 1;
                    b[last] ^= 0x80;
                    std::fs::write(gguf(c), b).unwrap();
                }),
            ),
            (
                "truncated to half",
                Box::new(move |c| {
                    let b = std::fs::read(gguf(c)).unwrap();
                    std::fs::write(gguf(c), &b[..b.len() / 2]).unwrap();
                }),
            ),
            (
                "truncated with the manifest's size (SHA-256 only)",
                Box::new(move |c| {
                    let b = std::fs::read(gguf(c)).unwrap();
                    let mut m: serde_json::Value =
                        serde_json::from_slice(&std::fs::read(manifest(c)).unwrap()).unwrap();
                    let cut = b.len() - 100;
                    m["gguf_bytes"] = cut.into();
                    std::fs::write(manifest(c), m.to_string()).unwrap();
                    std::fs::write(gguf(c), &b[..cut]).unwrap();
                }),
            ),
            (
                "no manifest (the write was killed before it)",
                Box::new(move |c| std::fs::remove_file(manifest(c)).unwrap()),
            ),
            (
                "a manifest that is not JSON",
                Box::new(move |c| std::fs::write(manifest(c), "{\"key\": ").unwrap()),
            ),
            (
                "an empty GGUF",
                Box::new(move |c| std::fs::write(gguf(c), b"").unwrap()),
            ),
        ]
    }

    #[test]
    fn a_corrupt_cache_is_detected_removed_and_rebuilt_equal_to_a_fresh_quantization() {
        let (work, files) = sharded_model("corrupt", 12);
        let cache = cache_in(&work, "");
        let format = GgmlDType::Q8_0;
        assert_eq!(
            load(&files, format, &cache).1,
            CacheOutcome::Miss { written: true }
        );
        let pristine = std::fs::read(cache.dir.join(GGUF_FILE)).unwrap();
        for (what, damage) in damages() {
            damage(&cache);
            let (rebuilt, outcome) = load(&files, format, &cache);
            let CacheOutcome::Rebuilt {
                problem: CacheProblem::Corrupt(why),
                written: true,
            } = &outcome
            else {
                panic!("{what}: {outcome:?}");
            };
            eprintln!("{what}: {why}");
            assert_same_weights(&files, format, rebuilt, fresh(&files, format));
            // The rebuilt cache is the same file, and it is used next time.
            assert!(
                std::fs::read(cache.dir.join(GGUF_FILE)).unwrap() == pristine,
                "{what}"
            );
            assert_eq!(load(&files, format, &cache).1, CacheOutcome::Hit, "{what}");
        }
        let _ = std::fs::remove_dir_all(&work);
    }

    #[test]
    fn another_format_commit_or_weight_file_does_not_reuse_the_cache() {
        let (work, files) = sharded_model("stale", 13);
        let commit = "1111111111111111111111111111111111111111";
        let first = cache_in(&work, commit);
        assert_eq!(
            load(&files, GgmlDType::Q8_0, &first).1,
            CacheOutcome::Miss { written: true }
        );
        let stale = |outcome: CacheOutcome, why: &str| match outcome {
            CacheOutcome::Rebuilt {
                problem: CacheProblem::Stale(reason),
                written: true,
            } => assert!(reason.contains(why), "{reason}"),
            other => panic!("{other:?}"),
        };
        // int4 after int8: rebuilt in Q4_0, equal to a fresh int4 quantization.
        let (q4, outcome) = load(&files, GgmlDType::Q4_0, &first);
        stale(outcome, "format Q8_0 (now Q4_0)");
        assert_same_weights(&files, GgmlDType::Q4_0, q4, fresh(&files, GgmlDType::Q4_0));
        // Another commit of the model.
        let moved = cache_in(&work, "2222222222222222222222222222222222222222");
        stale(load(&files, GgmlDType::Q4_0, &moved).1, "model commit");
        assert_eq!(load(&files, GgmlDType::Q4_0, &moved).1, CacheOutcome::Hit);
        // Other weight files under the same commit (here re-saved in bf16: other headers).
        let model = files[0].parent().unwrap();
        write_shards(
            model,
            &common::random_weights(&quant_config(), 14),
            DType::BF16,
        );
        let (changed, outcome) = load(&files, GgmlDType::Q4_0, &moved);
        stale(outcome, "weight files differ");
        assert_same_weights(
            &files,
            GgmlDType::Q4_0,
            changed,
            fresh(&files, GgmlDType::Q4_0),
        );
        // Only the current cache is kept.
        assert_eq!(cache_files(&moved), [GGUF_FILE, MANIFEST_FILE]);
        let _ = std::fs::remove_dir_all(&work);
    }

    #[test]
    fn a_killed_writers_stale_temporary_file_is_removed_and_a_live_ones_is_not() {
        let (work, files) = sharded_model("temporary", 15);
        let cache = cache_in(&work, "");
        std::fs::create_dir_all(&cache.dir).unwrap();
        let old = cache.dir.join(format!("{GGUF_FILE}.tmp-7-1"));
        let live = cache.dir.join(format!("{GGUF_FILE}.tmp-8-2"));
        for f in [&old, &live] {
            std::fs::write(f, b"partial").unwrap();
        }
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        assert_eq!(
            load(&files, GgmlDType::Q4_0, &cache).1,
            CacheOutcome::Miss { written: true }
        );
        assert!(!old.exists() && live.exists());
        let _ = std::fs::remove_dir_all(&work);
    }

    #[test]
    fn an_unwritable_cache_directory_is_a_miss_not_a_failure() {
        let (work, files) = sharded_model("unwritable", 16);
        // The cache "directory" is a file: nothing can be created in it.
        let cache = cache_in(&work, "");
        std::fs::write(&cache.dir, b"not a directory").unwrap();
        let (weights, outcome) = load(&files, GgmlDType::Q8_0, &cache);
        assert_eq!(outcome, CacheOutcome::Miss { written: false });
        assert_same_weights(
            &files,
            GgmlDType::Q8_0,
            weights,
            fresh(&files, GgmlDType::Q8_0),
        );
        let _ = std::fs::remove_dir_all(&work);
    }

    /// Load times of a larger synthetic base (hidden 2048, MLP 5632, `QCACHE_BENCH_LAYERS`
    /// layers, default 4: 51 M projection weights a layer) without the cache, on a miss (quantize
    /// and write) and on a hit: `cargo test -p finetune-trainer --test quantized -- --ignored
    /// --nocapture load_times`.
    #[test]
    #[ignore = "a timing, not a check: run by hand"]
    fn load_times_of_a_larger_base() {
        let layers = std::env::var("QCACHE_BENCH_LAYERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4);
        let mut cfg = common::small_config(64, 16);
        cfg.hidden_size = 2048;
        cfg.intermediate_size = 5632;
        cfg.num_attention_heads = 16;
        cfg.num_hidden_layers = layers;
        let work = std::env::temp_dir().join(format!("qcache-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let model = work.join("model");
        let w = finetune_trainer::model::tiny::init_weights(&cfg, 1, &Device::Cpu).unwrap();
        finetune_trainer::model::tiny::write_hf_model(&model, &cfg, &w).unwrap();
        drop(w);
        let files = weight_files(&model).unwrap();
        let megabytes = |p: &Path| std::fs::metadata(p).unwrap().len() as f64 / 1e6;
        for format in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let cache = cache_in(&work, "");
            let _ = std::fs::remove_dir_all(&cache.dir);
            let timed = |f: &dyn Fn() -> Option<CacheOutcome>| {
                let started = std::time::Instant::now();
                let outcome = f();
                (started.elapsed().as_secs_f64(), outcome)
            };
            let (plain, _) = timed(&|| {
                fresh(&files, format);
                None
            });
            let (miss, o) = timed(&|| Some(load(&files, format, &cache).1));
            assert_eq!(o, Some(CacheOutcome::Miss { written: true }));
            let (hit, o) = timed(&|| Some(load(&files, format, &cache).1));
            assert_eq!(o, Some(CacheOutcome::Hit));
            eprintln!(
                "{layers} layers, {:.0} MB f32 safetensors, {format:?} cache {:.0} MB: \
                 quantizing load without cache {plain:.2} s, miss (quantize + write) {miss:.2} s, \
                 hit {hit:.2} s",
                megabytes(&files[0]),
                megabytes(&cache.dir.join(GGUF_FILE)),
            );
        }
        let _ = std::fs::remove_dir_all(&work);
    }

    /// Every file under `dir`, recursively.
    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn the_trainer_writes_the_cache_only_where_its_paths_name_a_cache_directory() {
        let work = std::env::temp_dir().join(format!("qcache-trainer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let mut cfg = common::small_config(64, 2);
        cfg.intermediate_size = 64;
        let model = work.join("model");
        finetune_trainer::model::tiny::write_hf_model(
            &model,
            &cfg,
            &common::random_weights(&cfg, 17),
        )
        .unwrap();
        let cached = |run: &str| work.join(run).join("quantized-base");
        for (run, cache_dir) in [("none", None), ("cached", Some(cached("cached")))] {
            let mut p = common::params(&work, &model, run, lora(BaseQuantization::Int8));
            p.quantized_cache_dir = cache_dir;
            finetune_trainer::train::Trainer::new(p, false, None).unwrap();
        }
        let mut written: Vec<PathBuf> = files_under(&work)
            .into_iter()
            .filter(|f| {
                let name = f.file_name().unwrap().to_string_lossy();
                name.contains(GGUF_FILE) || name.contains(MANIFEST_FILE)
            })
            .collect();
        written.sort();
        assert_eq!(
            written,
            [
                cached("cached").join(GGUF_FILE),
                cached("cached").join(MANIFEST_FILE)
            ]
        );
        let _ = std::fs::remove_dir_all(&work);
    }
}

#[test]
fn the_api_block_sizes_are_candles_ggml_sizes() {
    assert_eq!(BaseQuantization::None.block(), None);
    assert_eq!(ggml_dtype(BaseQuantization::None), None);
    for format in FORMATS {
        let ggml = ggml_dtype(format).unwrap();
        assert_eq!(
            format.block(),
            Some((ggml.block_size() as u64, ggml.type_size() as u64)),
            "{format:?} is {ggml:?}"
        );
    }
    assert_eq!(BaseQuantization::Int8.block(), Some((32, 34)));
    assert_eq!(BaseQuantization::Int4.block(), Some((32, 18)));
}
