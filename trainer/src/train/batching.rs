//! The order of an epoch's micro-batches: length-grouped, shuffled buckets.
//!
//! The epoch's rows are shuffled with the seed, cut into buckets of [`BUCKET_BATCHES`]
//! micro-batches, each bucket sorted by length and cut into micro-batches, and the micro-batches
//! shuffled again. A micro-batch then holds rows of similar length, so it is padded little, and
//! its memory is bounded by its own longest row rather than the epoch's. The micro-batch holding
//! the epoch's longest row goes first, so a batch that does not fit fails at the first step, not
//! hours in. Every row appears exactly once per epoch; the order depends only on the seed and
//! the epoch (resume replays it).

use crate::rng::Rng;

/// Micro-batches per length bucket: large enough to group lengths well, small enough that the
/// order stays random across the epoch (Hugging Face's length-grouped sampler uses 50).
pub const BUCKET_BATCHES: usize = 50;

/// The micro-batches (row indices) of `epoch` for rows of `lengths`, `batch` rows each (the last
/// may be shorter). Without `group_by_length`, a plain shuffle cut in order.
pub fn micro_batches(
    lengths: &[usize],
    batch: usize,
    seed: u64,
    epoch: usize,
    group_by_length: bool,
) -> Vec<Vec<usize>> {
    let batch = batch.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    Rng::derive(seed, 0xE90C + epoch as u64).shuffle(&mut order);
    if !group_by_length {
        return order.chunks(batch).map(<[usize]>::to_vec).collect();
    }
    let len = |i: &usize| lengths.get(*i).copied().unwrap_or(0);
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(order.len().div_ceil(batch));
    for bucket in order.chunks(batch * BUCKET_BATCHES) {
        let mut bucket = bucket.to_vec();
        bucket.sort_by_key(|i| std::cmp::Reverse(len(i)));
        batches.extend(bucket.chunks(batch).map(<[usize]>::to_vec));
    }
    Rng::derive(seed, 0xB0C4 + epoch as u64).shuffle(&mut batches);
    let longest = batches
        .iter()
        .enumerate()
        .max_by_key(|(k, b)| (b.iter().map(len).max().unwrap_or(0), std::cmp::Reverse(*k)))
        .map(|(k, _)| k);
    if let Some(k) = longest {
        batches.swap(0, k);
    }
    batches
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Padded tokens of a batching: Σ over batches of (longest × rows − Σ lengths).
    fn padding(lengths: &[usize], batches: &[Vec<usize>]) -> usize {
        batches
            .iter()
            .map(|b| {
                let l: Vec<usize> = b.iter().map(|i| lengths[*i]).collect();
                l.iter().max().unwrap() * l.len() - l.iter().sum::<usize>()
            })
            .sum()
    }

    fn lengths() -> Vec<usize> {
        let mut rng = Rng::new(9);
        (0..2000)
            .map(|_| 8 + (rng.next_f32() * 500.0) as usize)
            .collect()
    }

    #[test]
    fn every_row_once_per_epoch_and_the_same_order_for_the_same_seed() {
        let l = lengths();
        for group in [false, true] {
            let b = micro_batches(&l, 8, 42, 3, group);
            let mut all: Vec<usize> = b.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..l.len()).collect::<Vec<_>>());
            assert!(b.iter().all(|x| x.len() <= 8));
            assert_eq!(b, micro_batches(&l, 8, 42, 3, group));
            assert_ne!(b, micro_batches(&l, 8, 42, 4, group), "epochs differ");
        }
    }

    #[test]
    fn grouping_cuts_padding_and_puts_the_longest_row_first() {
        let l = lengths();
        let plain = micro_batches(&l, 8, 42, 0, false);
        let grouped = micro_batches(&l, 8, 42, 0, true);
        let (p, g) = (padding(&l, &plain), padding(&l, &grouped));
        assert!(g * 10 < p, "padding grouped {g} vs plain {p}");
        let longest = *l.iter().max().unwrap();
        assert!(grouped[0].iter().any(|i| l[*i] == longest));
        // Still shuffled: neighbouring micro-batches are not sorted by length across the epoch.
        let firsts: Vec<usize> = grouped.iter().map(|b| l[b[0]]).collect();
        let descending = firsts.windows(2).filter(|w| w[0] >= w[1]).count();
        assert!(
            descending < firsts.len() * 3 / 4,
            "{descending} of {}",
            firsts.len()
        );
    }
}
