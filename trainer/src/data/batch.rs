//! Right-padded batches with the positions and targets of the loss tokens.

use std::ops::Range;

use candle_core::{Device, Tensor};

use super::encode::Encoded;
use crate::Result;

/// A batch ready for the model.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids (b, s), right padded with `pad`.
    pub ids: Tensor,
    /// Per row: 1 for real tokens, 0 for padding.
    pub attention: Vec<Vec<u8>>,
    /// Flat indices (into b·s) of the positions whose next token is a target.
    pub rows: Tensor,
    /// Target token ids, aligned with `rows`.
    pub targets: Tensor,
    /// For each loss position, the example (row in the batch) it belongs to.
    pub row_of_target: Vec<usize>,
    /// Number of loss tokens.
    pub n_targets: usize,
    /// Flat indices (into b·s) of the positions whose next token is a prompt token (not a
    /// target): where the forgetting penalty compares the model with its base.
    pub context_rows: Vec<u32>,
    /// Number of real (non-pad) tokens.
    pub n_tokens: usize,
}

/// A batch's loss and context positions on the host, before they become tensors.
struct LossPositions {
    /// Flat indices of the positions whose next token is a target.
    rows: Vec<u32>,
    /// Their target token ids.
    targets: Vec<u32>,
    /// The row each target belongs to.
    row_of_target: Vec<usize>,
    /// Flat indices of the positions whose next token is a prompt token.
    context_rows: Vec<u32>,
}

impl Batch {
    /// Builds a batch from encoded examples, padding to the longest.
    pub fn new(items: &[&Encoded], pad: u32, device: &Device) -> Result<Self> {
        let b = items.len();
        let s = items.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
        let mut ids = vec![pad; b * s];
        let mut attention = Vec::with_capacity(b);
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut row_of_target = Vec::new();
        let mut context_rows = Vec::new();
        let mut n_tokens = 0;
        for (bi, e) in items.iter().enumerate() {
            let mut att = vec![0u8; s];
            for (t, &id) in e.ids.iter().enumerate() {
                ids[bi * s + t] = id;
                att[t] = 1;
                if t > 0 && e.target.get(t).copied() == Some(1) {
                    rows.push((bi * s + t - 1) as u32);
                    targets.push(id);
                    row_of_target.push(bi);
                } else if t > 0 {
                    context_rows.push((bi * s + t - 1) as u32);
                }
            }
            n_tokens += e.ids.len();
            attention.push(att);
        }
        let ids = Tensor::from_vec(ids, (b, s), device)?;
        let positions = LossPositions {
            rows,
            targets,
            row_of_target,
            context_rows,
        };
        Self::from_parts(ids, attention, positions, n_tokens)
    }

    /// The batch of `ids` (b, s) with `attention` and the loss and context positions.
    fn from_parts(
        ids: Tensor,
        attention: Vec<Vec<u8>>,
        positions: LossPositions,
        n_tokens: usize,
    ) -> Result<Self> {
        let device = ids.device().clone();
        let n_targets = positions.rows.len();
        Ok(Self {
            ids,
            attention,
            rows: Tensor::from_vec(positions.rows, n_targets, &device)?,
            targets: Tensor::from_vec(positions.targets, n_targets, &device)?,
            row_of_target: positions.row_of_target,
            n_targets,
            context_rows: positions.context_rows,
            n_tokens,
        })
    }

    /// Padded width of the rows (the longest example).
    pub fn width(&self) -> Result<usize> {
        Ok(self.ids.dim(1)?)
    }

    /// Examples (rows) in the batch.
    pub fn len(&self) -> usize {
        self.attention.len()
    }

    /// Whether the batch has no example.
    pub fn is_empty(&self) -> bool {
        self.attention.is_empty()
    }

    /// The flat positions of `flat` (row · width + column) that lie in the rows `range`,
    /// renumbered as positions of [`Batch::row_range`]'s part, in their order.
    pub fn positions_in_rows(&self, range: Range<usize>, flat: &[u32]) -> Result<Vec<u32>> {
        let span = self.flat_span(range)?;
        Ok(flat
            .iter()
            .filter(|&&p| span.contains(&(p as usize)))
            .map(|&p| p - span.start as u32)
            .collect())
    }

    /// The flat positions of the rows `range`.
    fn flat_span(&self, range: Range<usize>) -> Result<Range<usize>> {
        let s = self.width()?;
        Ok(range.start * s..range.end * s)
    }

