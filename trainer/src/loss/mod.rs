//! Masked cross-entropy computed only at the loss positions.
//!
//! The model projects only the hidden states of the selected positions onto the vocabulary
//! (see [`crate::model::Llama::logits_at`]), so the (batch × seq × vocab) logits tensor is never
//! materialised; the log-softmax below runs on (loss tokens × vocab) only.

use candle_core::{D, Tensor};

use crate::Result;

pub mod fused_ce;

/// Log-probability of each target under `logits` (n, vocab) → (n). The targets are moved to
/// the logits' device (the last layer's when the layers are split over GPUs).
pub fn token_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lsm = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let targets = targets.to_device(logits.device())?;
    Ok(lsm.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?)
}

/// Mean negative log-likelihood over the loss tokens. On CPU with f32 logits this is one fused
/// op with its own backward ([`crate::loss::fused_ce`]); elsewhere it is built from primitives.
pub fn masked_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = &targets.to_device(logits.device())?;
    if logits.device().is_cpu() && logits.dtype() == candle_core::DType::F32 {
        return Ok(crate::loss::fused_ce::fused_nll(logits, targets)?);
    }
    reference_cross_entropy(logits, targets)
}

/// The primitive-op formulation (any device), also the reference for the fused op's tests.
pub fn reference_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
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

    #[test]
    fn fused_op_matches_reference_value_and_gradient() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(&(Tensor::randn(0f32, 3.0, (7, 50), &dev).unwrap()))
            .unwrap();
        let t = Tensor::new(&[0u32, 49, 3, 3, 17, 8, 25], &dev).unwrap();
        let a = masked_cross_entropy(x.as_tensor(), &t).unwrap();
        let b = reference_cross_entropy(x.as_tensor(), &t).unwrap();
        let (av, bv) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!((av - bv).abs() < 1e-5, "{av} vs {bv}");
        let ga = a.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let gb = b.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let d = crate::test_util::max_abs_diff(&ga, &gb);
        assert!(d < 1e-6, "{d}");
    }
}
