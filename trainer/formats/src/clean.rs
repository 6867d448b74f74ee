//! Reading a dataset file with cleaning: normalisation, empty/duplicate/length filters,
//! invalid-row policy, and a report with the label distribution before and after.

use serde::{Deserialize, Serialize};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::BufRead;
use std::path::Path;

use crate::csv::CsvReader;
use crate::example::Example;
use crate::jsonl::{ColumnMapping, parse_line};
use crate::text::LineReader;
use crate::{Error, Result};

/// What to do with a row that cannot be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvalidRowPolicy {
    /// Count it in the report and go on.
    Skip,
    /// Stop with the file, line and reason.
    Fail,
}

/// Dataset file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// CSV with a header row.
    Csv,
    /// JSON Lines.
    Jsonl,
}

/// Cleaning options.
#[derive(Debug, Clone, PartialEq)]
pub struct CleaningOptions {
    /// Drop rows whose normalised text was seen before.
    pub dedupe: bool,
    /// Drop rows with empty text or response.
    pub drop_empty: bool,
    /// Minimum text length in characters.
    pub min_length: Option<usize>,
    /// Maximum text length in characters.
    pub max_length: Option<usize>,
    /// Invalid-row policy.
    pub on_invalid_row: InvalidRowPolicy,
    /// Column mapping.
    pub columns: ColumnMapping,
    /// Whether the response column is a class label (normalised, counted in distributions).
    pub labels_are_classes: bool,
    /// Normalise labels (case, whitespace); when false they are only trimmed.
    pub normalize_labels: bool,
    /// When not empty, rows with another label are invalid.
    pub allowed_labels: Vec<String>,
    /// Fail when more than this fraction of the rows is invalid.
    pub max_invalid_fraction: f64,
}

impl Default for CleaningOptions {
    fn default() -> Self {
        Self {
            dedupe: true,
            drop_empty: true,
            min_length: None,
            max_length: None,
            on_invalid_row: InvalidRowPolicy::Skip,
            columns: ColumnMapping::default(),
            labels_are_classes: true,
            normalize_labels: true,
            allowed_labels: vec![],
            max_invalid_fraction: 1.0,
        }
    }
}

/// What cleaning did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CleaningReport {
    /// Rows read (excluding the header).
    pub rows_read: usize,
    /// Rows kept.
    pub rows_kept: usize,
    /// Dropped rows by reason (`empty`, `duplicate`, `too_short`, `too_long`, `invalid`).
    pub dropped: BTreeMap<String, usize>,
    /// Label counts of the parsed rows before filtering.
    pub labels_before: BTreeMap<String, usize>,
    /// Label counts of the kept rows.
    pub labels_after: BTreeMap<String, usize>,
    /// Examples truncated to fit the sequence length (filled in by tokenisation).
    pub truncated: usize,
    /// The first few invalid rows, as `line: reason`.
    pub invalid_examples: Vec<String>,
    /// Warnings, e.g. classes under 10 %.
    pub warnings: Vec<String>,
    /// Train/validation sizes and label counts (filled in by the split).
    pub split: Option<SplitSummary>,
}

/// Sizes after the split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitSummary {
    /// Training rows.
    pub train: usize,
    /// Validation rows.
    pub validation: usize,
    /// Label counts in validation.
    pub validation_labels: BTreeMap<String, usize>,
}

