//! The state of one stream's pool: blocks, segments, free indexes and statistics.
//!
//! All of it lives behind the pool's own mutex, so streams never contend with each other.
//!
//! Invariants (checked by `check.rs`):
//! - the blocks of a segment tile it exactly, linked by `prev` / `next` in address order;
//! - two `Free` blocks are never address neighbours: frees coalesce;
//! - a block is on a free list iff its state is `Free`, in the index of its pool kind;
//! - a block is in a recent-free slot iff its state is `Recent` (small pool only). Recent
//!   blocks are cached but not yet coalesced: reusing one for the same size skips the free
//!   index, the split and the merge. Slots are flushed (coalesced) before the pool grows or gives memory back,
//!   so they never cause a new segment;
//! - per kind: `reserved_bytes == sum(segment sizes)`,
//!   `reserved_bytes == allocated_bytes + pending bytes + free bytes`,
//!   `active == allocation + pending`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::size::{pool_kind, should_split};
use super::stats::{PoolKind, PoolStats};
use super::tlsf::Tlsf;
use super::AllocatorConfig;
use crate::stream::Stream;

/// "No block".
pub const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Cached and on a free list.
    Free,
    /// Cached in a recent-free slot, not coalesced.
    Recent,
    /// Handed out to a caller.
    Allocated,
    /// Freed by the caller, waiting for other streams' events before reuse.
    Pending,
    /// An unused slot of the block table.
    Vacant,
}

#[derive(Debug, Clone)]
pub struct Block {
    pub addr: usize,
    pub size: u64,
    /// Bytes the caller asked for (0 when free).
    pub requested: u64,
    /// Address neighbours within the segment.
    pub prev: u32,
    pub next: u32,
    /// Free-list links (valid while `Free`).
    pub free_prev: u32,
    pub free_next: u32,
    /// Free-index class while `Free` (cached so removal need not recompute it).
    pub class: u16,
    pub state: BlockState,
    pub kind: PoolKind,
    /// Pool tick of the last free: garbage collection releases the oldest first.
    pub last_used: u64,
    /// Unique buffer id while allocated.
    pub id: u64,
    /// Whether `record_stream` or `record_events` attached anything to this block.
    pub has_extras: bool,
}

impl Block {
    fn vacant() -> Block {
        Block {
            addr: 0,
            size: 0,
            requested: 0,
            prev: NIL,
            next: NIL,
            free_prev: NIL,
            free_next: NIL,
            class: 0,
            state: BlockState::Vacant,
            kind: PoolKind::Small,
            last_used: 0,
            id: 0,
            has_extras: false,
        }
    }
    /// A piece of a segment that has other pieces.
    #[inline(always)]
    pub fn is_split(&self) -> bool {
        self.prev != NIL || self.next != NIL
    }
}

/// A segment taken from the device. Its first block's index never changes: merges keep the
/// lower block and splits keep the lower part in place.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub base: usize,
    pub size: u64,
    pub head: u32,
    pub kind: PoolKind,
}

/// A freed block whose reuse waits for events on other streams.
pub struct PendingFree {
    pub block: u32,
    pub tickets: Vec<u64>,
}

/// Cross-stream extras of a block (rare; kept out of `Block`).
#[derive(Default)]
pub struct Extras {
    /// Streams other than the owner that used the block (`record_stream`).
    pub stream_uses: Vec<Stream>,
    /// Events from `record_events`, waited on by `wait_for_events`.
    pub events: Vec<u64>,
}

/// Hash for 512-byte-aligned addresses: drop the zero bits, then mix with a multiply.
#[derive(Default)]
pub struct PtrHasher(u64);

