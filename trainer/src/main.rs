//! `finetune-trainer`: trains a Llama-family model for one FineTuneJob.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;

use finetune_trainer::data::Encoder;
use finetune_trainer::data::clean::{CleaningOptions, Format, read_dataset_file};
use finetune_trainer::data::jsonl::ColumnMapping;
use finetune_trainer::data::template::PromptTemplate;
use finetune_trainer::eval::heldout::{HeldOutOptions, HeldOutSet, compare, evaluate_model};
use finetune_trainer::metrics::{Metrics, Phase};
use finetune_trainer::model::load::{ModelRef, load_for_inference};
use finetune_trainer::model::weights::Weights;
use finetune_trainer::model::{Llama, LlamaConfig, TrainableSpec};
use finetune_trainer::tiny_base::{InitOutcome, InitTiny};

/// mimalloc reuses freed memory instead of returning every large intermediate tensor to the
/// kernel (run with `MIMALLOC_PURGE_DELAY=-1` to keep it all; see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Command-line interface of the trainer.
#[derive(Parser, Debug)]
#[command(name = "finetune-trainer", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

/// The held-out file of `evaluate` and `compare`, and how to read it.
#[derive(clap::Args, Debug)]
struct HeldOutArgs {
    /// Labelled CSV or JSONL file.
    #[arg(long)]
    data: PathBuf,
    /// Trainer configuration whose columns, cleaning, prompt template and sequence length are
    /// used, so the rows are read exactly as in training (overrides the column flags).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Text column (without --config).
    #[arg(long, default_value = "text")]
    text_column: String,
    /// Label column (without --config).
    #[arg(long, default_value = "label")]
    label_column: String,
    /// The classes, comma-separated (default: the labels found in the file).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Longest encoded example in tokens (without --config).
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// Fail on the first invalid row (default: skip it and count it in the report), as
    /// `dataset.cleaning.onInvalidRow: fail` does in training.
    #[arg(long)]
    fail_on_invalid: bool,
    /// Evaluate at most this many rows (the first ones kept by the cleaning).
    #[arg(long)]
    max_rows: Option<usize>,
    /// tokenizer.json (default: the first model's directory).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Run on the GPU (a CUDA build).
    #[arg(long)]
    gpu: bool,
}

impl HeldOutArgs {
    /// The reading options: from --config when given, else from the flags; `--labels` and
    /// `--fail-on-invalid` apply to both.
    fn options(&self) -> anyhow::Result<HeldOutOptions> {
        let mut opts = match &self.config {
            Some(c) => {
                let p = finetune_trainer::config::to_params(
                    &finetune_trainer::config::read_config(c)?,
                )?;
                HeldOutOptions {
                    format: None,
                    cleaning: p.cleaning,
                    template: p.template,
                    max_seq_len: p.max_seq_len,
                    max_rows: self.max_rows,
                    batch_size: p.batch_size,
                }
            }
            None => HeldOutOptions {
                format: None,
                cleaning: cleaning_from_flags(&self.text_column, &self.label_column, false),
                template: PromptTemplate::default(),
                max_seq_len: self.max_seq_len,
                max_rows: self.max_rows,
                batch_size: 16,
            },
        };
        if !self.labels.is_empty() {
            opts.cleaning.allowed_labels = self.labels.clone();
        }
        if self.fail_on_invalid {
            opts.cleaning.on_invalid_row = finetune_trainer::data::InvalidRowPolicy::Fail;
        }
        Ok(opts)
    }
}