/// Collapses internal whitespace and trims.
pub fn normalize_text(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Normalises a label: whitespace collapsed, first letter upper case, the rest lower case.
pub fn normalize_label(s: &str) -> String {
    let s = normalize_text(s).to_lowercase();
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn text_key(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.to_lowercase().hash(&mut h);
    h.finish()
}

struct Cleaner<'a> {
    opts: &'a CleaningOptions,
    file: String,
    report: CleaningReport,
    seen: HashSet<u64>,
    kept: Vec<Example>,
}

impl Cleaner<'_> {
    fn drop(&mut self, reason: &str) {
        *self.report.dropped.entry(reason.to_string()).or_default() += 1;
    }

    fn invalid(&mut self, line: usize, reason: String) -> Result<()> {
        if self.opts.on_invalid_row == InvalidRowPolicy::Fail {
            return Err(Error::InvalidRow {
                file: self.file.clone(),
                line,
                reason,
            });
        }
        self.drop("invalid");
        if self.report.invalid_examples.len() < 10 {
            self.report
                .invalid_examples
                .push(format!("{line}: {reason}"));
        }
        Ok(())
    }

    fn accept(&mut self, mut ex: Example) -> Result<()> {
        ex.user = normalize_text(&ex.user);
        if self.opts.labels_are_classes && ex.label.is_some() {
            ex.response = if self.opts.normalize_labels {
                normalize_label(&ex.response)
            } else {
                normalize_text(&ex.response)
            };
            ex.label = Some(ex.response.clone());
        } else {
            ex.response = ex.response.trim().to_string();
        }
        if let Some(l) = &ex.label {
            if !self.opts.allowed_labels.is_empty()
                && !self
                    .opts
                    .allowed_labels
                    .iter()
                    .any(|a| normalize_label(a) == *l || a == l)
            {
                return self.invalid(ex.line, format!("label {l:?} is not in allowedLabels"));
            }
            *self.report.labels_before.entry(l.clone()).or_default() += 1;
        }
        if self.opts.drop_empty && (ex.user.is_empty() || ex.response.is_empty()) {
            self.drop("empty");
            return Ok(());
        }
        let len = ex.user.chars().count();
        if self.opts.min_length.is_some_and(|m| len < m) {
            self.drop("too_short");
            return Ok(());
        }
        if self.opts.max_length.is_some_and(|m| len > m) {
            self.drop("too_long");
            return Ok(());
        }
        if self.opts.dedupe {
            let mut key = text_key(&ex.user);
            for (u, a) in &ex.history {
                key ^= text_key(u).rotate_left(7) ^ text_key(a).rotate_left(13);
            }
            if !self.seen.insert(key) {
                self.drop("duplicate");
                return Ok(());
            }
        }
        if let Some(l) = &ex.label {
            *self.report.labels_after.entry(l.clone()).or_default() += 1;
        }
        self.kept.push(ex);
        Ok(())
    }
}

/// Reads and cleans a dataset from a stream.
pub fn read_dataset<R: BufRead>(
    reader: R,
    format: Format,
    file: &str,
    opts: &CleaningOptions,
) -> Result<(Vec<Example>, CleaningReport)> {
    let mut c = Cleaner {
        opts,
        file: file.to_string(),
        report: CleaningReport::default(),
        seen: HashSet::new(),
        kept: Vec::new(),
    };
    match format {
        Format::Csv => {
            let mut rows = CsvReader::new(reader);
            let header = match rows.next() {
                Some(Ok(h)) => h,
                Some(Err(e)) if e.fatal => {
                    return Err(Error::Unreadable {
                        file: file.into(),
                        line: e.line,
                        reason: e.reason,
                    });
                }
                Some(Err(e)) => {
                    return Err(Error::InvalidRow {
                        file: file.into(),
                        line: e.line,
                        reason: format!("header: {}", e.reason),
                    });
                }
                None => return Err(Error::Data(format!("{file}: empty file"))),
            };
            let find = |name: &str| {
                header
                    .fields
                    .iter()
                    .position(|h| h.trim().eq_ignore_ascii_case(name.trim()))
            };
            let (ti, li) = match (find(&opts.columns.text), find(&opts.columns.label)) {
                (Some(t), Some(l)) => (t, l),
                _ => {
                    return Err(Error::Data(format!(
                        "{file}: header {:?} lacks columns {:?} and {:?}",
                        header.fields, opts.columns.text, opts.columns.label
                    )));
                }
            };
            for rec in rows {
                c.report.rows_read += 1;
                match rec {
                    Err(e) if e.fatal => {
                        return Err(Error::Unreadable {
                            file: file.into(),
                            line: e.line,
                            reason: e.reason,
                        });
                    }
                    Err(e) => c.invalid(e.line, e.reason)?,
                    Ok(r) if r.fields.len() != header.fields.len() => c.invalid(
                        r.line,
                        format!(
                            "{} fields, header has {}",
                            r.fields.len(),
                            header.fields.len()
                        ),
                    )?,
                    Ok(r) => {
                        let text = r.fields.get(ti).cloned().unwrap_or_default();
                        let label = r.fields.get(li).cloned().unwrap_or_default();
                        c.accept(Example {
                            system: None,
                            history: vec![],
                            user: text,
                            response: label.clone(),
                            label: Some(label),
                            line: r.line,
                        })?;
                    }
                }
            }
        }
        Format::Jsonl => {
            let mut lines = LineReader::new(reader);
            while let Some(line) = lines.next_line() {
                let line_no = lines.line();
                let line = match line {
                    Ok(l) => l,
                    Err(e) if e.fatal => {
                        return Err(Error::Unreadable {
                            file: file.into(),
                            line: e.line,
                            reason: e.reason,
                        });
                    }
                    Err(e) => {
                        c.report.rows_read += 1;
                        c.invalid(e.line, e.reason)?;
                        continue;
                    }
                };
                if line.trim().is_empty() {
                    continue;
                }
                c.report.rows_read += 1;
                match parse_line(&line, line_no, &opts.columns) {
                    Ok(ex) => c.accept(ex)?,
                    Err(reason) => c.invalid(line_no, reason)?,
                }
            }
        }
    }
    c.report.rows_kept = c.kept.len();
    let invalid = c.report.dropped.get("invalid").copied().unwrap_or(0);
    if c.report.rows_read > 0
        && invalid as f64 > opts.max_invalid_fraction * c.report.rows_read as f64
    {
        return Err(Error::Data(format!(
            "{file}: {invalid} of {} rows are invalid (more than {:.0} %); first: {:?}",
            c.report.rows_read,
            100.0 * opts.max_invalid_fraction,
            c.report.invalid_examples.first()
        )));
    }
    let total: usize = c.report.labels_after.values().sum();
    for (label, n) in &c.report.labels_after {
        if total > 0 && (*n as f64) < 0.1 * total as f64 {
            c.report.warnings.push(format!(
                "class {label:?} is {:.1} % of the kept rows (< 10 %): the model may be biased against it",
                100.0 * *n as f64 / total as f64
            ));
        }
    }
    if opts.labels_are_classes && c.report.labels_after.len() == 1 {
        let only = c
            .report
            .labels_after
            .keys()
            .next()
            .cloned()
            .unwrap_or_default();
        c.report.warnings.push(format!(
            "{file}: every kept row has the label {only:?}: one class only, so classification metrics are skipped and the model can only learn a constant answer"
        ));
    }
    if c.kept.is_empty() {
        return Err(Error::Data(format!(
            "{file}: no usable rows after cleaning ({} rows read, dropped: {:?}; first invalid: {:?})",
            c.report.rows_read,
            c.report.dropped,
            c.report.invalid_examples.first()
        )));
    }
    Ok((c.kept, c.report))
}

