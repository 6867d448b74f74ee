//! Training: parameters, data preparation, masked loss, the optimizer step and the training
//! loop.

pub mod base_kl;
pub mod batching;
pub mod data_prep;
pub mod device;
pub mod export;
mod micro_batch;
pub mod params;
pub mod step;
pub mod trainer;

pub use params::{EvalParams, TrainParams};
pub use trainer::{RunOutcome, StepRecord, StopReason, Trainer};
