//! The state of one stream's pool: blocks, segments, free indexes and statistics.
//!
//! All of it lives behind the pool's own mutex, so streams never contend with each other.
//!
//! The fields of [`PoolState`] are private to this module: the rest of the allocator changes a
//! pool only through methods named for what they do (take a cached block, free one, record a
//! pending free, add a fence, lend idle chunks...), each keeping the invariants below, and
//! reads it through accessors. Here: the blocks' placement (take, split, free, coalesce) and
//! the statistics; beside it `block.rs` (the records), `access.rs` (what the allocator reads;
//! the live map, allocation context, private pools' bookkeeping), `segments.rs`, `vm.rs`
//! (expandable segments), `waits.rs` (cross-stream extras, pending frees, fences), `check.rs`
//! (the invariant checker) and `tests.rs`.
//!
//! Invariants (checked by `check.rs`):
//! - the blocks of a segment tile it exactly, linked by `prev` / `next` in address order;
//! - two `Free` blocks are never address neighbours: frees coalesce;
//! - a block is on a free list iff its state is `Free`, in the index of its size class;
//! - a block is in a recent-free slot or is the parked block iff its state is `Recent`.
//!   Recent blocks are cached but not yet coalesced: reusing one for the same size skips the
//!   free index, the split and the merge. Small blocks wait in their size's slot; a large
//!   block waits only until the pool's next large request of another size, the next large
//!   free, or any slow path (see [`PoolState::take_cached`]). Slots are flushed (coalesced)
//!   before the pool grows or gives memory back, so they never cause a new segment;
//! - per kind: `reserved_bytes == sum(segment sizes)`,
//!   `reserved_bytes == allocated_bytes + pending bytes + free bytes`,
//!   `active == allocation + pending`.

use std::collections::HashMap;

use super::size::{pool_kind, should_split};
use super::stats::{PoolKind, PoolStats, Stat};
use super::tlsf::Tlsf;
use super::AllocatorConfig;

mod access;
mod block;
mod check;
mod free_memory;
mod live;
mod page_table;
mod segments;
mod vm;
mod waits;
pub use block::{Block, BlockState, Segment, NIL};
pub use check::Tally;
pub use live::LiveBlocks;
pub use page_table::{LENT, NO_CHUNK};
pub use vm::{LentRange, Run};
use waits::PendingFree;
pub use waits::{Extras, Fence, QUIET_TICKS};

/// Picks one statistic out of a pool's set.
type StatField = fn(&mut PoolStats) -> &mut Stat;

/// Blocks larger than this do not wait in a recent slot: deferring the merge of large blocks
/// lets same-size reuse eat into space a later, larger request needed (measured: ResNet-50
/// trace 1.037 -> 1.052 reserved/allocated with 10 MiB here; expandable segments 1.004 ->
/// 1.036 with every size here). They wait only as the pool's one parked block, until the next
/// large request or free.
pub const RECENT_MAX_SIZE: u64 = super::size::SMALL_REQUEST;

/// Recent-free slots per pool (direct-mapped by block size).
pub const RECENT_SLOTS: usize = 32;

#[inline(always)]
fn recent_slot(size: u64) -> usize {
    ((size >> 9).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - RECENT_SLOTS.trailing_zeros()))
        as usize
}

/// Whether a free block of `size` bytes may serve a request of `rounded` under
/// `max_split_size` (PyTorch's rule): a request below it never takes a block at or above it
/// (those are not split), and a request at or above it takes one no more than
/// `max_non_split_rounding` larger.
#[inline]
fn may_serve(config: &AllocatorConfig, rounded: u64, size: u64) -> bool {
    match config.max_split_size {
        None => true,
        Some(max_split) if rounded < max_split => size < max_split,
        Some(_) => size <= rounded.saturating_add(config.max_non_split_rounding),
    }
}

