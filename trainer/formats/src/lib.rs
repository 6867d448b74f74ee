//! The trainer's file formats, free of the numerical stack (no candle, no tokenizers), so that
//! they can be fuzzed cheaply (see `fuzz/`):
//! - [`text`]: bounded line reading with clear encoding errors (binary, UTF-16, Latin-1);
//! - [`csv`], [`jsonl`], [`example`], [`clean`]: the dataset reader and the cleaning report;
//! - [`manifest`]: the checkpoint manifest;
//! - [`safetensors`]: header validation before any tensor loader sees a file;
//! - [`paths`]: resolving input paths beneath their mount root without following symlinks out.

pub mod clean;
pub mod csv;
pub mod error;
pub mod example;
pub mod jsonl;
pub mod manifest;
pub mod paths;
pub mod safetensors;
pub mod text;

pub use error::{Error, Result};
