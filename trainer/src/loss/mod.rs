//! Masked cross-entropy computed only at the loss positions.
//!
//! The model projects only the hidden states of the selected positions onto the vocabulary
//! (see [`crate::model::Llama::logits_at`]), so the (batch × seq × vocab) logits tensor is never
//! materialised; the log-softmax below runs on (loss tokens × vocab) only.

use candle_core::{D, Tensor};

use crate::Result;

pub mod fused_ce;
pub mod fused_kl;
pub mod linear_ce;

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

/// Mean Kullback-Leibler divergence `KL(softmax(reference) ‖ softmax(logits))` over the rows
/// of `logits` (n, vocab), against reference logits of the same shape (no gradient flows into
/// them). Its gradient with respect to `logits` is `(softmax(logits) − softmax(reference)) / n`.
/// On CPU with f32 logits this is one fused op with its own backward
/// ([`crate::loss::fused_kl`]); elsewhere it is built from primitives.
pub fn kl_to_reference(logits: &Tensor, reference_logits: &Tensor) -> Result<Tensor> {
    let reference_logits = &reference_logits.to_device(logits.device())?;
    if logits.device().is_cpu() && logits.dtype() == candle_core::DType::F32 {
        return Ok(crate::loss::fused_kl::fused_kl(logits, reference_logits)?);
    }
    reference_kl(logits, reference_logits)
}

/// The primitive-op formulation of [`kl_to_reference`] (any device), also the reference for the
/// fused op's tests.
pub fn reference_kl(logits: &Tensor, reference_logits: &Tensor) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    let log_p = candle_nn::ops::log_softmax(&reference_logits.detach(), D::Minus1)?;
    let log_q = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let per_row = (log_p.exp()? * (log_p - log_q)?)?.sum_all()?;
    Ok((per_row / n.max(1) as f64)?)
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
    fn kl_value_and_gradient_follow_the_definition_fused_and_primitive() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(&(Tensor::randn(0f32, 2.0, (5, 30), &dev).unwrap()))
            .unwrap();
        let r = Tensor::randn(0f32, 2.0, (5, 30), &dev).unwrap();
        // KL from the definition, row by row.
        let p = candle_nn::ops::softmax(&r, D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let q = candle_nn::ops::softmax(x.as_tensor(), D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let by_definition: f32 = p
            .iter()
            .zip(&q)
            .map(|(pr, qr)| {
                pr.iter()
                    .zip(qr)
                    .map(|(a, b)| a * (a / b).ln())
                    .sum::<f32>()
            })
            .sum::<f32>()
            / 5.0;
        let expected_grad = ((candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap()
            - candle_nn::ops::softmax(&r, D::Minus1).unwrap())
        .unwrap()
            / 5.0)
            .unwrap();
        for (what, kl) in [
            ("fused", kl_to_reference(x.as_tensor(), &r).unwrap()),
            ("primitive", reference_kl(x.as_tensor(), &r).unwrap()),
        ] {
            let value = kl.to_scalar::<f32>().unwrap();
            assert!(
                (value - by_definition).abs() < 1e-5,
                "{what}: {value} vs {by_definition}"
            );
            let g = kl.backward().unwrap().get(x.as_tensor()).unwrap().clone();
            let d = crate::test_util::max_abs_diff(&g, &expected_grad);
            assert!(d < 1e-6, "{what}: {d}");
        }
        // Against itself the divergence is zero.
        let same = kl_to_reference(&r, &r).unwrap().to_scalar::<f32>().unwrap();
        assert!(same.abs() < 1e-6, "{same}");
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
