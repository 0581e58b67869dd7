//! Page tables of expandable segments: which chunk backs each page-sized slot of a segment's
//! address range ([`NO_CHUNK`], [`LENT`], or a chunk index). A record of the pool's, like the
//! blocks and segments of `block.rs`; what the pool does with them is `vm.rs`'s.

/// No chunk at this slot.
pub const NO_CHUNK: u32 = u32::MAX;
/// The old mapping of a chunk that moved away, waiting to be unmapped.
pub const LENT: u32 = u32::MAX - 1;

/// Which chunk backs each page-sized slot of an expandable segment.
///
/// Memory grows with the highest slot ever mapped, not with the range: `slots` and `bits`
/// cover `[0, slots.len())` and every slot past them holds [`NO_CHUNK`] (a range reserved
/// for twice the device costs nothing until it is used).
#[derive(Debug, Clone)]
pub struct PageTable {
    pub page_size: u64,
    /// Slots in the range.
    len: usize,
    slots: Vec<u32>,
    /// Slots holding a chunk.
    pub mapped: u64,
    /// Slots holding [`LENT`].
    pub lent_slots: u64,
    /// One bit per slot, set while it holds a chunk: scans skip empty words.
    bits: Vec<u64>,
    /// Slots at or above this never held anything (ranges fill from the bottom).
    high_water: usize,
}

impl PageTable {
    pub(super) fn new(page_size: u64, slots: usize) -> Self {
        PageTable {
            page_size,
            len: slots,
            slots: Vec::new(),
            mapped: 0,
            lent_slots: 0,
            bits: Vec::new(),
            high_water: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Slots below this may hold something; every slot from here to [`len`](Self::len)
    /// holds [`NO_CHUNK`]. Scans over a whole table stop here.
    pub fn stored(&self) -> usize {
        self.slots.len().min(self.len)
    }

    /// What slot `slot` holds.
    pub fn get(&self, slot: usize) -> u32 {
        debug_assert!(slot < self.len, "slot {slot} of {}", self.len);
        self.slots.get(slot).copied().unwrap_or(NO_CHUNK)
    }

    pub(super) fn set(&mut self, slot: usize, chunk: u32) {
        assert!(
            slot < self.len,
            "slot {slot} is past the range's {}",
            self.len
        );
        if slot >= self.slots.len() {
            // Grow geometrically (a slow path: a chunk is being mapped).
            let n = (slot + 1).next_power_of_two().clamp(64, self.len.max(64));
            self.slots.resize(n, NO_CHUNK);
            self.bits.resize(n.div_ceil(64), 0);
        }
        debug_assert_eq!(self.slots[slot], NO_CHUNK, "slot {slot} mapped twice");
        self.slots[slot] = chunk;
        self.bits[slot / 64] |= 1 << (slot % 64);
        self.high_water = self.high_water.max(slot + 1);
        self.mapped += 1;
    }

    /// Slot `slot` (holding a chunk) becomes lent: still mapped, no longer this chunk's home.
    pub(super) fn lend(&mut self, slot: usize) {
        debug_assert!(self.slots[slot] < LENT, "slot {slot} lent without a chunk");
        self.slots[slot] = LENT;
        self.bits[slot / 64] &= !(1 << (slot % 64));
        self.mapped -= 1;
        self.lent_slots += 1;
    }

    /// A lent slot was unmapped.
    pub(super) fn unlend(&mut self, slot: usize) {
        debug_assert_eq!(self.slots[slot], LENT, "slot {slot} is not lent");
        self.slots[slot] = NO_CHUNK;
        self.lent_slots -= 1;
    }

    /// A slot holding a chunk is unmapped.
    pub(super) fn clear(&mut self, slot: usize) {
        debug_assert!(
            self.slots[slot] < LENT,
            "slot {slot} cleared without a chunk"
        );
        self.slots[slot] = NO_CHUNK;
        self.bits[slot / 64] &= !(1 << (slot % 64));
        self.mapped -= 1;
    }

    /// Slots holding a chunk in `[start, end)`, in order.
    pub fn mapped_in(&self, start: usize, end: usize) -> impl Iterator<Item = usize> + '_ {
        let end = end.min(self.high_water);
        let mut word = start / 64;
        let mut bits = if start < end {
            self.bits[word] & (!0u64 << (start % 64))
        } else {
            0
        };
        std::iter::from_fn(move || loop {
            if bits != 0 {
                let slot = word * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                return (slot < end).then_some(slot);
            }
            word += 1;
            if word * 64 >= end {
                return None;
            }
            bits = self.bits[word];
        })
    }

    /// Whether every slot in `[start, end)` holds a chunk.
    pub fn all_mapped(&self, start: usize, end: usize) -> bool {
        if end > self.high_water {
            return false;
        }
        let mut slot = start;
        while slot < end {
            let (w, b) = (slot / 64, slot % 64);
            let n = (64 - b).min(end - slot);
            let mask = if n == 64 { !0 } else { ((1u64 << n) - 1) << b };
            if self.bits[w] & mask != mask {
                return false;
            }
            slot += n;
        }
        true
    }
}
