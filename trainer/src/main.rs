//! `finetune-trainer`: trains a Llama-family model for one FineTuneJob (filled in by the trainer issue).

use clap::Parser;

/// Command-line interface of the trainer.
#[derive(Parser, Debug)]
#[command(name = "finetune-trainer", version, about)]
struct Args {
    /// Path of the trainer configuration file.
    #[arg(long, env = "FINETUNE_CONFIG")]
    config: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!("training is not implemented yet (config {:?})", args.config)
}
