//! The per-device random generator: Philox 4x32-10, the counter-based generator PyTorch's
//! CUDA and MPS generators use.
//!
//! A counter-based generator has no hidden state beyond `(seed, offset)`: any position of the
//! stream can be computed directly, which is what lets a device kernel (or a replayed graph)
//! reproduce the numbers of a given offset. Output `i` of the stream is lane `i % 4` of
//! `philox4x32_10(counter = (i / 4) as 128-bit little-endian words, key = seed)`.

use parking_lot::Mutex;

use crate::error::{DeviceError, DeviceResult};

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// PyTorch's default seed (`default_rng_seed_val`), so fresh generators agree with it.
pub const DEFAULT_SEED: u64 = 67_280_421_310_721;

/// Length of [`Generator::get_state`]: an 8-byte seed then an 8-byte offset, little-endian.
pub const STATE_LEN: usize = 16;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

#[inline(always)]
fn round(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(M0, ctr[0]);
    let (hi1, lo1) = mulhilo(M1, ctr[2]);
    [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0]
}

/// One Philox 4x32 block with 10 rounds (Random123's `philox4x32_10`).
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut ctr = counter;
    let mut key = key;
    for i in 0..10 {
        if i > 0 {
            // Key schedule: bump by the Weyl constants between rounds.
            key = [key[0].wrapping_add(W0), key[1].wrapping_add(W1)];
        }
        ctr = round(ctr, key);
    }
    ctr
}

#[derive(Debug, Clone, Copy)]
struct State {
    seed: u64,
    /// Number of 32-bit outputs consumed.
    offset: u64,
}

impl State {
    #[inline]
    fn key(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }
    #[inline]
    fn block(&self, index: u64) -> [u32; 4] {
        philox4x32_10([index as u32, (index >> 32) as u32, 0, 0], self.key())
    }
}

/// A seeded Philox 4x32-10 stream with an offset; thread-safe (interior mutex), so one
/// generator per device can be shared like PyTorch's default generators.
#[derive(Debug)]
pub struct Generator {
    state: Mutex<State>,
}

impl Default for Generator {
    fn default() -> Self {
        Self::new(DEFAULT_SEED)
    }
}

impl Generator {
    /// A generator at offset 0 of `seed`'s stream.
    pub fn new(seed: u64) -> Self {
        Generator {
            state: Mutex::new(State { seed, offset: 0 }),
        }
    }

    /// The current seed.
    pub fn seed(&self) -> u64 {
        self.state.lock().seed
    }

    /// Reseed; the offset goes back to 0 (as `manual_seed` does).
    pub fn set_seed(&self, seed: u64) {
        *self.state.lock() = State { seed, offset: 0 };
    }

    /// The number of 32-bit values drawn so far.
    pub fn offset(&self) -> u64 {
        self.state.lock().offset
    }

    /// Jump to another position of the current seed's stream.
    pub fn set_offset(&self, offset: u64) {
        self.state.lock().offset = offset;
    }

    /// `seed` then `offset`, little-endian: [`STATE_LEN`] bytes.
    pub fn get_state(&self) -> Vec<u8> {
        let s = *self.state.lock();
        let mut out = Vec::with_capacity(STATE_LEN);
        out.extend_from_slice(&s.seed.to_le_bytes());
        out.extend_from_slice(&s.offset.to_le_bytes());
        out
    }

    /// Restore a state from [`Generator::get_state`]; a slice of any other length is an error
    /// and leaves the generator unchanged.
    pub fn set_state(&self, state: &[u8]) -> DeviceResult<()> {
        let bytes: &[u8; STATE_LEN] = state.try_into().map_err(|_| {
            DeviceError::InvalidArgument(format!(
                "generator state must be {STATE_LEN} bytes (8-byte seed + 8-byte offset, \
                 little-endian, as get_state returns), got {} bytes",
                state.len()
            ))
        })?;
        let (seed, offset) = bytes.split_at(8);
        let seed = u64::from_le_bytes(seed.try_into().expect("8 bytes"));
        let offset = u64::from_le_bytes(offset.try_into().expect("8 bytes"));
        *self.state.lock() = State { seed, offset };
        Ok(())
    }

    /// The next 32-bit value; advances the offset by one.
    pub fn next_u32(&self) -> u32 {
        let mut s = self.state.lock();
        let v = s.block(s.offset / 4)[(s.offset % 4) as usize];
        s.offset = s.offset.wrapping_add(1);
        v
    }

    /// Fill `out` with the next `out.len()` values; advances the offset by `out.len()`.
    pub fn fill_u32(&self, out: &mut [u32]) {
        let mut s = self.state.lock();
        let mut pos = s.offset;
        let mut rest = out;
        while !rest.is_empty() {
            let block = s.block(pos / 4);
            let lane = (pos % 4) as usize;
            let n = (4 - lane).min(rest.len());
            let (head, tail) = rest.split_at_mut(n);
            head.copy_from_slice(&block[lane..lane + n]);
            rest = tail;
            pos = pos.wrapping_add(n as u64);
        }
        s.offset = pos;
    }

    /// A uniform value in `[0, 1)` with 24 random bits; advances the offset by one.
    pub fn next_f32(&self) -> f32 {
        (self.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_matches_next_u32_from_any_lane() {
        for start in 0..6u64 {
            let a = Generator::new(7);
            a.set_offset(start);
            let mut buf = [0u32; 11];
            a.fill_u32(&mut buf);
            let b = Generator::new(7);
            b.set_offset(start);
            let one_by_one: Vec<u32> = (0..11).map(|_| b.next_u32()).collect();
            assert_eq!(buf.to_vec(), one_by_one, "start offset {start}");
            assert_eq!(a.offset(), start + 11);
        }
    }
}
