//! Seeded, stratified train/validation split (run after deduplication, so no text is in both).

use std::collections::BTreeMap;

use super::clean::SplitSummary;
use super::example::Example;
use crate::rng::Rng;

/// Splits `examples` into (train, validation) with `fraction` of each label group (rounded,
/// at least one when the group has two or more rows and `fraction > 0`) in validation.
pub fn stratified_split(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>, SplitSummary) {
    let mut groups: BTreeMap<String, Vec<Example>> = BTreeMap::new();
    for ex in examples {
        groups
            .entry(ex.label.clone().unwrap_or_default())
            .or_default()
            .push(ex);
    }
    let mut train = Vec::new();
    let mut val = Vec::new();
    let mut summary = SplitSummary::default();
    for (gi, (label, mut group)) in groups.into_iter().enumerate() {
        let mut rng = Rng::derive(seed, 0x5_1117 + gi as u64);
        rng.shuffle(&mut group);
        let mut n_val = (group.len() as f64 * fraction).round() as usize;
        if fraction > 0.0 && n_val == 0 && group.len() >= 2 {
            n_val = 1;
        }
        n_val = n_val.min(group.len().saturating_sub(1));
        let rest = group.split_off(n_val);
        if !label.is_empty() {
            summary.validation_labels.insert(label, group.len());
        }
        val.extend(group);
        train.extend(rest);
    }
    // Interleave classes deterministically so the order does not follow labels.
    Rng::derive(seed, 0x5_1118).shuffle(&mut train);
    val.sort_by_key(|e| e.line);
    summary.train = train.len();
    summary.validation = val.len();
    (train, val, summary)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn ex(i: usize, label: &str) -> Example {
        Example {
            system: None,
            history: vec![],
            user: format!("text {i}"),
            response: label.into(),
            label: Some(label.into()),
            line: i + 2,
        }
    }

    #[test]
    fn stratified_seeded_disjoint() {
        let data: Vec<Example> = (0..100)
            .map(|i| ex(i, if i % 4 == 0 { "Negative" } else { "Positive" }))
            .collect();
        let (t, v, s) = stratified_split(data.clone(), 0.2, 42);
        assert_eq!(s.validation, 20);
        assert_eq!(s.validation_labels["Negative"], 5);
        assert_eq!(s.validation_labels["Positive"], 15);
        assert_eq!(t.len() + v.len(), 100);
        let tv: HashSet<_> = t.iter().map(|e| e.user.clone()).collect();
        assert!(v.iter().all(|e| !tv.contains(&e.user)));
        let (t2, v2, _) = stratified_split(data.clone(), 0.2, 42);
        assert_eq!((t, v), (t2, v2));
        let (_, v3, _) = stratified_split(data, 0.2, 43);
        assert_ne!(
            v3,
            stratified_split(
                (0..100)
                    .map(|i| ex(i, if i % 4 == 0 { "Negative" } else { "Positive" }))
                    .collect(),
                0.2,
                42
            )
            .1
        );
    }
}
