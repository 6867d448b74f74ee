//! `finetune-trainer`: LoRA and full fine-tuning of Llama-family models on candle.
//!
//! The crate is organised in layers, bottom to top; a module uses only the layers below it
//! (checked by `tests/layering.rs`):
//! 1. [`error`], [`rng`], [`kernels`], [`workers`]: the error type, the seeded random stream,
//!    the vectorised f32 kernels of the CPU ops, the single-threaded CPU workers a micro-batch
//!    or an evaluation is split between;
//! 2. [`atomic_file`] (atomic writes, checksums), [`data`] (dataset reading, cleaning with a
//!    report, stratified split, prompt templates, tokenisation with a response-only loss mask),
//!    [`optim`] (AdamW, schedules, clipping), [`metrics`] (Prometheus and `/progress`), [`plan`]
//!    (the memory plan), [`distributed`] (the collectives of data-parallel training and the
//!    rendezvous contract);
//! 3. [`model`]: an own, fully differentiable Llama (HF `config.json` and weight names), LoRA
//!    adapters with PEFT export, the `tiny` preset's architecture and random weights;
//! 4. [`loss`] (masked cross-entropy, token log-probabilities), [`checkpoint`] (checksummed
//!    manifests, retention, verified resume);
//! 5. [`eval`]: validation loss, label-likelihood classification, overfitting detection,
//!    held-out evaluation and comparison;
//! 6. [`train`]: the resolved parameters, the one optimizer step and the training loop;
//! 7. [`config`] (the parameters from `finetune_api::TrainerConfig`), [`run`] (a whole job and its
//!    report), [`tiny_base`] (the tiny preset initialised and pretrained, the base of CPU runs);
//! 8. [`cli`]: the `finetune-trainer` commands and their flags (the binary only calls them).

pub mod atomic_file;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod distributed;
pub mod error;
pub mod eval;
pub mod kernels;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod plan;
pub mod rng;
pub mod run;
pub mod tiny_base;
pub mod train;
pub mod workers;

#[cfg(test)]
mod test_util;

pub use error::{Result, TrainerError};
