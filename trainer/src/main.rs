//! `finetune-trainer`: trains a Llama-family model for one FineTuneJob. The commands live in
//! the library (`finetune_trainer::cli`); this binary parses the flags and runs one.

use clap::Parser;
use finetune_trainer::cli::{self, Args};

/// mimalloc reuses freed memory instead of returning every large intermediate tensor to the
/// kernel (run with `MIMALLOC_PURGE_DELAY=-1` to keep it all; see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<std::process::ExitCode> {
    cli::init_logging();
    let args = Args::parse();
    Ok(cli::run(args.command)?)
}
