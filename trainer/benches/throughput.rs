//! Training throughput on the llama2.c "stories15M" shape (dim 288, hidden 768, 6 layers,
//! 6 heads, vocab 32000), full gradients, AdamW, batch 8 × 256 tokens, loss on every position;
//! and data-preparation rows/s on a generated CSV. Run with `make bench` or
//! `MIMALLOC_PURGE_DELAY=-1 cargo bench -p finetune-trainer --bench throughput`.
//!
//! Env: BENCH_STEPS (measured steps, default 5), BENCH_WARMUP (default 1), BENCH_CSV_ROWS
//! (default 1000000; 0 skips the data benchmark), FINETUNE_ASSETS_DIR (tokenizer for the data
//! benchmark's tokenisation; skipped when absent), BENCH_METHOD (`full`, the default, or `lora`:
//! r=16, alpha 32, dropout 0.05 on q_proj and v_proj as the PEFT peer, everything else frozen),
//! BENCH_REFERENCE_MATMUL=1 (frozen weights through candle's plain matmul, whose backward also
//! computes their unused gradients: the path the frozen-matmul op replaced; run it as its own
//! process, peak RSS is per process), FINETUNE_CPU_WORKERS (workers a micro-batch's rows are
//! split between; default the cores, 1 turns the split off).

use std::io::Write;
use std::time::Instant;

use candle_core::Device;
use finetune_trainer::data::batch::Batch;
use finetune_trainer::data::clean::{CleaningOptions, Format, read_dataset_file};
use finetune_trainer::data::encode::Encoded;
use finetune_trainer::data::jsonl::ColumnMapping;
use finetune_trainer::data::{Encoder, PromptTemplate};
use finetune_trainer::metrics::registry::peak_memory_bytes;
use finetune_trainer::model::weights::Weights;
use finetune_trainer::model::{Llama, LoraSettings, TrainableSpec, tiny};
use finetune_trainer::optim::{AdamW, AdamWParams};
use finetune_trainer::rng::Rng;
use finetune_trainer::train::step::{StepSettings, optimizer_step};
use finetune_trainer::workers;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn train_bench() -> anyhow::Result<()> {
    let (batch, seq) = (8usize, 256usize);
    let mut cfg = tiny::tiny_config(32000);
    cfg.hidden_size = 288;
    cfg.intermediate_size = 768;
    cfg.num_hidden_layers = 6;
    cfg.num_attention_heads = 6;
    cfg.num_key_value_heads = Some(6);
    cfg.max_position_embeddings = seq;
    let dev = Device::Cpu;
    let w = tiny::init_weights(&cfg, 1, &dev)?;
    let lora = std::env::var("BENCH_METHOD").is_ok_and(|m| m == "lora");
    let reference_matmul = std::env::var_os("BENCH_REFERENCE_MATMUL").is_some();
    // BENCH_QUANT=int8|int4: LoRA over a quantized base (the frozen projections).
    let base_quantization = match std::env::var("BENCH_QUANT").as_deref() {
        Ok("int8") => finetune_api::BaseQuantization::Int8,
        Ok("int4") => finetune_api::BaseQuantization::Int4,
        _ => finetune_api::BaseQuantization::None,
    };
    let spec = if lora {
        TrainableSpec::Lora(LoraSettings {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            layers: None,
            train_label_tokens: false,
            head_token_ids: vec![],
            base_quantization,
        })
    } else {
        TrainableSpec::Full {
            layers: None,
            embeddings_and_head: true,
        }
    };
    let model = Llama::from_weights(&cfg, Weights::from_map(w), &spec, 1, &dev)?;
    let mut opt = AdamW::new(AdamWParams::default());
    let mut rng = Rng::new(3);
    let items: Vec<Encoded> = (0..batch)
        .map(|_| Encoded::language_modelling((0..seq).map(|_| rng.below(32000) as u32).collect()))
        .collect();
    let refs: Vec<&Encoded> = items.iter().collect();
    let b = Batch::new(&refs, 0, &dev)?;
    let warmup = env_usize("BENCH_WARMUP", 1);
    let workers = workers::cpu_workers(&dev);
    let steps = env_usize("BENCH_STEPS", 5);
    // The LoRA adapters' dropout stream (full fine-tuning has no dropout).
    let mut dropout_rng = Rng::new(5);
    let mut t0 = Instant::now();
    let mut last_loss = 0f32;
    for i in 0..warmup + steps {
        if i == warmup {
            t0 = Instant::now();
        }
        let settings = StepSettings {
            reference_matmul,
            cpu_workers: workers,
            ..StepSettings::clipped_at(1.0)
        };
        let batch = Ok(b.clone());
        last_loss = optimizer_step(
            &model,
            &mut opt,
            [batch],
            1e-3,
            &settings,
            Some(&mut dropout_rng),
        )?
        .loss;
    }
    let secs = t0.elapsed().as_secs_f64();
    let tokens = (steps * batch * seq) as f64;
    println!(
        "train stories15M-shape ({} params, {}{}{}, {workers} CPU workers) batch {batch}x{seq}: {steps} steps in {secs:.2} s = {:.0} tokens/s (loss {last_loss:.3}), peak RSS {:.2} GB",
        cfg.num_parameters(),
        if lora {
            "LoRA r=16 q,v, dropout 0.05"
        } else {
            "full"
        },
        if reference_matmul {
            ", frozen weights through plain matmul"
        } else {
            ""
        },
        if base_quantization.is_none() {
            String::new()
        } else {
            format!(", {} base", base_quantization.name())
        },
        tokens / secs,
        peak_memory_bytes().unwrap_or(0) as f64 / 1e9
    );
    Ok(())
}

