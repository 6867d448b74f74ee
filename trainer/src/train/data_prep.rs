//! Turning a dataset file into encoded train/validation sets with the cleaning report.

use std::collections::BTreeMap;

use crate::Result;
use crate::data::clean::{CleaningReport, read_dataset_file};
use crate::data::encode::{Encoded, Encoder};
use crate::data::example::Example;
use crate::data::split::stratified_split;
use crate::train::params::TrainParams;

/// Encoded training and validation data.
#[derive(Debug, Clone)]
pub struct PreparedData {
    /// Training examples, encoded.
    pub train: Vec<Encoded>,
    /// Validation examples, encoded.
    pub val: Vec<Encoded>,
    /// Validation examples as parsed (for classification by label likelihood).
    pub val_examples: Vec<Example>,
    /// Class labels (sorted) when every row has one, else empty.
    pub labels: Vec<String>,
    /// Majority class of the training split.
    pub majority_class: Option<String>,
    /// Cleaning, truncation and split report.
    pub report: CleaningReport,
}

/// Reads, cleans, splits and encodes the dataset.
pub fn prepare(p: &TrainParams, encoder: &Encoder) -> Result<PreparedData> {
    let (examples, mut report) = read_dataset_file(&p.dataset, p.format, &p.cleaning)?;
    let all_labelled = examples.iter().all(|e| e.label.is_some());
    let (train_ex, val_ex, summary) = stratified_split(examples, p.validation_split, p.data_seed);
    report.split = Some(summary);
    let train = encoder.encode_all(&train_ex)?;
    let val = encoder.encode_all(&val_ex)?;
    report.truncated = train
        .iter()
        .chain(val.iter())
        .filter(|e| e.truncated)
        .count();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in &train_ex {
        if let Some(l) = &e.label {
            *counts.entry(l.clone()).or_default() += 1;
        }
    }
    let labels: Vec<String> = if all_labelled && counts.len() >= 2 && counts.len() <= 64 {
        counts.keys().cloned().collect()
    } else {
        vec![]
    };
    let majority_class = counts
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(l, _)| l.clone());
    Ok(PreparedData {
        train,
        val,
        val_examples: val_ex,
        labels,
        majority_class,
        report,
    })
}
