//! The live map of a pool: address -> block, for every address handed out and not freed.
//!
//! Every allocation inserts into it and every free removes from it, so it sits on both fast
//! paths. An open-addressing table with linear probing, kept at most half full, and
//! backward-shift deletion (no tombstones, so a long run of allocations and frees never
//! degrades the probes): a lookup is a multiply and, almost always, one cache line. It
//! replaced a `HashMap`, whose insert and remove were a sixth of the cached alloc+free pair
//! (perf on `accelrt bench`, `BENCHMARKS.md`).
//!
//! Invariant: each entry lies at its
//! home slot or after it with no empty slot in between (cyclically), so a probe that reaches an
//! empty slot has seen every entry that could match.

/// Marks an empty slot. No block starts there: a block has a non-zero size.
const EMPTY: usize = usize::MAX;

/// The multiplier of the address hash (2^64 / the golden ratio).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The smallest table allocated (slots).
const MIN_SLOTS: usize = 16;

#[derive(Clone, Copy)]
struct Slot {
    addr: usize,
    block: u32,
}

const VACANT: Slot = Slot {
    addr: EMPTY,
    block: 0,
};

/// Live allocations of a pool: address -> block (see the module docs).
#[derive(Default)]
pub struct LiveBlocks {
    /// A power of two slots (or none before the first insert).
    slots: Vec<Slot>,
    len: usize,
    /// 64 - log2(slots.len()): the home slot is the top bits of the hash.
    shift: u32,
}

impl LiveBlocks {
    /// Entries in the map.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Make room for `additional` more entries without growing.
    pub fn reserve(&mut self, additional: usize) {
        let want = self.len.saturating_add(additional);
        if want.saturating_mul(2) > self.slots.len() {
            self.resize(want.saturating_mul(2).next_power_of_two().max(MIN_SLOTS));
        }
    }

    /// The home slot of `addr`. Addresses are 512-byte aligned: the low bits carry nothing.
    #[inline(always)]
    fn home(&self, addr: usize) -> usize {
        (((addr as u64) >> 9).wrapping_mul(GOLDEN) >> self.shift) as usize
    }

    #[inline(always)]
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The slot holding `addr`.
    #[inline(always)]
    fn find(&self, addr: usize) -> Option<usize> {
        if self.len == 0 || addr == EMPTY {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(addr);
        loop {
            let s = self.slots[i];
            if s.addr == addr {
                return Some(i);
            }
            if s.addr == EMPTY {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// The block at `addr`.
    #[inline]
    pub fn get(&self, addr: usize) -> Option<u32> {
        self.find(addr).map(|i| self.slots[i].block)
    }

    /// Map `addr` to `block`, replacing what it mapped to.
    #[inline]
    pub fn insert(&mut self, addr: usize, block: u32) {
        debug_assert_ne!(addr, EMPTY, "no block starts at the last address");
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.mask();
        let mut i = self.home(addr);
        loop {
            let s = &mut self.slots[i];
            if s.addr == addr {
                s.block = block;
                return;
            }
            if s.addr == EMPTY {
                *s = Slot { addr, block };
                self.len += 1;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Remove `addr`, returning its block.
    #[inline]
    pub fn remove(&mut self, addr: usize) -> Option<u32> {
        let mut hole = self.find(addr)?;
        let block = self.slots[hole].block;
        self.len -= 1;
        // Backward shift: move later entries of the probe run into the hole when their home
        // does not lie cyclically in (hole, j], so every entry stays reachable from its home.
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let s = self.slots[j];
            if s.addr == EMPTY {
                break;
            }
            let home = self.home(s.addr);
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.slots[hole] = s;
                hole = j;
            }
        }
        self.slots[hole] = VACANT;
        Some(block)
    }

    /// Every entry: (address, block), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.slots
            .iter()
            .filter(|s| s.addr != EMPTY)
            .map(|s| (s.addr, s.block))
    }

    #[cold]
    fn grow(&mut self) {
        self.resize((self.slots.len() * 2).max(MIN_SLOTS));
    }

    fn resize(&mut self, slots: usize) {
        let old = std::mem::replace(&mut self.slots, vec![VACANT; slots]);
        self.shift = 64 - slots.trailing_zeros();
        self.len = 0;
        for s in old.into_iter().filter(|s| s.addr != EMPTY) {
            self.insert(s.addr, s.block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splitmix::SplitMix64;
    use std::collections::HashMap;

    /// Random inserts, removals and lookups against `HashMap`, on addresses crowded into few
    /// home slots (long probe runs that wrap around the table's end, and removals inside
    /// them, are where a backward shift goes wrong).
    #[test]
    fn agrees_with_a_hash_map_under_random_churn() {
        for seed in 0..20 {
            let mut rng = SplitMix64(seed);
            let mut live = LiveBlocks::default();
            let mut model: HashMap<usize, u32> = HashMap::new();
            for step in 0..20_000u32 {
                let addr = 0x7f00_0000_0000 + (rng.next_u64() % 512) as usize * 512;
                match rng.next_u64() % 3 {
                    0 => {
                        live.insert(addr, step);
                        model.insert(addr, step);
                    }
                    1 => assert_eq!(live.remove(addr), model.remove(&addr), "seed {seed}"),
                    _ => assert_eq!(live.get(addr), model.get(&addr).copied(), "seed {seed}"),
                }
                assert_eq!(live.len(), model.len());
            }
            let mut all: Vec<_> = live.iter().collect();
            let mut expected: Vec<_> = model.into_iter().collect();
            all.sort_unstable();
            expected.sort_unstable();
            assert_eq!(all, expected, "seed {seed}");
        }
    }

    #[test]
    fn hostile_addresses_find_nothing() {
        let mut live = LiveBlocks::default();
        assert_eq!(live.get(EMPTY), None);
        assert_eq!(live.remove(0x1000), None);
        live.insert(0x1000, 7);
        assert_eq!(live.get(EMPTY), None);
        assert_eq!(live.remove(EMPTY), None);
        assert_eq!(live.remove(0x1001), None);
        assert_eq!(live.remove(0x1000), Some(7));
        assert_eq!(
            live.remove(0x1000),
            None,
            "a second removal is a double free"
        );
        assert_eq!(live.len(), 0);
    }
}
