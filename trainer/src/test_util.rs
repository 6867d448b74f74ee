//! Helpers of the library's own unit tests (the integration tests have theirs in
//! `tests/common`, which cannot see `cfg(test)` items).
#![allow(clippy::unwrap_used)]

use candle_core::Tensor;

/// max |a − b| over all elements, as f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
