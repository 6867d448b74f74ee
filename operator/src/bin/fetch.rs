//! `finetune-fetch`: the download init step of trainer pods (models from a Hugging Face-style
//! hub, datasets from https URLs), with retries, resume and checksums.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use finetune_operator::fetch;

/// Downloads a job's inputs before the trainer starts.
#[derive(Parser, Debug)]
#[command(name = "finetune-fetch", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Attempts per file before giving up.
    #[arg(long, env = "FETCH_RETRIES", default_value_t = 5, global = true)]
    retries: u32,
    /// PEM bundle of the CAs to trust instead of the public roots (a private mirror's).
    #[arg(long, env = finetune_operator::build::FETCH_CA_BUNDLE_ENV, global = true)]
    ca_bundle: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Download one file from an https URL.
    Url {
        /// The URL.
        #[arg(long)]
        url: String,
        /// Destination file.
        #[arg(long)]
        dest: PathBuf,
        /// Expected SHA-256 (hex).
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Download a model repository (config, tokenizer, safetensors shards) from a hub.
    Hf {
        /// `org/name`.
        #[arg(long)]
        repo: String,
        /// Branch, tag or commit.
        #[arg(long, default_value = "main")]
        revision: String,
        /// Destination directory.
        #[arg(long)]
        dest: PathBuf,
        /// Hub endpoint.
        #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
        endpoint: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let policy = fetch::RetryPolicy {
        attempts: cli.retries.max(1),
        ca_bundle: cli.ca_bundle.clone(),
        ..fetch::RetryPolicy::default()
    };
    match cli.command {
        Command::Url { url, dest, sha256 } => {
            // A bearer token from the job's Secret reference, when it names one; never printed.
            let token = std::env::var(finetune_operator::build::FETCH_TOKEN_ENV)
                .ok()
                .filter(|t| !t.is_empty());
            let bytes = fetch::download(&url, &dest, sha256.as_deref(), token.as_deref(), &policy)?;
            println!("downloaded {bytes} bytes to {}", dest.display());
        }
        Command::Hf {
            repo,
            revision,
            dest,
            endpoint,
        } => {
            // The token comes from the pod's Secret reference; it is never printed.
            let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
            let snapshot = fetch::download_hf_repo(
                &endpoint,
                &repo,
                &revision,
                &dest,
                token.as_deref(),
                &policy,
            )?;
            println!(
                "downloaded {} files of {repo}@{revision} (commit {}) to {}",
                snapshot.files.len(),
                snapshot.commit,
                dest.display()
            );
        }
    }
    Ok(())
}