fn data_bench() -> anyhow::Result<()> {
    let rows = env_usize("BENCH_CSV_ROWS", 1_000_000);
    if rows == 0 {
        return Ok(());
    }
    let path = std::env::temp_dir().join(format!("bench-{}-{rows}.csv", std::process::id()));
    {
        let words = [
            "great", "awful", "battery", "screen", "works", "broke", "love", "hate", "cheap",
            "sturdy", "fast", "slow", "the", "a", "it", "and", "but", "very", "not", "really",
        ];
        let mut rng = Rng::new(9);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        writeln!(f, "ReviewText,SentimentLabel")?;
        for i in 0..rows {
            let n = 5 + rng.below(20);
            let text: Vec<&str> = (0..n).map(|_| words[rng.below(words.len())]).collect();
            let label = if rng.below(2) == 0 {
                "Positive"
            } else {
                "negative "
            };
            writeln!(f, "\"{} #{i}, \"\"quoted\"\"\",{label}", text.join(" "))?;
        }
    }
    let opts = CleaningOptions {
        columns: ColumnMapping {
            text: "ReviewText".into(),
            label: "SentimentLabel".into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let t0 = Instant::now();
    let (examples, report) = read_dataset_file(&path, Some(Format::Csv), &opts)?;
    let clean_s = t0.elapsed().as_secs_f64();
    println!(
        "prepare-data: {} rows read, {} kept in {clean_s:.2} s = {:.0} rows/s (cleaning), peak RSS {:.2} GB",
        report.rows_read,
        report.rows_kept,
        report.rows_read as f64 / clean_s,
        peak_memory_bytes().unwrap_or(0) as f64 / 1e9
    );
    let tok = std::env::var("FINETUNE_ASSETS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/finetune-operator/assets")
        })
        .join("tokenizer.json");
    if tok.exists() {
        let enc = Encoder::from_file(&tok, PromptTemplate::default(), 128)?;
        let t1 = Instant::now();
        let encoded = enc.encode_all(&examples)?;
        let s = t1.elapsed().as_secs_f64();
        println!(
            "tokenise (Llama 2 tokenizer, {} threads): {} rows in {s:.2} s = {:.0} rows/s; total {:.0} rows/s, peak RSS {:.2} GB",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            encoded.len(),
            encoded.len() as f64 / s,
            report.rows_read as f64 / (clean_s + s),
            peak_memory_bytes().unwrap_or(0) as f64 / 1e9
        );
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    if let Some(e) = workers::exec_with_workers_environment() {
        eprintln!("running without CANDLE_NUM_THREADS=1: {e}");
    }
    train_bench()?;
    data_bench()
}
