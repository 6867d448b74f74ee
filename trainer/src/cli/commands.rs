//! What each command of the trainer does, behind [`run`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::args::{Command, HeldOutArgs, Resume, cleaning_from_flags};
use crate::data::Encoder;
use crate::data::clean::{Format, read_dataset_file};
use crate::data::template::PromptTemplate;
use crate::distributed::COLLECTIVE_EXIT_CODE;
use crate::eval::heldout::{HeldOutOptions, HeldOutSet, compare, evaluate_model};
use crate::metrics::{Metrics, Phase};
use crate::model::linear::FwdCtx;
use crate::model::load::{ModelRef, load_for_inference};
use crate::model::weights::Weights;
use crate::model::{Llama, LlamaConfig, TrainableSpec};
use crate::tiny_base::{InitOutcome, InitTiny};
use crate::train::device::select_device;
use crate::{Result, TrainerError};

/// The exit code of a `train` that was interrupted (SIGTERM) and checkpointed: non-zero, so the
/// pod restarts and the next attempt resumes.
const INTERRUPTED: u8 = 143;

/// The longest termination message written for the operator (Kubernetes keeps 4 KiB).
const TERMINATION_MESSAGE_BYTES: usize = 4000;

/// Runs `command`; the process's exit code when it did not fail.
pub fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Train { config, resume } => train(&config, resume),
        Command::PrepareData {
            config,
            dataset,
            text_column,
            label_column,
            fail_on_invalid,
        } => {
            let (path, format, opts) = match (config, dataset) {
                (Some(c), _) => {
                    let p = crate::config::to_params(&crate::config::read_config(&c)?)?;
                    (p.dataset, p.format, p.cleaning)
                }
                (None, Some(d)) => (
                    d,
                    None::<Format>,
                    cleaning_from_flags(&text_column, &label_column, fail_on_invalid),
                ),
                (None, None) => {
                    return Err(TrainerError::Config("give --config or --dataset".into()));
                }
            };
            prepare_data(&path, format, &opts)
        }
        Command::InitTiny {
            out,
            tokenizer,
            pretrain_text,
            pretrain_steps,
            seed,
            force,
        } => init_tiny(&InitTiny {
            out,
            tokenizer,
            pretrain_text,
            steps: pretrain_steps,
            seed,
            force,
        }),
        Command::ImportLlama2c {
            checkpoint,
            tokenizer,
            out,
        } => import_llama2c(&checkpoint, &tokenizer, &out),
        Command::Generate {
            model,
            adapter,
            tokenizer,
            prompt,
            raw,
            max_new_tokens,
        } => generate(
            &ModelRef { model, adapter },
            tokenizer,
            &prompt,
            raw,
            max_new_tokens,
        ),
        Command::Plan { file, json } => {
            let report = crate::plan::plan_file(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::plan::table(&report));
            }
            Ok(if report.plan.fits {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Logits(p) => logits(&p.model, p.ids, p.gpu),
        Command::NcclCheck => nccl_check(),
        Command::SplitCheck(p) => super::split_check::split_check(&p.model, p.ids, p.gpu),
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
            Ok(ExitCode::SUCCESS)
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
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { dir } => {
            println!("{}", crate::run::print_report(&dir)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `prepare-data`: the cleaning report as JSON on stdout, rows/s and peak RSS on stderr.
fn prepare_data(
    path: &Path,
    format: Option<Format>,
    opts: &crate::data::clean::CleaningOptions,
) -> Result<ExitCode> {
    let t0 = std::time::Instant::now();
    let (_, report) = read_dataset_file(path, format, opts)?;
    let secs = t0.elapsed().as_secs_f64();
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!(
        "{} rows in {:.2} s ({:.0} rows/s), peak RSS {:.1} MiB",
        report.rows_read,
        secs,
        report.rows_read as f64 / secs.max(1e-9),
        crate::metrics::registry::peak_memory_bytes().unwrap_or(0) as f64 / 1048576.0
    );
    Ok(ExitCode::SUCCESS)
}

/// The held-out set, how to encode it, the tokenizer and the device of `evaluate`/`compare`.
fn read_held_out(
    args: &HeldOutArgs,
    first: &ModelRef,
) -> Result<(HeldOutSet, HeldOutOptions, PathBuf, candle_core::Device)> {
    let opts = args.options()?;
    let set = HeldOutSet::read(&args.data, opts.format, &opts.cleaning, opts.max_rows)?;
    let tokenizer = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| first.model.join("tokenizer.json"));
    let device = select_device(args.gpu, 0)?;
    Ok((set, opts, tokenizer, device))
}

/// `train`: the job of a trainer configuration file, its progress served on `/metrics` and
/// `/progress`, and its outcome left in the termination message for the operator.
fn train(config: &Path, resume: Resume) -> Result<ExitCode> {
    if let Some(ranks) = super::gang::local_ranks()? {
        return super::launch::run_local_ranks(ranks);
    }
    let world = super::gang::world_from_env()?;
    let cfg = crate::config::read_config(config)?;
    let model_dir = PathBuf::from(&cfg.paths.model_dir);
    if !model_dir.join("config.json").exists() {
        if cfg.model.preset != finetune_api::ModelPreset::Tiny || cfg.model.source.is_some() {
            return Err(TrainerError::Config(format!(
                "model directory {} has no config.json",
                model_dir.display()
            )));
        }
        tracing::warn!(dir = %model_dir.display(), "no model: initialising the tiny preset (random weights)");
        init_tiny(&InitTiny {
            out: model_dir.clone(),
            tokenizer: PathBuf::from(&cfg.paths.tokenizer_file),
            pretrain_text: None,
            steps: 0,
            seed: 7,
            force: false,
        })?;
    }
    let mut params = crate::config::to_params(&cfg)?;
    params.gpu_ordinal = world.local_rank;
    // One metrics server and one termination message per pod: local rank 0's.
    let pod_voice = world.local_rank == 0;
    if !pod_voice {
        params.metrics_address = None;
    }
    let metrics = Metrics::new()?;
    if let Some(addr) = &params.metrics_address {
        let bound = crate::metrics::server::serve(addr, metrics.clone())?;
        tracing::info!(%bound, "serving /metrics and /progress");
    }
    let termination_file = PathBuf::from(&cfg.paths.termination_message_file);
    let termination_message = || {
        metrics
            .progress
            .lock()
            .map(|p| crate::metrics::progress::compact_json(&p, TERMINATION_MESSAGE_BYTES))
            .unwrap_or_default()
    };
    let collective = super::gang::connect(&world, &params.run, params.use_gpu);
    let outcome = collective.and_then(|c| {
        crate::run::run_job_in(params, resume == Resume::Auto, Some(metrics.clone()), c)
    });
    match outcome {
        Ok(report) => {
            println!("{}", report.summary());
            let interrupted = report.status == "interrupted";
            if !interrupted {
                let rel = cfg.output.path.clone();
                metrics.update_progress(|p| p.output_dir = Some(rel));
            }
            if pod_voice {
                std::fs::write(&termination_file, termination_message())
                    .map_err(|e| TrainerError::io(&termination_file, e))?;
            }
            Ok(if interrupted {
                ExitCode::from(INTERRUPTED)
            } else {
                ExitCode::SUCCESS
            })
        }
        Err(e) => {
            metrics.update_progress(|p| {
                p.phase = Phase::Failed;
                p.error = Some(e.to_string());
            });
            // Best effort: the error itself is what the caller reports.
            if pod_voice {
                let _ = std::fs::write(&termination_file, termination_message());
            }
            if let TrainerError::Collective { .. } = e {
                // The gang is restarted as a whole; the code tells the operator why.
                tracing::error!(error = %e, "the data-parallel gang failed");
                return Ok(ExitCode::from(COLLECTIVE_EXIT_CODE));
            }
            Err(e)
        }
    }
}

/// `init-tiny`: the tiny preset written (or found cached), with what it took on stderr.
fn init_tiny(req: &InitTiny) -> Result<ExitCode> {
    match crate::tiny_base::init_tiny(req)? {
        InitOutcome::Cached => eprintln!("cached tiny model in {}", req.out.display()),
        InitOutcome::Written {
            parameters,
            pretrained,
        } => {
            if let Some((first, last, seconds)) = pretrained {
                eprintln!(
                    "pretrained {} steps in {seconds:.0} s: loss {first:.3} -> {last:.3}",
                    req.steps
                );
            }
            eprintln!("wrote {} ({parameters} parameters)", req.out.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `import-llama2c`: a llama2.c checkpoint written as a Hugging Face model directory, its
/// tokenizer checked against the checkpoint's vocabulary first.
fn import_llama2c(checkpoint: &Path, tokenizer: &Path, out: &Path) -> Result<ExitCode> {
    let vocab = Encoder::from_file(tokenizer, PromptTemplate::default(), 64)?.vocab_size();
    let (cfg, weights) = crate::model::llama2c::read_llama2c(checkpoint)?;
    if cfg.vocab_size != vocab {
        return Err(TrainerError::Import {
            path: checkpoint.to_path_buf(),
            reason: format!(
                "a vocabulary of {} tokens, but {} has {vocab}",
                cfg.vocab_size,
                tokenizer.display()
            ),
        });
    }
    crate::model::tiny::write_hf_model_with_tokenizer(out, &cfg, &weights, tokenizer)?;
    eprintln!(
        "imported {} into {} ({} parameters)",
        checkpoint.display(),
        out.display(),
        cfg.num_parameters()
    );
    Ok(ExitCode::SUCCESS)
}

/// `nccl-check`: NCCL's world-size-1 self check (a build with the `nccl` feature).
#[cfg(feature = "nccl")]
fn nccl_check() -> Result<ExitCode> {
    let report = crate::distributed::nccl::self_check(std::time::Duration::from_secs(120))?;
    println!("{report}");
    Ok(if report["ok"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `nccl-check` in a build without NCCL: an error that says so.
#[cfg(not(feature = "nccl"))]
fn nccl_check() -> Result<ExitCode> {
    Err(TrainerError::Config(
        "this finetune-trainer was built without NCCL: use the CUDA build (make cuda-build)".into(),
    ))
}

/// `logits`: every position's logits of `ids` as JSON, on the CPU or the GPU.
fn logits(model_dir: &Path, ids: Vec<u32>, gpu: bool) -> Result<ExitCode> {
    if ids.is_empty() {
        return Err(TrainerError::Config(
            "--ids: give at least one token id".into(),
        ));
    }
    let device = select_device(gpu, 0)?;
    let cfg = LlamaConfig::from_file(&model_dir.join("config.json"))?;
    let weights = Weights::from_dir(model_dir, candle_core::DType::F32, &device)?;
    let model = Llama::from_weights(&cfg, weights, &TrainableSpec::Frozen, 0, &device)?;
    let n = ids.len();
    let ids = candle_core::Tensor::from_vec(ids, (1, n), &device)?;
    let rows = model
        .forward(&ids, None, &mut FwdCtx::eval())?
        .squeeze(0)?
        .to_vec2::<f32>()?;
    let name = if device.is_cuda() { "cuda" } else { "cpu" };
    println!("{}", serde_json::json!({"device": name, "logits": rows}));
    Ok(ExitCode::SUCCESS)
}

/// `generate`: greedy decoding after `prompt` (chat-templated unless `raw`).
fn generate(
    model: &ModelRef,
    tokenizer: Option<PathBuf>,
    prompt: &str,
    raw: bool,
    max_new: usize,
) -> Result<ExitCode> {
    let device = candle_core::Device::Cpu;
    let tok = tokenizer.unwrap_or_else(|| model.model.join("tokenizer.json"));
    let (llama, cfg) = load_for_inference(model, &device)?;
    let enc = Encoder::from_file(&tok, PromptTemplate::default(), cfg.max_position_embeddings)?;
    let text = if raw {
        let mut ids = vec![enc.bos];
        ids.extend(enc.tokens(prompt)?);
        let out = llama.generate_greedy(&ids, max_new, Some(enc.eos))?;
        enc.decode(&out)?
    } else {
        crate::eval::sample(&llama, &enc, prompt, max_new)?
    };
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}
