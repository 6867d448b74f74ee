//! `finetune-trainer`: trains a Llama-family model for one FineTuneJob. The commands live in
//! the library (`finetune_trainer::cli`); this binary parses the flags and runs one.

use clap::Parser;
use finetune_trainer::cli::{self, Args};
use finetune_trainer::workers;

/// mimalloc reuses freed memory instead of returning every large intermediate tensor to the
/// kernel (run with `MIMALLOC_PURGE_DELAY=-1` to keep it all; see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<std::process::ExitCode> {
    let exec_failed = workers::exec_with_workers_environment();
    cli::init_logging();
    if let Some(e) = exec_failed {
        tracing::warn!("cannot restart with CANDLE_NUM_THREADS=1 (CPU steps will be slower): {e}");
    }
    let args = Args::parse();
    Ok(cli::run(args.command)?)
}
