//! The tiny base model of CPU runs: the tiny preset initialised in Hugging Face layout
//! ([`init`], `finetune-trainer init-tiny`), optionally pretrained on general text first
//! ([`pretrain()`], through the training loop's own optimizer step) so that a demo fine-tunes a
//! base that knows some English rather than random weights.

pub mod init;
pub mod pretrain;

pub use init::{InitOutcome, InitTiny, init_tiny};
pub use pretrain::{PretrainSettings, pretrain};
