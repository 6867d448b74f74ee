//! Vectorised f32 kernels for the CPU ops that own their loops (the fused LM head and loss, the
//! attention softmax, the MLP's gated product): a row's maximum, its shifted exponentials and
//! their sum, a dot product, SiLU-gated products and their gradients.
//!
//! A plain `fold(f32::max)` or `sum()` is one dependency chain the compiler must keep in order,
//! and `f32::exp` is a libm call per element, so such loops run one element at a time. These
//! kernels keep [`LANES`] independent partial results and compute `exp` from arithmetic alone
//! ([`exp`]), so the loops vectorise; [`pulp::Arch::dispatch`] compiles them once more for the
//! machine's widest instruction set (AVX2 + FMA on x86-64) and picks that version at run time,
//! without `unsafe` here. Results differ from the scalar loops only by rounding (a different
//! summation order; `exp` within 2 ulp of libm's, tested).

use candle_core::{CpuStorage, Layout, Storage};

/// The f32 values of a contiguous CPU storage; `op` names the caller in the error.
pub fn cpu_f32_values<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        candle_core::bail!("{op}: contiguous f32 values expected")
    };
    Ok(&data[start..end])
}

/// The f32 values of a contiguous tensor's storage (held through `Tensor::storage_and_layout`),
/// which must be on the CPU; `op` names the caller in the error.
pub fn storage_f32_values<'a>(
    op: &str,
    storage: &'a Storage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let Storage::Cpu(storage) = storage else {
        candle_core::bail!("{op}: a CPU tensor expected")
    };
    cpu_f32_values(op, storage, layout)
}

/// The f32 values of a contiguous CPU storage, to write in place (an in-place op's own tensor);
/// `op` names the caller in the error.
pub fn cpu_f32_values_mut<'a>(
    op: &str,
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        candle_core::bail!("{op}: contiguous f32 values expected")
    };
    Ok(&mut data[start..end])
}

/// Independent accumulators per reduction: 16 f32 lanes, one AVX-512 or two AVX2 registers.
const LANES: usize = 16;

/// Below this `exp` underflows to 0 in f32 (`ln` of the least positive normal, −87.34); the
/// kernel returns exactly 0 there, as for `-inf` (a masked key).
const EXP_UNDERFLOW: f32 = -87.336_55;

/// Above this `exp` overflows f32 (`ln(f32::MAX)`); the kernel returns `inf` there.
const EXP_OVERFLOW: f32 = 88.722_83;

/// `e^x` from arithmetic only (no libm call, no float-to-int conversion), so loops over it
/// vectorise. Cody–Waite reduction `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, Cephes' minimax
/// polynomial for `e^r`, and `2^n` built in the exponent bits. NaN stays NaN; below
/// [`EXP_UNDERFLOW`] the result is 0, above [`EXP_OVERFLOW`] it is `inf`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding 1.5 · 2^23 rounds to an integer, which then sits in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(EXP_UNDERFLOW, EXP_OVERFLOW);
    let shifted = xc * std::f32::consts::LOG2_E + SHIFTER;
    let k = shifted.to_bits() as i32 - SHIFTER.to_bits() as i32;
    let n = shifted - SHIFTER;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // e^r on [−ln2/2, ln2/2] as 1 + r + r²·P(r), P the minimax polynomial of Cephes' `expf`.
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    // 2^k for k in [−126, 128], in two halves so both ends stay representable.
    let half = k >> 1;
    let two_to = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = p * two_to(half) * two_to(k - half);
    let y = if x > EXP_OVERFLOW { f32::INFINITY } else { y };
    // A NaN input has made `y` NaN through the polynomial.
    if x < EXP_UNDERFLOW { 0.0 } else { y }
}

/// Runs a kernel compiled for the machine's widest SIMD instruction set. The kernel's body must
/// be `#[inline(always)]` so that it is compiled inside the target-feature function `pulp`
/// dispatches to (a closure would be called, not inlined, and stay at the baseline SSE2).
fn dispatch<K: Kernel>(kernel: K) -> K::Output {
    pulp::Arch::new().dispatch(Dispatched(kernel))
}

/// A row kernel: plain loops the compiler vectorises.
trait Kernel {
    type Output;
    fn run(self) -> Self::Output;
}