/// Opens and cleans a dataset file; the format comes from `format` or the extension.
pub fn read_dataset_file(
    path: &Path,
    format: Option<Format>,
    opts: &CleaningOptions,
) -> Result<(Vec<Example>, CleaningReport)> {
    let format = format.unwrap_or_else(|| match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => Format::Jsonl,
        _ => Format::Csv,
    });
    // A FIFO or device would block or never end: only regular files are datasets.
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Data(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = std::io::BufReader::with_capacity(1 << 16, f);
    read_dataset(reader, format, &path.display().to_string(), opts)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn opts() -> CleaningOptions {
        CleaningOptions {
            columns: ColumnMapping {
                text: "ReviewText".into(),
                label: "SentimentLabel".into(),
                ..Default::default()
            },
            min_length: Some(3),
            max_length: Some(40),
            ..Default::default()
        }
    }

    const CSV: &str = "ReviewText,SentimentLabel\n“I love this product, it works great!”, Positive\ngreat  value,positive \nGreat value, POSITIVE\n,Negative\nok,Negative\nbroken on arrival,Negative\nthis text is far too long to be kept by the filter,Negative\n\"bad\"x,Negative\nmeh,Neutral\nworks,Positive\n";

    #[test]
    fn cleaning_report_counts_every_reason() {
        let (kept, r) = read_dataset(CSV.as_bytes(), Format::Csv, "t.csv", &opts()).unwrap();
        assert_eq!(r.rows_read, 10);
        assert_eq!(kept[0].user, "I love this product, it works great!");
        assert_eq!(kept[0].response, "Positive");
        assert_eq!(kept[1].user, "great value");
        assert_eq!(r.dropped["duplicate"], 1);
        assert_eq!(r.dropped["empty"], 1);
        assert_eq!(r.dropped["too_short"], 1);
        assert_eq!(r.dropped["too_long"], 1);
        assert_eq!(r.dropped["invalid"], 1);
        assert_eq!(r.rows_kept, 5);
        assert_eq!(r.labels_after["Positive"], 3);
        assert_eq!(r.labels_before["Positive"], 4);
        assert_eq!(r.labels_after["Neutral"], 1);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let mut o = opts();
        o.on_invalid_row = InvalidRowPolicy::Fail;
        let err = read_dataset(CSV.as_bytes(), Format::Csv, "t.csv", &o).unwrap_err();
        assert!(err.to_string().starts_with("t.csv:9: invalid row"), "{err}");
    }

    #[test]
    fn warns_about_rare_class() {
        let mut s = String::from("ReviewText,SentimentLabel\n");
        for i in 0..19 {
            s.push_str(&format!("review number {i},Positive\n"));
        }
        s.push_str("bad one,Negative\n");
        let (_, r) = read_dataset(s.as_bytes(), Format::Csv, "t.csv", &opts()).unwrap();
        assert_eq!(r.warnings.len(), 1);
        assert!(r.warnings[0].contains("Negative"));
    }
}
