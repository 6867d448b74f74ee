//! The FineTuneJob validators on arbitrary YAML or JSON: `validate_document` (schema mirror, then
//! decode, then `validate`) and `validate` on whatever decodes as a job. Field errors, never a
//! panic.
#![no_main]

use finetune_api::FineTuneJob;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let doc: Option<serde_json::Value> = match data.first() {
        Some(b'{') => serde_json::from_slice(data).ok(),
        _ => serde_yaml::from_slice(data).ok(),
    };
    let Some(doc) = doc else {
        return;
    };
    match finetune_api::validate_document(&doc) {
        Ok(job) => assert!(finetune_api::validate(&job.spec).is_ok()),
        Err(errors) => assert!(!errors.is_empty()),
    }
    if let Ok(job) = serde_json::from_value::<FineTuneJob>(doc) {
        if let Err(errors) = finetune_api::validate(&job.spec) {
            assert!(!errors.is_empty());
            for e in errors {
                let _ = e.to_string();
            }
        }
    }
});
