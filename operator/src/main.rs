//! `finetune-operator`: reconciles FineTuneJobs into trainer pods (filled in by the operator issue).

use clap::Parser;

/// Command-line flags of the operator; every flag can also be set from the environment.
#[derive(Parser, Debug)]
#[command(name = "finetune-operator", version, about)]
struct Args {
    /// Namespace to watch; all namespaces when empty.
    #[arg(long, env = "WATCH_NAMESPACE", default_value = "")]
    watch_namespace: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!(
        "the reconciler is not implemented yet (watch namespace {:?})",
        args.watch_namespace
    )
}