struct Dispatched<K>(K);

impl<K: Kernel> pulp::WithSimd for Dispatched<K> {
    type Output = K::Output;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> K::Output {
        self.0.run()
    }
}

/// The largest element of `row` (`-inf` for an empty row; NaN elements are skipped, as
/// `f32::max` skips them).
pub fn max(row: &[f32]) -> f32 {
    dispatch(Max(row))
}

struct Max<'a>(&'a [f32]);

impl Kernel for Max<'_> {
    type Output = f32;

    #[inline(always)]
    fn run(self) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = self.0.chunks_exact(LANES);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a = a.max(v);
            }
        }
        let lanes = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        tail.iter().copied().fold(lanes, f32::max)
    }
}

/// `row ← e^(row − shift)`, in place; returns the sum of the new values.
pub fn exp_shifted_in_place(row: &mut [f32], shift: f32) -> f32 {
    dispatch(ExpShiftedInPlace(row, shift))
}

struct ExpShiftedInPlace<'a>(&'a mut [f32], f32);

impl Kernel for ExpShiftedInPlace<'_> {
    type Output = f32;

    #[inline(always)]
    fn run(self) -> f32 {
        let Self(row, shift) = self;
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (a, v) in acc.iter_mut().zip(chunk.iter_mut()) {
                *v = exp(*v - shift);
                *a += *v;
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp(*v - shift);
            sum += *v;
        }
        sum
    }
}

/// `Σ e^(x − shift)` over `x` (the exponentials are not kept).
pub fn exp_shifted_sum(x: &[f32], shift: f32) -> f32 {
    dispatch(ExpShiftedSum(x, shift))
}

struct ExpShiftedSum<'a>(&'a [f32], f32);

impl Kernel for ExpShiftedSum<'_> {
    type Output = f32;

    #[inline(always)]
    fn run(self) -> f32 {
        let Self(x, shift) = self;
        let mut acc = [0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a += exp(v - shift);
            }
        }
        // The same summation order as `exp_shifted_in_place`, so the two sums are equal.
        let mut sum: f32 = acc.iter().sum();
        for &v in tail {
            sum += exp(v - shift);
        }
        sum
    }
}

/// `Σ a_i · b_i` over two rows of the same length.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    dispatch(Dot(a, b))
}

struct Dot<'a>(&'a [f32], &'a [f32]);

impl Kernel for Dot<'_> {
    type Output = f32;

    #[inline(always)]
    fn run(self) -> f32 {
        let Self(a, b) = self;
        let mut acc = [0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let tail: f32 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in ca.zip(cb) {
            for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
                *s += x * y;
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

/// `row ← row · factor`, in place.
pub fn scale(row: &mut [f32], factor: f32) {
    dispatch(Scale(row, factor));
}

struct Scale<'a>(&'a mut [f32], f32);

impl Kernel for Scale<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let Self(row, factor) = self;
        row.iter_mut().for_each(|v| *v *= factor);
    }
}

/// `out ← silu(gate) ⊙ up` elementwise, `silu(g) = g / (1 + e^−g)`; all four the same length.
pub fn silu_product(gate: &[f32], up: &[f32], out: &mut [f32]) {
    debug_assert!(gate.len() == up.len() && up.len() == out.len());
    dispatch(SiluProduct { gate, up, out });
}

struct SiluProduct<'a> {
    gate: &'a [f32],
    up: &'a [f32],
    out: &'a mut [f32],
}

impl Kernel for SiluProduct<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for ((o, &g), &u) in self.out.iter_mut().zip(self.gate).zip(self.up) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
}

/// The gradients of `silu(gate) ⊙ up` for the upstream gradient `grad`: with `σ = 1/(1+e^−g)`,
/// `d_gate = grad ⊙ up ⊙ σ(1 + g(1 − σ))` and `d_up = grad ⊙ g σ`. All slices the same length.
pub fn silu_product_grad(
    gate: &[f32],
    up: &[f32],
    grad: &[f32],
    d_gate: &mut [f32],
    d_up: &mut [f32],
) {
    debug_assert!(gate.len() == up.len() && up.len() == grad.len());
    debug_assert!(grad.len() == d_gate.len() && d_gate.len() == d_up.len());
    dispatch(SiluProductGrad {
        gate,
        up,
        grad,
        d_gate,
        d_up,
    });
}

