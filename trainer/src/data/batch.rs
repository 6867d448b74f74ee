//! Right-padded batches with the positions and targets of the loss tokens.

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
        let n_targets = rows.len();
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, s), device)?,
            attention,
            rows: Tensor::from_vec(rows, n_targets, device)?,
            targets: Tensor::from_vec(targets, n_targets, device)?,
            row_of_target,
            n_targets,
            context_rows,
            n_tokens,
        })
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
}
