//! The records of a pool: blocks (pieces of segments, linked by address), segments, and the
//! live map's hash.

use super::page_table::PageTable;
use crate::stats::PoolKind;

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
    /// Expandable segments: the old mapping of a chunk that moved elsewhere, kept until the
    /// work queued on it has passed; never handed out (see `pool/vm.rs`).
    Lent,
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
    /// Bytes from the block's start known to be backed by mapped pages (at least `size`
    /// outside expandable segments). May understate; never overstates.
    pub mapped_len: u64,
    /// Part of an expandable segment: its free space is not stranded by splitting (its pages
    /// can move), so it does not count as inactive-split.
    pub vm: bool,
}

impl Block {
    pub(super) fn vacant() -> Block {
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
            mapped_len: u64::MAX,
            vm: false,
        }
    }
    /// Every page under the block is mapped.
    #[inline(always)]
    pub fn is_mapped(&self) -> bool {
        self.mapped_len >= self.size
    }
    /// A piece of a segment that has other pieces.
    #[inline(always)]
    pub fn is_split(&self) -> bool {
        self.prev != NIL || self.next != NIL
    }
}

/// A segment taken from the device. Its first block's index never changes: merges keep the
/// lower block and splits keep the lower part in place.
#[derive(Debug, Clone)]
pub struct Segment {
    pub base: usize,
    pub size: u64,
    pub head: u32,
    pub kind: PoolKind,
    /// Page table of an expandable segment (a reserved virtual range); `None` for a
    /// segment that is memory from end to end.
    pub vm: Option<Box<PageTable>>,
}

impl Segment {
    /// Bytes of memory (not address space) this segment holds.
    pub fn memory(&self) -> u64 {
        match &self.vm {
            None => self.size,
            Some(t) => t.mapped * t.page_size,
        }
    }
}