struct SiluProductGrad<'a> {
    gate: &'a [f32],
    up: &'a [f32],
    grad: &'a [f32],
    d_gate: &'a mut [f32],
    d_up: &'a mut [f32],
}

impl Kernel for SiluProductGrad<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let outs = self.d_gate.iter_mut().zip(self.d_up.iter_mut());
        let ins = self.gate.iter().zip(self.up).zip(self.grad);
        for ((dg, du), ((&g, &u), &d)) in outs.zip(ins) {
            let sigma = 1.0 / (1.0 + exp(-g));
            *du = d * g * sigma;
            *dg = d * u * sigma * (1.0 + g * (1.0 - sigma));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_over_the_whole_range() {
        let mut worst = (0u32, 0f32);
        let mut x = -87.0f32;
        while x < 88.5 {
            let u = ulps(exp(x), x.exp());
            if u > worst.0 {
                worst = (u, x);
            }
            x += 0.000_731;
        }
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn exp_handles_the_edges_as_libm_does() {
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
        assert!(ulps(exp(EXP_OVERFLOW - 0.01), (EXP_OVERFLOW - 0.01).exp()) <= 2);
        assert!(ulps(exp(-87.0), (-87.0f32).exp()) <= 2);
    }

    fn row(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 100.0) - 5.0)
            .collect()
    }

    #[test]
    fn reductions_equal_the_scalar_loops_on_every_tail_length() {
        for n in [0usize, 1, 5, 15, 16, 17, 33, 100, 1027] {
            let (x, y) = (row(n), row(n + 3)[3..].to_vec());
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), m, "max, n = {n}");
            let shift = if n == 0 { 0.0 } else { m };
            let want: f32 = x.iter().map(|v| (v - shift).exp()).sum();
            let mut out = x.clone();
            let got = exp_shifted_in_place(&mut out, shift);
            assert!((got - want).abs() <= 1e-6 * want.max(1.0), "n = {n}");
            assert_eq!(exp_shifted_sum(&x, shift), got, "n = {n}");
            for (o, v) in out.iter().zip(&x) {
                assert!(ulps(*o, (v - shift).exp()) <= 2);
            }
            let want_dot: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
            assert!((dot(&x, &y) - want_dot).abs() <= 1e-4 * want_dot.abs().max(1.0));
            let mut s = x.clone();
            scale(&mut s, 0.5);
            assert!(s.iter().zip(&x).all(|(s, x)| *s == x * 0.5));
        }
    }

    #[test]
    fn silu_product_and_its_gradients_equal_the_closed_forms() {
        let g = row(37);
        let u: Vec<f32> = row(40)[3..].to_vec();
        let d: Vec<f32> = g.iter().map(|v| v * 0.3 - 0.2).collect();
        let mut out = vec![0f32; 37];
        silu_product(&g, &u, &mut out);
        let (mut dg, mut du) = (vec![0f32; 37], vec![0f32; 37]);
        silu_product_grad(&g, &u, &d, &mut dg, &mut du);
        for i in 0..37 {
            let (g, u, d) = (f64::from(g[i]), f64::from(u[i]), f64::from(d[i]));
            let sigma = 1.0 / (1.0 + (-g).exp());
            let close = |a: f32, b: f64| (f64::from(a) - b).abs() <= 1e-6 * b.abs().max(1.0);
            assert!(close(out[i], g * sigma * u), "value at {i}");
            assert!(close(du[i], d * g * sigma), "d_up at {i}");
            assert!(
                close(dg[i], d * u * sigma * (1.0 + g * (1.0 - sigma))),
                "d_gate at {i}"
            );
        }
    }

    #[test]
    fn max_skips_nan_and_masked_rows_give_zero_exponentials() {
        assert_eq!(max(&[f32::NAN, 1.0, -2.0]), 1.0);
        let masked = [0.0, f32::NEG_INFINITY, f32::NEG_INFINITY];
        let mut out = masked;
        assert_eq!(exp_shifted_in_place(&mut out, 0.0), 1.0);
        assert_eq!(out, [1.0, 0.0, 0.0]);
    }
}