    /// The batch of rows `range` of this one, at this batch's width (so a row's positions, and
    /// its elements in every per-position tensor, are laid out as here): the same loss and
    /// context positions, renumbered from the range's first row.
    pub fn row_range(&self, range: Range<usize>) -> Result<Batch> {
        let span = self.flat_span(range.clone())?;
        let within = |flat: u32| span.contains(&(flat as usize));
        let renumber = |flat: u32| flat - span.start as u32;
        let all_rows = self.rows.to_vec1::<u32>()?;
        let all_targets = self.targets.to_vec1::<u32>()?;
        let (mut rows, mut targets, mut row_of_target) = (Vec::new(), Vec::new(), Vec::new());
        for ((&flat, &target), &row) in all_rows.iter().zip(&all_targets).zip(&self.row_of_target) {
            if within(flat) {
                rows.push(renumber(flat));
                targets.push(target);
                row_of_target.push(row - range.start);
            }
        }
        let context_rows = self.positions_in_rows(range.clone(), &self.context_rows)?;
        let attention = self.attention[range.clone()].to_vec();
        let n_tokens = attention
            .iter()
            .map(|row| row.iter().filter(|&&a| a == 1).count())
            .sum();
        let positions = LossPositions {
            rows,
            targets,
            row_of_target,
            context_rows,
        };
        let ids = self.ids.narrow(0, range.start, range.len())?;
        Self::from_parts(ids, attention, positions, n_tokens)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn right_padding_and_target_positions() {
        let a = Encoded {
            ids: vec![1, 10, 11, 20, 2],
            target: vec![0, 0, 0, 1, 1],
            label: None,
            truncated: false,
            prompt_len: 3,
        };
        let b = Encoded {
            ids: vec![1, 12, 21, 2],
            target: vec![0, 0, 1, 1],
            label: None,
            truncated: false,
            prompt_len: 2,
        };
        let batch = Batch::new(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.ids.to_vec2::<u32>().unwrap(),
            vec![vec![1, 10, 11, 20, 2], vec![1, 12, 21, 2, 0]]
        );
        assert_eq!(batch.attention[1], vec![1, 1, 1, 1, 0]);
        assert_eq!(batch.rows.to_vec1::<u32>().unwrap(), vec![2, 3, 6, 7]);
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![20, 2, 21, 2]);
        assert_eq!(batch.row_of_target, vec![0, 0, 1, 1]);
        // Positions predicting prompt tokens: 10 and 11 in row 0, 12 in row 1.
        assert_eq!(batch.context_rows, vec![0, 1, 5]);
        assert_eq!(batch.n_tokens, 9);
    }

    /// Three examples of different lengths and loss positions.
    fn three() -> Vec<Encoded> {
        let example = |ids: Vec<u32>, target: Vec<u8>| Encoded {
            prompt_len: target.iter().position(|&t| t == 1).unwrap_or(ids.len()),
            ids,
            target,
            label: None,
            truncated: false,
        };
        vec![
            example(vec![1, 10, 11, 20, 2], vec![0, 0, 0, 1, 1]),
            example(vec![1, 12, 21, 2], vec![0, 0, 1, 1]),
            example(vec![1, 13, 14, 15, 22, 23, 2], vec![0, 0, 0, 0, 1, 1, 1]),
        ]
    }

    #[test]
    fn a_row_range_is_the_batch_of_those_rows_at_the_full_width() {
        let items = three();
        let refs: Vec<&Encoded> = items.iter().collect();
        let batch = Batch::new(&refs, 0, &Device::Cpu).unwrap();
        assert_eq!(batch.width().unwrap(), 7);
        for range in [0..1, 1..3, 0..3, 2..3] {
            let got = batch.row_range(range.clone()).unwrap();
            // The same rows built on their own, padded to the full batch's width by a row of
            // padding that carries no position.
            let padding = Encoded {
                ids: vec![0; 7],
                target: vec![0; 7],
                label: None,
                truncated: false,
                prompt_len: 7,
            };
            let mut own: Vec<&Encoded> = refs[range.clone()].to_vec();
            own.push(&padding);
            let want = Batch::new(&own, 0, &Device::Cpu).unwrap();
            let n = range.len();
            assert_eq!(
                got.ids.to_vec2::<u32>().unwrap(),
                want.ids.narrow(0, 0, n).unwrap().to_vec2::<u32>().unwrap()
            );
            assert_eq!(got.attention, want.attention[..n].to_vec());
            let own_rows = want.row_of_target.iter().filter(|&&r| r < n).count();
            assert_eq!(got.n_targets, own_rows, "{range:?}");
            assert_eq!(
                got.rows.to_vec1::<u32>().unwrap(),
                want.rows.to_vec1::<u32>().unwrap()[..own_rows].to_vec()
            );
            assert_eq!(
                got.targets.to_vec1::<u32>().unwrap(),
                want.targets.to_vec1::<u32>().unwrap()[..own_rows].to_vec()
            );
            assert_eq!(got.row_of_target, want.row_of_target[..own_rows].to_vec());
            let own_context: Vec<u32> = want
                .context_rows
                .iter()
                .copied()
                .filter(|&f| (f as usize) < n * 7)
                .collect();
            assert_eq!(got.context_rows, own_context);
            assert_eq!(
                got.n_tokens,
                items[range].iter().map(|e| e.ids.len()).sum::<usize>()
            );
        }
    }
}