impl Hasher for PtrHasher {
    #[inline(always)]
    fn finish(&self) -> u64 {
        // hashbrown takes the bucket from the low bits and the tag from the top 7: a product
        // of 2 MiB-aligned addresses has zero low bits, so fold the well-mixed high half down.
        self.0 ^ (self.0 >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    #[inline(always)]
    fn write_usize(&mut self, n: usize) {
        self.0 = ((n as u64) >> 9).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Live allocations of a pool: address -> block.
pub type LiveBlocks = HashMap<usize, u32, BuildHasherDefault<PtrHasher>>;

/// Blocks larger than this coalesce at once instead of waiting in a recent slot: deferring
/// the merge of large blocks lets same-size reuse eat into space a later, larger request
/// needed (measured: ResNet-50 trace 1.037 -> 1.052 reserved/allocated with 10 MiB here).
pub const RECENT_MAX_SIZE: u64 = super::size::SMALL_REQUEST;

/// Recent-free slots per pool (direct-mapped by block size).
pub const RECENT_SLOTS: usize = 32;

#[inline(always)]
fn recent_slot(size: u64) -> usize {
    ((size >> 9).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - RECENT_SLOTS.trailing_zeros()))
        as usize
}

pub struct PoolState {
    /// Live allocations: address -> block index.
    pub live: LiveBlocks,
    pub blocks: Vec<Block>,
    vacant: Vec<u32>,
    pub free_index: [Tlsf; 2],
    pub stats: [PoolStats; 2],
    pub segments: Vec<Segment>,
    pub pending: Vec<PendingFree>,
    pub extras: std::collections::HashMap<u32, Extras>,
    pub tick: u64,
    pub next_id: u64,
    /// Recently freed blocks, not coalesced (`NIL` = empty slot).
    pub recent: [u32; RECENT_SLOTS],
    /// Context recorded at allocation, for snapshots (only while history records context).
    pub frames: HashMap<u32, super::Frames>,
}

impl Default for PoolState {
    fn default() -> Self {
        PoolState {
            live: LiveBlocks::default(),
            blocks: Vec::new(),
            vacant: Vec::new(),
            free_index: Default::default(),
            stats: Default::default(),
            segments: Vec::new(),
            pending: Vec::new(),
            extras: Default::default(),
            tick: 0,
            next_id: 0,
            recent: [NIL; RECENT_SLOTS],
            frames: HashMap::new(),
        }
    }
}

impl PoolState {
    pub fn new() -> Self {
        let mut s = PoolState::default();
        s.blocks.reserve(256);
        s.live.reserve(256);
        s
    }

    fn new_block(&mut self, block: Block) -> u32 {
        if let Some(idx) = self.vacant.pop() {
            self.blocks[idx as usize] = block;
            idx
        } else {
            let idx = self.blocks.len();
            assert!(idx < NIL as usize, "more than 4 billion blocks in one pool");
            self.blocks.push(block);
            idx as u32
        }
    }

    fn retire_block(&mut self, idx: u32) {
        let b = &mut self.blocks[idx as usize];
        b.state = BlockState::Vacant;
        b.prev = NIL;
        b.next = NIL;
        self.vacant.push(idx);
    }

    #[inline(always)]
    fn stats_of(&mut self, kind: PoolKind) -> &mut PoolStats {
        &mut self.stats[kind as usize]
    }

    /// Count a cached piece of a split segment in the inactive-split figures.
    #[inline(always)]
    fn inactive_add(&mut self, idx: u32) {
        let b = &self.blocks[idx as usize];
        if b.is_split() {
            let (kind, size) = (b.kind, b.size);
            let s = self.stats_of(kind);
            s.inactive_split.increase(1);
            s.inactive_split_bytes.increase(size);
        }
    }

    #[inline(always)]
    fn inactive_remove(&mut self, idx: u32) {
        let b = &self.blocks[idx as usize];
        if b.is_split() {
            let (kind, size) = (b.kind, b.size);
            let s = self.stats_of(kind);
            s.inactive_split.decrease(1);
            s.inactive_split_bytes.decrease(size);
        }
    }

    /// Put a free block on its free list.
    #[inline(always)]
    fn add_free(&mut self, idx: u32) {
        self.inactive_add(idx);
        let kind = self.blocks[idx as usize].kind;
        self.blocks[idx as usize].state = BlockState::Free;
        self.free_index[kind as usize].insert(&mut self.blocks, idx);
    }

    #[inline(always)]
    fn remove_free(&mut self, idx: u32) {
        self.inactive_remove(idx);
        let kind = self.blocks[idx as usize].kind;
        self.free_index[kind as usize].remove(&mut self.blocks, idx);
    }

    /// Take a cached block for a request of `rounded` bytes (`requested` asked), splitting
    /// it if worthwhile. Returns the block index or `NIL`.
    #[inline]
    pub fn take_cached(&mut self, rounded: u64, requested: u64, config: &AllocatorConfig) -> u32 {
        let slot = recent_slot(rounded);
        let recent = self.recent[slot];
        if recent != NIL && self.blocks[recent as usize].size == rounded {
            self.recent[slot] = NIL;
            self.inactive_remove(recent);
            self.carve(recent, rounded, requested, config);
            return recent;
        }
        self.take_from_index(rounded, requested, config)
    }

    #[inline]
    fn take_from_index(&mut self, rounded: u64, requested: u64, config: &AllocatorConfig) -> u32 {
        let kind = pool_kind(rounded);
        let idx = match config.max_split_size {
            None => self.free_index[kind as usize].find(&self.blocks, rounded, |_| true),
            Some(max_split) => {
                let tolerance = config.max_non_split_rounding;
                self.free_index[kind as usize].find(&self.blocks, rounded, |b| {
                    if rounded < max_split {
                        b.size < max_split
                    } else {
                        b.size <= rounded.saturating_add(tolerance)
                    }
                })
            }
        };
        if idx == NIL {
            return NIL;
        }
        self.remove_free(idx);
        self.carve(idx, rounded, requested, config);
        idx
    }

    /// Hand out block `idx` (already off the free lists) for `rounded` bytes, splitting off
    /// the remainder when worthwhile.
    #[inline]
    fn carve(&mut self, idx: u32, rounded: u64, requested: u64, config: &AllocatorConfig) {
        let (kind, size) = {
            let b = &self.blocks[idx as usize];
            (b.kind, b.size)
        };
        if should_split(kind, size, rounded, config) {
            self.split(idx, rounded);
        }
        self.tick += 1;
        self.next_id += 1;
        let (id, tick) = (self.next_id, self.tick);
        let b = &mut self.blocks[idx as usize];
        b.state = BlockState::Allocated;
        b.requested = requested;
        b.id = id;
        b.last_used = tick;
        let (size, addr) = (b.size, b.addr);
        self.live.insert(addr, idx);
        let s = self.stats_of(kind);
        s.allocation.increase(1);
        s.allocated_bytes.increase(size);
        s.requested_bytes.increase(requested);
        s.active.increase(1);
        s.active_bytes.increase(size);
    }

    #[cold]
    fn split(&mut self, idx: u32, first_size: u64) {
        let (addr, size, next, kind) = {
            let b = &self.blocks[idx as usize];
            (b.addr, b.size, b.next, b.kind)
        };
        let rest = self.new_block(Block {
            addr: addr + first_size as usize,
            size: size - first_size,
            prev: idx,
            next,
            kind,
            ..Block::vacant()
        });
        if next != NIL {
            self.blocks[next as usize].prev = rest;
        }
        let b = &mut self.blocks[idx as usize];
        b.size = first_size;
        b.next = rest;
        self.add_free(rest);
    }

    /// Undo the allocation statistics of block `idx`; it stays active.
    #[inline]
    pub fn account_free(&mut self, idx: u32) {
        let b = &self.blocks[idx as usize];
        let (kind, size, requested) = (b.kind, b.size, b.requested);
        let s = self.stats_of(kind);
        s.allocation.decrease(1);
        s.allocated_bytes.decrease(size);
        s.requested_bytes.decrease(requested);
    }

    /// Return block `idx` (allocated or pending, already accounted by `account_free`) to the
    /// cache. Small blocks go to their recent-free slot (coalescing what the slot held);
    /// large ones coalesce at once (see [`RECENT_MAX_SIZE`]).
    #[inline]
    pub fn release_to_cache(&mut self, idx: u32) {
        self.tick += 1;
        let tick = self.tick;
        let (kind, size) = {
            let b = &mut self.blocks[idx as usize];
            b.requested = 0;
            b.id = 0;
            b.last_used = tick;
            b.state = BlockState::Recent;
            (b.kind, b.size)
        };
        let s = self.stats_of(kind);
        s.active.decrease(1);
        s.active_bytes.decrease(size);
        if size > RECENT_MAX_SIZE {
            self.coalesce(idx);
            return;
        }
        self.inactive_add(idx);
        let evicted = std::mem::replace(&mut self.recent[recent_slot(size)], idx);
        if evicted != NIL {
            self.inactive_remove(evicted);
            self.coalesce(evicted);
        }
    }

    /// Coalesce every recent-free block into the free index.
    #[cold]
    pub fn flush_recent(&mut self) {
        for slot in 0..RECENT_SLOTS {
            let idx = std::mem::replace(&mut self.recent[slot], NIL);
            if idx != NIL {
                self.inactive_remove(idx);
                self.coalesce(idx);
            }
        }
    }

    /// Merge cached block `idx` (on no list) with its free neighbours and index the result.
    fn coalesce(&mut self, idx: u32) {
        let next = self.blocks[idx as usize].next;
        if next != NIL && self.blocks[next as usize].state == BlockState::Free {
            self.remove_free(next);
            self.merge_into_prev(idx, next);
        }
        let prev = self.blocks[idx as usize].prev;
        let idx = if prev != NIL && self.blocks[prev as usize].state == BlockState::Free {
            self.remove_free(prev);
            let last_used = self.blocks[idx as usize].last_used;
            self.merge_into_prev(prev, idx);
            self.blocks[prev as usize].last_used = last_used;
            prev
        } else {
            idx
        };
        self.add_free(idx);
    }

    /// Absorb block `second` into its lower neighbour `first`.
    #[inline]
    fn merge_into_prev(&mut self, first: u32, second: u32) {
        let (size, next) = {
            let b = &self.blocks[second as usize];
            (b.size, b.next)
        };
        if next != NIL {
            self.blocks[next as usize].prev = first;
        }
        let f = &mut self.blocks[first as usize];
        f.size += size;
        f.next = next;
        self.retire_block(second);
    }

    /// Register a new segment and carve a block of `rounded` bytes from it.
    pub fn add_segment(
        &mut self,
        base: usize,
        seg_size: u64,
        rounded: u64,
        requested: u64,
        config: &AllocatorConfig,
    ) -> u32 {
        let kind = pool_kind(rounded);
        let idx = self.new_block(Block {
            addr: base,
            size: seg_size,
            kind,
            ..Block::vacant()
        });
        self.segments.push(Segment {
            base,
            size: seg_size,
            head: idx,
            kind,
        });
        let s = self.stats_of(kind);
        s.segment.increase(1);
        s.reserved_bytes.increase(seg_size);
        self.carve(idx, rounded, requested, config);
        idx
    }

    /// Whole free segments, as (last_used, segment position).
    pub fn releasable(&self) -> Vec<(u64, usize)> {
        self.segments
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                let b = &self.blocks[s.head as usize];
                b.state == BlockState::Free && b.next == NIL
            })
            .map(|(i, s)| (self.blocks[s.head as usize].last_used, i))
            .collect()
    }

    /// Remove the whole free segment whose head is `head`; returns (base, size, kind) for the
    /// caller to give back to the device, or `None` if it is no longer whole and free.
    pub fn remove_segment(&mut self, base: usize) -> Option<Segment> {
        let pos = self.segments.iter().position(|s| s.base == base)?;
        let seg = self.segments[pos];
        let b = &self.blocks[seg.head as usize];
        if b.state != BlockState::Free || b.next != NIL || b.size != seg.size {
            return None;
        }
        self.remove_free(seg.head);
        self.retire_block(seg.head);
        self.segments.swap_remove(pos);
        let s = self.stats_of(seg.kind);
        s.segment.decrease(1);
        s.reserved_bytes.decrease(seg.size);
        Some(seg)
    }
}
