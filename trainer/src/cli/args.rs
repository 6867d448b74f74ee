//! The trainer's command line: one `Args` struct, its subcommands and their flags.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

use crate::Result;
use crate::data::clean::CleaningOptions;
use crate::data::jsonl::ColumnMapping;
use crate::data::template::PromptTemplate;
use crate::eval::heldout::HeldOutOptions;

/// Command-line interface of the trainer.
#[derive(Parser, Debug)]
#[command(name = "finetune-trainer", version, about)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// A model and token ids to run it on: the GPU checks' probes (`logits`, `split-check`).
#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// HF model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub ids: Vec<u32>,
    /// Run on the GPU (a CUDA build).
    #[arg(long)]
    pub gpu: bool,
}

/// The held-out file of `evaluate` and `compare`, and how to read it.
#[derive(clap::Args, Debug)]
pub struct HeldOutArgs {
    /// Labelled CSV or JSONL file.
    #[arg(long)]
    pub data: PathBuf,
    /// Trainer configuration whose columns, cleaning, prompt template and sequence length are
    /// used, so the rows are read exactly as in training (overrides the column flags).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Text column (without --config).
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Label column (without --config).
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// The classes, comma-separated (default: the labels found in the file).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Longest encoded example in tokens (without --config).
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    /// Fail on the first invalid row (default: skip it and count it in the report), as
    /// `dataset.cleaning.onInvalidRow: fail` does in training.
    #[arg(long)]
    pub fail_on_invalid: bool,
    /// Evaluate at most this many rows (the first ones kept by the cleaning).
    #[arg(long)]
    pub max_rows: Option<usize>,
    /// tokenizer.json (default: the first model's directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Run on the GPU (a CUDA build).
    #[arg(long)]
    pub gpu: bool,
}

impl HeldOutArgs {
    /// The reading options: from --config when given, else from the flags; `--labels` and
    /// `--fail-on-invalid` apply to both.
    pub fn options(&self) -> Result<HeldOutOptions> {
        let mut opts = match &self.config {
            Some(c) => {
                let p = crate::config::to_params(&crate::config::read_config(c)?)?;
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
            opts.cleaning.on_invalid_row = crate::data::InvalidRowPolicy::Fail;
        }
        Ok(opts)
    }
}

/// The cleaning of a file given by column flags (`prepare-data --dataset`, `evaluate`): the
/// default cleaning on those columns, failing on the first invalid row when asked.
pub fn cleaning_from_flags(text: &str, label: &str, fail_on_invalid: bool) -> CleaningOptions {
    let mut o = CleaningOptions {
        columns: ColumnMapping {
            text: text.to_string(),
            label: label.to_string(),
            ..Default::default()
        },
        ..Default::default()
    };
    if fail_on_invalid {
        o.on_invalid_row = crate::data::InvalidRowPolicy::Fail;
    }
    o
}

/// Whether `train` continues from a checkpoint.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Resume {
    /// Continue from the newest checkpoint whose manifest verifies.
    Auto,
    /// Start from scratch.
    Never,
}

/// The trainer's commands.
#[derive(Subcommand, Debug)]
pub enum Command {
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
    /// Import a llama2.c checkpoint (`model.bin`, e.g. the `stories-15m` preset's) into a Hugging
    /// Face model directory the trainer loads like any other base.
    ImportLlama2c {
        /// The llama2.c `model.bin`.
        #[arg(long)]
        checkpoint: PathBuf,
        /// tokenizer.json matching the checkpoint's vocabulary (copied beside the weights).
        #[arg(long)]
        tokenizer: PathBuf,
        /// Output model directory.
        #[arg(long)]
        out: PathBuf,
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
    Logits(#[command(flatten)] ProbeArgs),
    /// An NCCL communicator of world size 1 on GPU 0 and an all-reduce and a broadcast of known
    /// values, as JSON (`ok`); exits 1 when a value comes back changed: the NCCL check of
    /// scripts/gpu-check.sh (a build with the `nccl` feature).
    NcclCheck,
    /// One LoRA batch's loss and gradients with the decoder layers split over two devices
    /// (`cuda:0` and the CPU with --gpu, else the CPU twice) against one device, as JSON
    /// (`max_relative_gradient_difference`, `ok`); exits 1 past 1e-4: the layer-split check of
    /// scripts/gpu-check.sh (--gpu puts the first half of the layers on the GPU).
    SplitCheck(#[command(flatten)] ProbeArgs),
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
        /// The held-out file and how to read it.
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
        /// The held-out file and how to read it.
        #[command(flatten)]
        held_out: HeldOutArgs,
    },
    /// Print the report of a finished run.
    Report {
        /// Output directory holding report.json.
        dir: PathBuf,
    },
}
