//! The fuzzer's deterministic random numbers (SplitMix64): one seed, one sequence.

/// A SplitMix64 generator.
pub struct Rng(u64);

impl Rng {
    /// The generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 if `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One element of `items` (which must not be empty).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// A size between `low` and `high` bytes, spread evenly over the powers of two.
    pub fn size_between(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        let (a, b) = (
            64 - low.leading_zeros() as u64,
            64 - high.leading_zeros() as u64,
        );
        let bits = a + self.below(b - a + 1);
        let top = 1u64.checked_shl(bits as u32).unwrap_or(u64::MAX);
        (low + self.below(top)).min(high)
    }

    /// A value that is often interesting where a slot, flag or address is expected: small
    /// numbers, boundaries, or any 64 bits.
    pub fn garbage(&mut self) -> u64 {
        let r = self.next();
        match r % 6 {
            0 => r >> 56,
            1 => [
                0,
                1,
                u64::MAX,
                u64::MAX - 1,
                1 << 47,
                0xffff_8000_0000_0000,
                512,
                511,
            ][(r >> 8) as usize % 8],
            2 => (r >> 20) << 12,
            3 => 128 + (r >> 40) % 384,
            _ => r,
        }
    }
}