/// The cleaning of a file given by column flags (`prepare-data --dataset`, `evaluate`): the
/// default cleaning on those columns, failing on the first invalid row when asked.
fn cleaning_from_flags(text: &str, label: &str, fail_on_invalid: bool) -> CleaningOptions {
    let mut o = CleaningOptions {
        columns: ColumnMapping {
            text: text.to_string(),
            label: label.to_string(),
            ..Default::default()
        },
        ..Default::default()
    };
    if fail_on_invalid {
        o.on_invalid_row = finetune_trainer::data::InvalidRowPolicy::Fail;
    }
    o
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Resume {
    /// Continue from the newest checkpoint whose manifest verifies.
    Auto,
    /// Start from scratch.
    Never,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train according to a trainer configuration file (finetune_api::TrainerConfig, YAML or JSON).
    Train {
        /// Path of the trainer configuration file.
        #[arg(long, env = "FINETUNE_CONFIG")]
        config: PathBuf,
        /// Resume policy.
        #[arg(long, value_enum, default_value_t = Resume::Auto)]
        resume: Resume,
    },
    /// Validate a dataset and print the cleaning report without training.
    PrepareData {
        /// Trainer configuration (for columns and cleaning); or give --dataset.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Dataset file (CSV or JSONL).
        #[arg(long)]
        dataset: Option<PathBuf>,
        /// Text column.
        #[arg(long, default_value = "text")]
        text_column: String,
        /// Label column.
        #[arg(long, default_value = "label")]
        label_column: String,
        /// Fail on the first invalid row.
        #[arg(long)]
        fail_on_invalid: bool,
    },
    /// Initialise the tiny preset (HF layout), optionally pretraining it on general text.
    InitTiny {
        /// Output model directory.
        #[arg(long)]
        out: PathBuf,
        /// tokenizer.json (its vocabulary size sets the model's).
        #[arg(long)]
        tokenizer: PathBuf,
        /// Text file (one passage per line) for a short pretraining.
        #[arg(long)]
        pretrain_text: Option<PathBuf>,
        /// Pretraining steps (about 1-3 s each on 2 busy cores).
        #[arg(long, default_value_t = 80)]
        pretrain_steps: usize,
        /// Seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Rebuild even when a matching model is cached in `out`.
        #[arg(long)]
        force: bool,
    },
    /// Greedy generation with a model and optional PEFT adapter.
    Generate {
        /// HF model directory.
        #[arg(long)]
        model: PathBuf,
        /// PEFT adapter directory.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// tokenizer.json (default: MODEL/tokenizer.json).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// User prompt (rendered with the Llama 2 chat template unless --raw).
        #[arg(long)]
        prompt: String,
        /// Use the prompt as is.
        #[arg(long)]
        raw: bool,
        /// Tokens to generate.
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
    },
    /// Print the memory plan of a FineTuneJob manifest or a trainer configuration: what one
    /// device needs, component by component, against the GPU budget (the operator's fit check).
    /// Exits 1 when it does not fit.
    Plan {
        /// The manifest or trainer configuration (YAML or JSON).
        file: PathBuf,
        /// Print JSON (`perGpuBytes`, `gpuBudgetBytes`, `fits`, `components`, `refusal`).
        #[arg(long)]
        json: bool,
    },
    /// Print the logits of a model for token ids as JSON (`{"device", "logits": [[f32]]}`),
    /// one row per position: the CPU-against-CUDA check of scripts/gpu-check.sh.
    Logits {
        /// HF model directory.
        #[arg(long)]
        model: PathBuf,
        /// Token ids, comma-separated.
        #[arg(long, value_delimiter = ',')]
        ids: Vec<u32>,
        /// Run on the GPU (a CUDA build).
        #[arg(long)]
        gpu: bool,
    },
    /// Classify every row of a labelled CSV or JSONL file with a model (a base, a base + PEFT
    /// adapter, or merged weights), cleaned and templated as in training; writes
    /// evaluation.json and evaluation.md (accuracy, per-class precision/recall/F1, confusion
    /// matrix, majority baseline, the misclassified rows) into --out.
    Evaluate {
        /// HF model directory (a base or merged weights).
        #[arg(long)]
        model: PathBuf,
        /// PEFT adapter directory applied on top of --model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[command(flatten)]
        held_out: HeldOutArgs,
    },
    /// Run two models on the same rows of a labelled file and put them side by side: metrics of
    /// each and every row where their answers differ, with both answers; writes comparison.json
    /// and comparison.md into --out.
    Compare {
        /// Model A's HF directory (usually the base).
        #[arg(long)]
        model_a: PathBuf,
        /// Model A's PEFT adapter.
        #[arg(long)]
        adapter_a: Option<PathBuf>,
        /// Model B's HF directory (the tuned model, or the base again with --adapter-b).
        #[arg(long)]
        model_b: PathBuf,
        /// Model B's PEFT adapter.
        #[arg(long)]
        adapter_b: Option<PathBuf>,
        #[command(flatten)]
        held_out: HeldOutArgs,
    },
    /// Print the report of a finished run.
    Report {
        /// Output directory holding report.json.
        dir: PathBuf,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if std::io::stderr().is_terminal() {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
}

fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    match args.command {
        Command::Train { config, resume } => train(config, resume),
        Command::PrepareData {
            config,
            dataset,
            text_column,
            label_column,
            fail_on_invalid,
        } => {
            let (path, format, opts) = match (config, dataset) {
                (Some(c), _) => {
                    let cfg = finetune_trainer::config::read_config(&c)?;
                    let p = finetune_trainer::config::to_params(&cfg)?;
                    (p.dataset, p.format, p.cleaning)
                }
                (None, Some(d)) => (
                    d,
                    None::<Format>,
                    cleaning_from_flags(&text_column, &label_column, fail_on_invalid),
                ),
                (None, None) => bail!("give --config or --dataset"),
            };
            let t0 = std::time::Instant::now();
            let (_, report) = read_dataset_file(&path, format, &opts)?;
            let secs = t0.elapsed().as_secs_f64();
            println!("{}", serde_json::to_string_pretty(&report)?);
            eprintln!(
                "{} rows in {:.2} s ({:.0} rows/s), peak RSS {:.1} MiB",
                report.rows_read,
                secs,
                report.rows_read as f64 / secs.max(1e-9),
                finetune_trainer::metrics::registry::peak_memory_bytes().unwrap_or(0) as f64
                    / 1048576.0
            );
            Ok(())
        }
        Command::InitTiny {
            out,
            tokenizer,
            pretrain_text,
            pretrain_steps,
            seed,
            force,
        } => init_tiny(out, tokenizer, pretrain_text, pretrain_steps, seed, force),
        Command::Generate {
            model,
            adapter,
            tokenizer,
            prompt,
            raw,
            max_new_tokens,
        } => generate(model, adapter, tokenizer, prompt, raw, max_new_tokens),
        Command::Plan { file, json } => {
            let report = finetune_trainer::plan::plan_file(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", finetune_trainer::plan::table(&report));
            }
            if !report.plan.fits {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Logits { model, ids, gpu } => logits(model, ids, gpu),
        Command::Evaluate {
            model,
            adapter,
            held_out,
        } => {
            let model = ModelRef { model, adapter };
            let (set, opts, tokenizer, device) = read_held_out(&held_out, &model)?;
            let evaluation = evaluate_model(&model, &tokenizer, &set, &opts, &device)?;
            evaluation.write(&held_out.out)?;
            print!("{}", evaluation.markdown());
            Ok(())
        }
        Command::Compare {
            model_a,
            adapter_a,
            model_b,
            adapter_b,
            held_out,
        } => {
            let a = ModelRef {
                model: model_a,
                adapter: adapter_a,
            };
            let b = ModelRef {
                model: model_b,
                adapter: adapter_b,
            };
            let (set, opts, tokenizer, device) = read_held_out(&held_out, &a)?;
            let comparison = compare(
                evaluate_model(&a, &tokenizer, &set, &opts, &device)?,
                evaluate_model(&b, &tokenizer, &set, &opts, &device)?,
            )?;
            comparison.write(&held_out.out)?;
            print!("{}", comparison.markdown());
            Ok(())
        }
        Command::Report { dir } => {
            println!("{}", finetune_trainer::run::print_report(&dir)?);
            Ok(())
        }
    }
}

/// The held-out set, how to encode it, the tokenizer and the device of `evaluate`/`compare`.
fn read_held_out(
    args: &HeldOutArgs,
    first: &ModelRef,
) -> anyhow::Result<(HeldOutSet, HeldOutOptions, PathBuf, candle_core::Device)> {
    let opts = args.options()?;
    let set = HeldOutSet::read(&args.data, opts.format, &opts.cleaning, opts.max_rows)?;
    let tokenizer = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| first.model.join("tokenizer.json"));
    let device = finetune_trainer::train::trainer::select_device(args.gpu)?;
    Ok((set, opts, tokenizer, device))
}

fn train(config: PathBuf, resume: Resume) -> anyhow::Result<()> {
    let cfg = finetune_trainer::config::read_config(&config)?;
    let model_dir = PathBuf::from(&cfg.paths.model_dir);
    if !model_dir.join("config.json").exists() {
        if cfg.model.preset != finetune_api::ModelPreset::Tiny || cfg.model.source.is_some() {
            bail!("model directory {} has no config.json", model_dir.display());
        }
        tracing::warn!(dir = %model_dir.display(), "no model: initialising the tiny preset (random weights)");
        init_tiny(
            model_dir.clone(),
            PathBuf::from(&cfg.paths.tokenizer_file),
            None,
            0,
            7,
            false,
        )?;
    }
    let params = finetune_trainer::config::to_params(&cfg)?;
    let metrics = Metrics::new().context("metrics registry")?;
    if let Some(addr) = &params.metrics_address {
        let bound = finetune_trainer::metrics::server::serve(addr, metrics.clone())?;
        tracing::info!(%bound, "serving /metrics and /progress");
    }
    match finetune_trainer::run::run_job(params, resume == Resume::Auto, Some(metrics.clone())) {
        Ok(report) => {
            println!("{}", report.summary());
            if report.status != "interrupted" {
                let rel = cfg.output.path.clone();
                metrics.update_progress(|p| p.output_dir = Some(rel));
            }
            let doc = metrics
                .progress
                .lock()
                .map(|p| finetune_trainer::metrics::progress::compact_json(&p, 4000))
                .unwrap_or_default();
            std::fs::write(&cfg.paths.termination_message_file, doc)
                .with_context(|| cfg.paths.termination_message_file.clone())?;
            if report.status == "interrupted" {
                // Non-zero so the Job restarts the pod, which then resumes.
                std::process::exit(143);
            }
            Ok(())
        }
        Err(e) => {
            metrics.update_progress(|p| {
                p.phase = Phase::Failed;
                p.error = Some(e.to_string());
            });
            let doc = metrics
                .progress
                .lock()
                .map(|p| finetune_trainer::metrics::progress::compact_json(&p, 4000))
                .unwrap_or_default();
            let _ = std::fs::write(&cfg.paths.termination_message_file, doc);
            Err(e.into())
        }
    }
}

fn init_tiny(
    out: PathBuf,
    tokenizer: PathBuf,
    pretrain_text: Option<PathBuf>,
    steps: usize,
    seed: u64,
    force: bool,
) -> anyhow::Result<()> {
    let req = InitTiny {
        out,
        tokenizer,
        pretrain_text,
        steps,
        seed,
        force,
    };
    match finetune_trainer::tiny_base::init_tiny(&req)? {
        InitOutcome::Cached => eprintln!("cached tiny model in {}", req.out.display()),
        InitOutcome::Written {
            parameters,
            pretrained,
        } => {
            if let Some((first, last, seconds)) = pretrained {
                eprintln!(
                    "pretrained {steps} steps in {seconds:.0} s: loss {first:.3} -> {last:.3}"
                );
            }
            eprintln!("wrote {} ({parameters} parameters)", req.out.display());
        }
    }
    Ok(())
}

fn logits(model_dir: PathBuf, ids: Vec<u32>, gpu: bool) -> anyhow::Result<()> {
    if ids.is_empty() {
        bail!("--ids: give at least one token id");
    }
    let device = finetune_trainer::train::trainer::select_device(gpu)?;
    let cfg = LlamaConfig::from_file(&model_dir.join("config.json"))?;
    let weights = Weights::from_dir(&model_dir, candle_core::DType::F32, &device)?;
    let model = Llama::from_weights(&cfg, weights, &TrainableSpec::Frozen, 0, &device)?;
    let n = ids.len();
    let ids = candle_core::Tensor::from_vec(ids, (1, n), &device)?;
    let mut ctx = finetune_trainer::model::linear::FwdCtx::eval();
    let rows = model
        .forward(&ids, None, &mut ctx)?
        .squeeze(0)?
        .to_vec2::<f32>()?;
    let name = if device.is_cuda() { "cuda" } else { "cpu" };
    println!("{}", serde_json::json!({"device": name, "logits": rows}));
    Ok(())
}

fn generate(
    model_dir: PathBuf,
    adapter: Option<PathBuf>,
    tokenizer: Option<PathBuf>,
    prompt: String,
    raw: bool,
    max_new: usize,
) -> anyhow::Result<()> {
    let device = candle_core::Device::Cpu;
    let tok = tokenizer.unwrap_or_else(|| model_dir.join("tokenizer.json"));
    let (model, cfg) = load_for_inference(
        &ModelRef {
            model: model_dir,
            adapter,
        },
        &device,
    )?;
    let enc = Encoder::from_file(&tok, PromptTemplate::default(), cfg.max_position_embeddings)?;
    let text = if raw {
        let mut ids = vec![enc.bos];
        ids.extend(enc.tokens(&prompt)?);
        let out = model.generate_greedy(&ids, max_new, Some(enc.eos))?;
        enc.decode(&out)?
    } else {
        finetune_trainer::eval::sample(&model, &enc, &prompt, max_new)?
    };
    println!("{text}");
    Ok(())
}
