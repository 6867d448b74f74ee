//! `docs/reasons.md` lists every reason the operator writes, and marks as warnings exactly those
//! whose events are warnings.
#![allow(clippy::expect_used)]

use finetune_operator::lifecycle::BLOCKING_WAIT_REASONS;
use finetune_operator::reason::Reason;

/// The doc's table rows and reported-reason paragraph: (reason, marked as a warning).
fn documented() -> Vec<(String, bool)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/reasons.md");
    let text = std::fs::read_to_string(path).expect("docs/reasons.md");
    let mut found = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find('`') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('`') else { break };
        let name = &after[..end];
        let tail = &after[end + 1..];
        if !name.is_empty()
            && name.chars().all(char::is_alphanumeric)
            && name.starts_with(char::is_uppercase)
        {
            found.push((name.to_string(), tail.trim_start().starts_with('⚠')));
        }
        rest = tail;
    }
    found
}

#[test]
fn every_reason_is_documented_with_its_event_type() {
    let doc = documented();
    let reported = ["OOMKilled", "Error"]
        .into_iter()
        .chain(BLOCKING_WAIT_REASONS)
        .map(|r| Reason::Reported(r.to_string()));
    for reason in Reason::OWN.iter().cloned().chain(reported) {
        let entry = doc.iter().find(|(name, _)| name == reason.as_str());
        let Some((_, warning)) = entry else {
            panic!("docs/reasons.md does not list {reason}");
        };
        assert_eq!(
            *warning,
            reason.is_warning(),
            "docs/reasons.md marks {reason} as warning={warning}, the operator's events say {}",
            reason.is_warning()
        );
    }
}
