//! SplitMix64 (Steele, Lea, Flood 2014): the one small, fast, deterministic generator the
//! workspace's benches, fuzz targets and tests draw from. Not part of the allocator's API.

/// The generator's state; `SplitMix64(seed)` starts a sequence.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// In `0..n` (`n > 0`) by the remainder (the fuzz targets' recorded inputs rely on it).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// In `0..n` (`n > 0`) by the multiply-high method (no remainder bias).
    #[inline]
    pub fn below_scaled(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_known_and_in_range() {
        assert_eq!(SplitMix64(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        let (mut a, mut b) = (SplitMix64(42), SplitMix64(42));
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            let (x, y) = (a.below(7), a.below_scaled(7));
            assert_eq!((x, y), (b.below(7), b.below_scaled(7)));
            assert!(x < 7 && y < 7);
        }
    }
}
