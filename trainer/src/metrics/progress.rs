//! The progress document the operator polls: the API crate's `TrainerProgress` (one source of
//! truth shared with the operator), re-exported under shorter names.

pub use finetune_api::{TrainerPhase as Phase, TrainerProgress as Progress};

/// Serialises the progress document, dropping optional detail until it fits in `max` bytes
/// (the termination message limit is 4 KiB).
pub fn compact_json(p: &Progress, max: usize) -> String {
    let mut p = p.clone();
    let mut s = serde_json::to_string(&p).unwrap_or_else(|_| "{}".into());
    let shorten = |x: &mut Option<String>| {
        if let Some(v) = x.as_mut() {
            let cut: String = v.chars().take(300).collect();
            *v = cut;
        }
    };
    if s.len() > max {
        shorten(&mut p.error);
        shorten(&mut p.stop_reason);
        shorten(&mut p.overfitting_reason);
        s = serde_json::to_string(&p).unwrap_or_else(|_| "{}".into());
    }
    if s.len() > max {
        p.error = None;
        p.overfitting_reason = None;
        s = serde_json::to_string(&p).unwrap_or_else(|_| "{}".into());
    }
    s
}
