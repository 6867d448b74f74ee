//! Masked cross-entropy computed only at the loss positions.
//!
//! The model projects only the hidden states of the selected positions onto the vocabulary
//! (see [`crate::model::Llama::logits_at`]), so the (batch × seq × vocab) logits tensor is never
//! materialised; the log-softmax below runs on (loss tokens × vocab) only.

use candle_core::{D, Tensor};

use crate::Result;

/// Log-probability of each target under `logits` (n, vocab) → (n).
pub fn token_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lsm = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok(lsm.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?)
}

/// Mean negative log-likelihood over the loss tokens.
pub fn masked_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(token_log_probs(logits, targets)?.neg()?.mean_all()?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_cross_entropy_on_selected_rows() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.1, 0.2, 3.0]], &dev).unwrap();
        let t = Tensor::new(&[1u32, 2], &dev).unwrap();
        let ours = masked_cross_entropy(&logits, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let theirs = candle_nn::loss::cross_entropy(&logits, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((ours - theirs).abs() < 1e-6);
    }
}
