//! Datasets: reading (CSV, JSONL), cleaning with a report, stratified split, prompt templates,
//! tokenisation with a response-only loss mask, and right-padded batches.

pub mod batch;
pub mod clean;
pub mod csv;
pub mod encode;
pub mod example;
pub mod jsonl;
pub mod split;
pub mod template;

pub use batch::Batch;
pub use clean::{CleaningOptions, CleaningReport, InvalidRowPolicy};
pub use encode::{Encoded, Encoder};
pub use example::Example;
pub use template::PromptTemplate;