/// One pool's state (see the module docs); behind its `StreamPool`'s mutex.
pub struct PoolState {
    /// Live allocations: address -> block index.
    live: LiveBlocks,
    blocks: Vec<Block>,
    vacant: Vec<u32>,
    free_index: [Tlsf; 2],
    /// Per size class: small, large.
    stats: [PoolStats; 2],
    /// Both size classes together: only the `peak` fields are kept (the current values are the
    /// classes' sums). Exact, where summing the classes' peaks would overstate them; raised after
    /// each increase, so decreases (the free path) pay nothing for it.
    combined_peaks: PoolStats,
    /// Per size class: frees waiting for other streams' events (blocks and bytes). A block is
    /// active while allocated or pending, so the `active` figures are derived, not counted:
    /// `active.current = allocation.current + pending.blocks`, and likewise in bytes; an
    /// allocation raises the `active` peaks (nothing else makes a block active), and a free
    /// that goes straight back to the cache touches no `active` figure at all.
    pending_figures: [PendingFigures; 2],
    /// `pending_figures` when the accumulated totals were last zeroed (see
    /// [`PoolState::stats`]).
    pending_at_reset: [PendingFigures; 2],
    /// Bumped by every change to the free index (a block added, taken or replaced).
    index_version: u64,
    /// The last parked block that `coalescing_would_pick` let be taken back: (block, its
    /// address, its size, `index_version` then). Neighbours turn free or stop being free only
    /// through the index, so while the version stands the answer does too.
    pick_memo: (u32, usize, u64, u64),
    segments: Vec<Segment>,
    pending: Vec<PendingFree>,
    extras: std::collections::HashMap<u32, Extras>,
    tick: u64,
    next_id: u64,
    /// Recently freed blocks, not coalesced (`NIL` = empty slot).
    recent: [u32; RECENT_SLOTS],
    /// The large block freed last, not coalesced (`NIL`: none): taken back by the next request
    /// of its exact size, coalesced by any other large request or free.
    parked: u32,
    /// Until the pool's first cycle is over, its idle memory does not move (see
    /// `recycling`).
    first_cycle: FirstCycle,
    /// Context recorded at allocation, for snapshots (only while history records context).
    frames: HashMap<u32, super::Frames>,
    /// Private pools: the pool's id, whether it was released, and the streams it served.
    pool_id: crate::graph::MempoolId,
    released: bool,
    users: Vec<crate::stream::Stream>,
    /// Expandable segments (and plain segments' releases): events recorded on the pool's
    /// stream, oldest first (at most [`MAX_FENCES`](waits::MAX_FENCES)); once one completes,
    /// blocks freed up to its tick are no longer used by queued work.
    fences: std::collections::VecDeque<Fence>,
    /// The tick of the newest completed fence.
    safe_tick: u64,
    /// Without events: another pool took this pool's idle memory since this pool last
    /// needed some (see `take_robbed`).
    robbed: bool,
    /// Tickets of fences replaced while another thread may be asking them (its query runs
    /// with the pool unlocked): released once it is done.
    retired: Vec<u64>,
    /// Expandable segments: old mappings of chunks that moved, waiting to be unmapped.
    lent: Vec<LentRange>,
}

/// A pool's first cycle (a training step, a first batch of requests), watched by its frees
/// until it is over: once its allocated memory has fallen to two thirds of its peak or below,
/// or it has freed half its peak since the peak last rose (a steady churn, whose allocated
/// memory neither falls nor grows).
#[derive(Debug, Default, Clone, Copy)]
struct FirstCycle {
    over: bool,
    /// The allocated peak the last free saw, and the bytes freed in all by then.
    peak: u64,
    freed_at_peak: u64,
}

