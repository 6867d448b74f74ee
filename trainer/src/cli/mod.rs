//! The `finetune-trainer` command line: its flags ([`Args`]), what each command does
//! ([`run`]) and the log setup. The binary only parses the flags and calls [`run`].

mod args;
mod commands;
pub mod gang;
mod launch;
mod split_check;

pub use args::{Args, Command, HeldOutArgs, Resume, cleaning_from_flags};
pub use commands::run;

use std::io::IsTerminal;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`): human-readable on a terminal, JSON
/// lines otherwise (a pod's log).
pub fn init_logging() {
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
