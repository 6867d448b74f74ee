//! `finetune-trainer`: LoRA and full fine-tuning of Llama-family models on candle.
//!
//! The crate is organised as:
//! - [`data`]: dataset reading (CSV, JSONL), cleaning with a report, stratified split, prompt
//!   templates, tokenisation with a response-only loss mask and right padding;
//! - [`model`]: an own, fully differentiable Llama (HF `config.json` and weight names), LoRA adapters
//!   with PEFT export, and the `tiny` preset's architecture and random weights;
//! - [`optim`]: AdamW with serialisable state, learning-rate schedules and gradient clipping;
//! - [`train`]: masked cross-entropy, the optimizer step and the training loop;
//! - [`tiny_base`]: the tiny preset initialised and pretrained, the base of CPU runs;
//! - [`checkpoint`]: atomic checkpoints with a checksummed manifest and exact resume;
//! - [`eval`]: validation loss, label-likelihood classification metrics, overfitting detection;
//! - [`metrics`]: Prometheus metrics and the `/progress` endpoint;
//! - [`config`]: the trainer's resolved parameters, mapped from `finetune_api::TrainerConfig`;
//! - [`cli`]: the `finetune-trainer` commands and their flags (the binary only calls them).

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod plan;
pub mod rng;
pub mod run;
pub mod tiny_base;
pub mod train;

#[cfg(test)]
mod test_util;

pub use error::{Result, TrainerError};