impl Default for PoolState {
    fn default() -> Self {
        PoolState {
            live: LiveBlocks::default(),
            blocks: Vec::new(),
            vacant: Vec::new(),
            free_index: Default::default(),
            stats: Default::default(),
            combined_peaks: PoolStats::default(),
            pending_figures: Default::default(),
            pending_at_reset: Default::default(),
            index_version: 0,
            pick_memo: (NIL, 0, 0, u64::MAX),
            segments: Vec::new(),
            pending: Vec::new(),
            extras: Default::default(),
            tick: 0,
            next_id: 0,
            recent: [NIL; RECENT_SLOTS],
            parked: NIL,
            first_cycle: FirstCycle::default(),
            frames: HashMap::new(),
            pool_id: crate::graph::MempoolId::NONE,
            released: false,
            users: Vec::new(),
            fences: std::collections::VecDeque::new(),
            safe_tick: 0,
            robbed: false,
            retired: Vec::new(),
            lent: Vec::new(),
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

    /// After increases: raise the combined peak of each stat `fields` picks to the pools'
    /// current sum.
    #[inline(always)]
    fn raise_combined_peaks<const N: usize>(&mut self, fields: [StatField; N]) {
        for field in fields {
            let [small, large] = &mut self.stats;
            let now = field(small).current + field(large).current;
            let peak = &mut field(&mut self.combined_peaks).peak;
            *peak = (*peak).max(now);
        }
    }

    /// Both size classes together, with exact peaks.
    pub fn combined_stats(&self) -> PoolStats {
        let [small, large] = self.stats();
        small.merged(large).with_peaks_of(self.combined_peaks)
    }

    /// Set every peak (each pool's and the combined ones) to its current value.
    pub fn reset_peak_stats(&mut self) {
        let [small, large] = self.stats();
        for (stored, now) in self.stats.iter_mut().zip([small, large]) {
            *stored = stored.with_peaks_of(now.with_current_as_peak());
        }
        self.combined_peaks = small.merged(large).with_current_as_peak();
    }

    /// Count a cached piece of a split segment in the inactive-split figures.
    #[inline(always)]
    fn inactive_add(&mut self, idx: u32) {
        let b = &self.blocks[idx as usize];
        if b.is_split() && !b.vm {
            let (kind, size) = (b.kind, b.size);
            let s = self.stats_of(kind);
            s.inactive_split.increase(1);
            s.inactive_split_bytes.increase(size);
            self.raise_combined_peaks([|s| &mut s.inactive_split, |s| &mut s.inactive_split_bytes]);
        }
    }

    #[inline(always)]
    fn inactive_remove(&mut self, idx: u32) {
        let b = &self.blocks[idx as usize];
        if b.is_split() && !b.vm {
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
        self.index_version += 1;
        self.free_index[kind as usize].insert(&mut self.blocks, idx);
    }

    #[inline(always)]
    fn remove_free(&mut self, idx: u32) {
        self.inactive_remove(idx);
        let kind = self.blocks[idx as usize].kind;
        self.index_version += 1;
        self.free_index[kind as usize].remove(&mut self.blocks, idx);
    }

    /// Take a cached block for a request of `rounded` bytes (`requested` asked), splitting
    /// it if worthwhile. Returns the block index or `NIL`.
    ///
    /// A large request first looks at the parked block: of the same size, it is handed back
    /// as it was (a free and a new allocation of one size, the commonest large pattern, cost
    /// no split and no merge); of another, it is coalesced first, so the free index looks as
    /// if it had never been parked.
    #[inline]
    pub fn take_cached(&mut self, rounded: u64, requested: u64, config: &AllocatorConfig) -> u32 {
        if rounded <= RECENT_MAX_SIZE {
            let slot = recent_slot(rounded);
            let recent = self.recent[slot];
            if recent != NIL && self.blocks[recent as usize].size == rounded {
                self.recent[slot] = NIL;
                self.inactive_remove(recent);
                self.carve(recent, rounded, requested, config);
                return recent;
            }
        } else if self.parked != NIL {
            let parked = std::mem::replace(&mut self.parked, NIL);
            self.inactive_remove(parked);
            let key = (
                parked,
                self.blocks[parked as usize].addr,
                rounded,
                self.index_version,
            );
            if self.blocks[parked as usize].size == rounded
                && (self.pick_memo == key || self.coalescing_would_pick(parked, rounded, config))
            {
                // The index is unchanged until it is next added to or taken from: while it
                // is, the same block of the same size is picked again without looking.
                self.pick_memo = key;
                let (next, freed) = {
                    let b = &self.blocks[parked as usize];
                    (b.next, b.last_used)
                };
                if next != NIL && self.blocks[next as usize].state == BlockState::Free {
                    // A merge and a split would have given the free neighbour the parked
                    // block's age (the younger one).
                    let n = &mut self.blocks[next as usize];
                    n.last_used = n.last_used.max(freed);
                }
                self.mark_allocated(parked, requested);
                return parked;
            }
            self.coalesce(parked);
        }
        self.take_from_index(rounded, requested, config)
    }

    /// Whether coalescing parked block `idx` (of exactly `rounded` bytes) and taking a block
    /// for `rounded` from the index would hand out the very same bytes and leave the same free
    /// blocks: no free block before it (the merged block would start lower), a free block
    /// after it only if the merged block would be split again where it was, and no other free
    /// block the index would choose first (a lower class, or in the same class a smaller size
    /// or address). Then taking it back is the same placement without the merge and the split.
    #[inline]
    fn coalescing_would_pick(&self, idx: u32, rounded: u64, config: &AllocatorConfig) -> bool {
        let b = &self.blocks[idx as usize];
        if b.kind != super::stats::PoolKind::Large
            || (b.prev != NIL && self.blocks[b.prev as usize].state == BlockState::Free)
        {
            return false;
        }
        let (merged, skip) = match b.next {
            n if n != NIL && self.blocks[n as usize].state == BlockState::Free => {
                let n = &self.blocks[n as usize];
                if !should_split(b.kind, b.size + n.size, rounded, config) {
                    return false;
                }
                (b.size + n.size, n.addr)
            }
            _ => (b.size, 0),
        };
        if !may_serve(config, rounded, merged) {
            return false;
        }
        let rival = self.free_index[b.kind as usize].find(&self.blocks, rounded, |c| {
            c.addr != skip && may_serve(config, rounded, c.size)
        });
        rival == NIL || {
            let r = &self.blocks[rival as usize];
            (Tlsf::class_index(merged), merged, b.addr) < (r.class, r.size, r.addr)
        }
    }

    #[inline]
    fn take_from_index(&mut self, rounded: u64, requested: u64, config: &AllocatorConfig) -> u32 {
        let kind = pool_kind(rounded);
        let idx = match config.max_split_size {
            None => self.free_index[kind as usize].find(&self.blocks, rounded, |_| true),
            Some(_) => self.free_index[kind as usize].find(&self.blocks, rounded, |b| {
                may_serve(config, rounded, b.size)
            }),
        };
        if idx == NIL || self.blocks[idx as usize].mapped_len < rounded {
            // Expandable segments: not known to be backed by memory. The slow path chooses
            // with memory in mind (`take_backed`) and maps what is missing.
            return NIL;
        }
        let (kind, size, class) = {
            let b = &self.blocks[idx as usize];
            (b.kind, b.size, b.class)
        };
        if should_split(kind, size, rounded, config) && Tlsf::class_index(size - rounded) == class {
            // The remainder stays in the block's class: it takes the block's place on the
            // free list instead of a remove and an insert.
            self.inactive_remove(idx);
            let rest = self.split_off(idx, rounded);
            self.index_version += 1;
            self.free_index[kind as usize].replace(&mut self.blocks, idx, rest);
            self.blocks[rest as usize].state = BlockState::Free;
            self.inactive_add(rest);
            self.mark_allocated(idx, requested);
        } else {
            self.remove_free(idx);
            self.carve(idx, rounded, requested, config);
        }
        idx
    }

    /// Take free block `idx` (on its free list) for a request of `rounded` bytes.
    fn take_block(&mut self, idx: u32, rounded: u64, requested: u64, config: &AllocatorConfig) {
        self.remove_free(idx);
        self.carve(idx, rounded, requested, config);
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
            let rest = self.split_off(idx, rounded);
            self.add_free(rest);
        }
        self.mark_allocated(idx, requested);
    }

    /// Hand block `idx` out for `requested` bytes.
    #[inline]
    fn mark_allocated(&mut self, idx: u32, requested: u64) {
        let kind = self.blocks[idx as usize].kind;
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
        // The other size class's figures, read before this one's are written: the combined
        // peaks then come from registers, not from loads of what was just stored.
        let k = kind as usize;
        let o = &self.stats[1 - k];
        let (op, kp) = (self.pending_figures[1 - k], self.pending_figures[k]);
        let others = [
            o.allocation.current,
            o.allocated_bytes.current,
            o.requested_bytes.current,
        ];
        let s = &mut self.stats[k];
        s.allocation.increase(1);
        s.allocated_bytes.increase(size);
        s.requested_bytes.increase(requested);
        // Active blocks are the allocated ones and the pending frees (`pending_figures`): only
        // their peaks are kept here (their current values are derived: `PoolState::stats`).
        let active = [
            s.allocation.current + kp.blocks,
            s.allocated_bytes.current + kp.bytes,
        ];
        for (stat, now) in [&mut s.active, &mut s.active_bytes].into_iter().zip(active) {
            if now > stat.peak {
                stat.peak = now;
            }
        }
        let now = [
            s.allocation.current + others[0],
            s.allocated_bytes.current + others[1],
            s.requested_bytes.current + others[2],
            active[0] + others[0] + op.blocks,
            active[1] + others[1] + op.bytes,
        ];
        let c = &mut self.combined_peaks;
        for (stat, now) in [
            &mut c.allocation,
            &mut c.allocated_bytes,
            &mut c.requested_bytes,
            &mut c.active,
            &mut c.active_bytes,
        ]
        .into_iter()
        .zip(now)
        {
            if now > stat.peak {
                stat.peak = now;
            }
        }
    }

    /// Cut block `idx` after `first_size` bytes; returns the new block of the rest, linked
    /// into the segment but on no free list (the caller puts it there).
    #[inline]
    fn split_off(&mut self, idx: u32, first_size: u64) -> u32 {
        let (addr, size, next, kind, mapped_len, vm, last_used) = {
            let b = &self.blocks[idx as usize];
            (
                b.addr,
                b.size,
                b.next,
                b.kind,
                b.mapped_len,
                b.vm,
                b.last_used,
            )
        };
        let rest = self.new_block(Block {
            addr: addr + first_size as usize,
            size: size - first_size,
            prev: idx,
            next,
            kind,
            mapped_len: mapped_len.saturating_sub(first_size),
            vm,
            // The rest was free as long as the block was: its age is the block's (a younger
            // age would let a steal or a release take memory queued work may still use).
            last_used,
            ..Block::vacant()
        });
        if next != NIL {
            self.blocks[next as usize].prev = rest;
        }
        let b = &mut self.blocks[idx as usize];
        b.size = first_size;
        b.mapped_len = b.mapped_len.min(first_size);
        b.next = rest;
        rest
    }

    /// Free allocated block `idx` (out of the live map, used on no other stream): it goes
    /// back to the cache at once.
    #[inline(always)]
    pub fn free_to_cache(&mut self, idx: u32) {
        self.account_free(idx);
        self.release_to_cache(idx);
    }

    /// Undo the allocation statistics of block `idx`; it stays active.
    #[inline]
    fn account_free(&mut self, idx: u32) {
        let b = &self.blocks[idx as usize];
        let (kind, size, requested) = (b.kind, b.size, b.requested);
        let s = self.stats_of(kind);
        s.allocation.decrease(1);
        s.allocated_bytes.decrease(size);
        s.requested_bytes.decrease(requested);
        if !self.first_cycle.over {
            self.watch_first_cycle();
        }
    }

    /// A free during the first cycle: is it over now (see [`FirstCycle`])?
    #[inline(never)]
    fn watch_first_cycle(&mut self) {
        let (small, large) = (
            &self.stats[0].allocated_bytes,
            &self.stats[1].allocated_bytes,
        );
        let (now, freed) = (small.current + large.current, small.freed + large.freed);
        let peak = self.combined_peaks.allocated_bytes.peak;
        let c = &mut self.first_cycle;
        if peak != c.peak {
            (c.peak, c.freed_at_peak) = (peak, freed);
        }
        // (`freed` counts from the last `reset_accumulated_stats`: a reset only delays it.)
        let freed_since = freed.saturating_sub(c.freed_at_peak);
        c.over = now.saturating_mul(3) <= peak.saturating_mul(2)
            || freed_since.saturating_mul(2) >= peak;
    }

    /// Whether the pool's first cycle is over (see [`FirstCycle`]). Until then what it frees is
    /// mostly taken back in place by the allocations of the same cycle, and moving it only
    /// shuffles chunks that are about to be reused where they are. On the H200
    /// (BENCHMARKS.md, "moves wait for the first cycle"), holding moves back until then made
    /// first steps 10-18% faster on GPT-2 training, ResNet-50 and ViT and ViT's peak
    /// reserved 1.007-1.010x allocated (1.016-1.018), the rest unchanged; replayed, GPT-2
    /// training's CI trace reserves 1.0143x with 2,139 driver calls (1.0202x with 2,527).
    pub fn recycling(&self) -> bool {
        self.first_cycle.over
    }

    /// Return block `idx` (allocated or pending, already accounted by `account_free`) to the
    /// cache. Small blocks go to their recent-free slot (coalescing what the slot held);
    /// a large one is parked (coalescing the block parked before; see [`RECENT_MAX_SIZE`]).
    #[inline]
    fn release_to_cache(&mut self, idx: u32) {
        self.tick += 1;
        let tick = self.tick;
        let size = {
            let b = &mut self.blocks[idx as usize];
            b.requested = 0;
            b.id = 0;
            b.last_used = tick;
            b.state = BlockState::Recent;
            b.size
        };
        self.inactive_add(idx);
        let slot = if size > RECENT_MAX_SIZE {
            &mut self.parked
        } else {
            &mut self.recent[recent_slot(size)]
        };
        let evicted = std::mem::replace(slot, idx);
        self.coalesce_waiting(evicted);
    }

    /// Coalesce every recent-free block (and the parked one) into the free index.
    #[cold]
    pub fn flush_recent(&mut self) {
        for slot in 0..RECENT_SLOTS {
            let idx = std::mem::replace(&mut self.recent[slot], NIL);
            self.coalesce_waiting(idx);
        }
        let parked = std::mem::replace(&mut self.parked, NIL);
        self.coalesce_waiting(parked);
    }

    /// Coalesce `idx`, a `Recent` block just taken out of its slot (`NIL`: nothing to do).
    #[inline]
    fn coalesce_waiting(&mut self, idx: u32) {
        if idx != NIL {
            self.inactive_remove(idx);
            self.coalesce(idx);
        }
    }

    /// Merge cached block `idx` (on no list) with its free neighbours and index the result.
    fn coalesce(&mut self, idx: u32) {
        let next = self.blocks[idx as usize].next;
        let prev = self.blocks[idx as usize].prev;
        let prev_free = prev != NIL && self.blocks[prev as usize].state == BlockState::Free;
        if next != NIL && self.blocks[next as usize].state == BlockState::Free {
            let (kind, merged, next_class) = {
                let (b, n) = (&self.blocks[idx as usize], &self.blocks[next as usize]);
                (b.kind, b.size + n.size, n.class)
            };
            if !prev_free && Tlsf::class_index(merged) == next_class {
                // The merged block stays in the free neighbour's class: take its place.
                self.inactive_remove(next);
                // (retiring `next` keeps its free-list links, which `replace` reads)
                self.merge_into_prev(idx, next);
                self.index_version += 1;
                self.free_index[kind as usize].replace(&mut self.blocks, next, idx);
                self.blocks[idx as usize].state = BlockState::Free;
                self.inactive_add(idx);
                return;
            }
            self.remove_free(next);
            self.merge_into_prev(idx, next);
        }
        let idx = if prev != NIL && self.blocks[prev as usize].state == BlockState::Free {
            self.remove_free(prev);
            self.merge_into_prev(prev, idx);
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
        let (second_mapped, second_used) = {
            let b = &self.blocks[second as usize];
            (b.mapped_len, b.last_used)
        };
        let f = &mut self.blocks[first as usize];
        if f.is_mapped() {
            f.mapped_len = f.size.saturating_add(second_mapped);
        }
        f.size += size;
        f.next = next;
        // The merged block was last used when the later of the two was.
        f.last_used = f.last_used.max(second_used);
        self.retire_block(second);
    }
}

#[cfg(test)]
mod tests;

/// Frees of one size class waiting for other streams' events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct PendingFigures {
    pub(super) blocks: u64,
    pub(super) bytes: u64,
}
