//! A small, seedable, serialisable random number generator (SplitMix64).
//!
//! Training needs reproducible randomness whose state can be written into a checkpoint and
//! restored exactly; a single `u64` state does that.

use serde::{Deserialize, Serialize};

/// SplitMix64's increment (2⁶⁴ / φ).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The top 24 of 64 random bits as a uniform value in `[0, 1)`.
fn unit_f32(bits: u64) -> f32 {
    ((bits >> 40) as f32) / ((1u64 << 24) as f32)
}

/// SplitMix64 generator; the whole state is one `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    /// Internal state; serialise it to resume the exact stream.
    pub state: u64,
}

impl Rng {
    /// Creates a generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed ^ GOLDEN,
        }
    }

    /// Derives an independent generator for a purpose (e.g. one epoch's shuffle).
    pub fn derive(seed: u64, stream: u64) -> Self {
        let mut r = Self::new(seed);
        r.state ^= stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        r.next_u64();
        r
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Advances the stream by `n` values, as `n` calls of [`Rng::next_u64`] would.
    pub fn skip(&mut self, n: u64) {
        self.state = self.state.wrapping_add(n.wrapping_mul(GOLDEN));
    }

    /// The `index`-th value (from 0) [`Rng::next_f32`] would return from this state, without
    /// advancing it: SplitMix64 is a function of a counter, so a stream's values can be drawn in
    /// any order and in parallel (the CPU dropout masks).
    pub fn f32_at(&self, index: u64) -> f32 {
        unit_f32(mix(self
            .state
            .wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN))))
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        unit_f32(self.next_u64())
    }

    /// Uniform in `[0, n)`; `n` must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % (n.max(1) as u64)) as usize
    }

    /// Standard normal sample (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.next_f32().max(1e-7);
        let u2 = self.next_f32();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn values_at_an_index_are_the_stream_in_order() {
        let start = Rng::new(11);
        let mut stream = start;
        for i in 0..1000 {
            assert_eq!(start.f32_at(i), stream.next_f32(), "value {i}");
        }
        let mut skipped = start;
        skipped.skip(1000);
        assert_eq!(skipped, stream);
    }

    #[test]
    fn same_seed_same_stream_and_state_resumes() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..10 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let saved = a;
        let x = a.next_u64();
        let mut c = saved;
        assert_eq!(c.next_u64(), x);
        assert_ne!(Rng::new(8).next_u64(), Rng::new(7).next_u64());
        let f = Rng::new(1).next_f32();
        assert!((0.0..1.0).contains(&f));
    }
}
