//! Datasets: reading (CSV, JSONL), cleaning with a report, stratified split, prompt templates,
//! tokenisation with a response-only loss mask, and right-padded batches.

pub mod batch;
pub mod encode;
pub mod split;
pub mod template;

// The readers and the cleaning live in the light `finetune-formats` crate (fuzzed without the
// numerical stack); they keep their paths here.
pub use finetune_formats::{clean, csv, example, jsonl};

pub use batch::Batch;
pub use clean::{CleaningOptions, CleaningReport, InvalidRowPolicy};
pub use encode::{Encoded, Encoder};
pub use example::Example;
pub use template::PromptTemplate;
