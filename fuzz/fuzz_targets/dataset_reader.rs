//! The CSV and JSONL dataset reader with cleaning: any bytes give rows, a report or an error
//! naming a line, never a panic or a hang.
#![no_main]

use finetune_formats::clean::{CleaningOptions, Format, InvalidRowPolicy, read_dataset};
use finetune_formats::jsonl::ColumnMapping;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the format and options, the rest is the file.
    let Some((&sel, file)) = data.split_first() else {
        return;
    };
    let format = if sel & 1 == 0 {
        Format::Csv
    } else {
        Format::Jsonl
    };
    let opts = CleaningOptions {
        dedupe: sel & 2 != 0,
        on_invalid_row: if sel & 4 != 0 {
            InvalidRowPolicy::Fail
        } else {
            InvalidRowPolicy::Skip
        },
        min_length: (sel & 8 != 0).then_some(2),
        max_length: (sel & 16 != 0).then_some(64),
        labels_are_classes: sel & 32 != 0,
        normalize_labels: sel & 64 != 0,
        allowed_labels: if sel & 128 != 0 {
            vec!["Positive".into(), "negative".into()]
        } else {
            vec![]
        },
        // CSV seeds are the real review fixture (its header); JSONL uses the default keys.
        columns: if format == Format::Csv {
            ColumnMapping {
                text: "ReviewText".into(),
                label: "SentimentLabel".into(),
                ..Default::default()
            }
        } else {
            ColumnMapping::default()
        },
        ..Default::default()
    };
    if let Ok((rows, report)) = read_dataset(file, format, "fuzz", &opts) {
        assert_eq!(rows.len(), report.rows_kept);
        assert!(report.rows_kept <= report.rows_read);
        assert!(!rows.is_empty());
    }
});
