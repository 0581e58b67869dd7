//! What the rest of the allocator reads of a pool (blocks, segments, its clock, statistics),
//! and the pool's bookkeeping outside the placement of blocks: the live map (what callers
//! own, and blocks held in flight while their pages are mapped), allocation context, the
//! private pool's users, teardown.

use super::{Block, BlockState, PoolState, Segment, NIL};
use crate::stats::{PoolStats, Stat};
use crate::stream::Stream;

/// Every change keeps the invariants in the pool's module docs (the fields are private to
/// the pool module).
impl PoolState {
    /// Block `idx`, to read (blocks change only through the pool's methods).
    #[inline(always)]
    pub fn block(&self, idx: u32) -> &Block {
        &self.blocks[idx as usize]
    }

    /// The pool's segments, in no particular order.
    #[inline]
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The blocks of `seg` (one of this pool's segments), in address order.
    pub fn blocks_of<'a>(&'a self, seg: &Segment) -> impl Iterator<Item = (u32, &'a Block)> {
        let mut cur = seg.head;
        std::iter::from_fn(move || {
            (cur != NIL).then(|| {
                let idx = cur;
                let b = &self.blocks[idx as usize];
                cur = b.next;
                (idx, b)
            })
        })
    }

    /// The segment holding `addr`.
    pub fn segment_at(&self, addr: usize) -> Option<&Segment> {
        self.segments
            .iter()
            .find(|s| s.base <= addr && addr < s.base + s.size as usize)
    }

    /// The block of `seg` holding `addr`.
    pub fn block_at(&self, seg: &Segment, addr: usize) -> Option<u32> {
        self.blocks_of(seg)
            .find(|(_, b)| b.addr <= addr && addr < b.addr + b.size as usize)
            .map(|(idx, _)| idx)
    }

    /// The pool's clock: one tick per allocation and per free.
    #[inline]
    pub fn tick(&self) -> u64 {
        self.tick
    }

    /// Allocations made from this pool so far (the last buffer id handed out).
    #[inline]
    pub fn allocations(&self) -> u64 {
        self.next_id
    }

    /// Statistics of the small and the large size class. The `active` figures are derived
    /// (see `PoolState::pending_figures`): allocated blocks and pending frees; activated are
    /// the allocations, deactivated the frees less those still pending that were made since
    /// the totals were last zeroed.
    pub fn stats(&self) -> [PoolStats; 2] {
        // `active` from `allocs` with `pending` frees waiting now and `at_reset` waiting when
        // the totals were last zeroed: every free counted since was deactivated but those
        // still pending, and so was every block pending at the reset that finished since.
        fn derive(active: &mut Stat, allocs: Stat, pending: u64, at_reset: u64) {
            active.current = allocs.current + pending;
            active.allocated = allocs.allocated;
            active.freed = (allocs.freed + at_reset).saturating_sub(pending);
        }
        let mut out = self.stats;
        for (k, s) in out.iter_mut().enumerate() {
            let (pending, at_reset) = (self.pending_figures[k], self.pending_at_reset[k]);
            let (allocation, allocated_bytes) = (s.allocation, s.allocated_bytes);
            derive(&mut s.active, allocation, pending.blocks, at_reset.blocks);
            derive(
                &mut s.active_bytes,
                allocated_bytes,
                pending.bytes,
                at_reset.bytes,
            );
        }
        out
    }

    /// Bytes of live blocks, both size classes together.
    pub fn allocated_bytes(&self) -> u64 {
        self.stats[0].allocated_bytes.current + self.stats[1].allocated_bytes.current
    }

    /// Zero the allocated and freed totals of both size classes.
    pub fn reset_accumulated_stats(&mut self) {
        self.stats.iter_mut().for_each(PoolStats::reset_accumulated);
        self.pending_at_reset = self.pending_figures;
    }

    // ---- the live map ----------------------------------------------------------------------

    /// The live block at `addr` (an address handed out and not freed).
    #[inline]
    pub fn live_block(&self, addr: usize) -> Option<u32> {
        self.live.get(addr)
    }

    /// Every live block: (address, block).
    pub fn live_blocks(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.live.iter()
    }

    /// A free of `addr`: take its block out of the live map (`None`: no live block there, a
    /// double free or an address never handed out). The caller then accounts the free
    /// ([`account_free`](Self::account_free)) and caches the block, or puts it back
    /// ([`restore_live`](Self::restore_live)) when the free cannot go on.
    #[inline(always)]
    pub fn take_live(&mut self, addr: usize) -> Option<u32> {
        self.live.remove(addr)
    }

    /// Undo [`take_live`](Self::take_live): the free of `block` at `addr` did not happen.
    pub fn restore_live(&mut self, addr: usize, block: u32) {
        debug_assert_eq!(self.blocks[block as usize].addr, addr);
        debug_assert_eq!(self.blocks[block as usize].state, BlockState::Allocated);
        self.live.insert(addr, block);
    }

    /// Take a block just carved out of the live map, for an allocation that goes on with the
    /// lock released (mapping its pages): it is not the caller's until
    /// [`publish`](Self::publish) puts it back, under the lock the address is returned from.
    ///
    /// The live map holds exactly the blocks callers own, so a free (or any lookup by
    /// address) of an in-flight block is refused like a double free. It can only be a stale
    /// one (a double free, or a use after free, of a pointer whose address is being handed
    /// out again); accepted, it sent the block back to the cache while the allocation went on
    /// with it, so the block was handed out twice, and released twice, onto a free list it was
    /// already on (a cycle), when mapping then failed (issue 13 item 4).
    #[inline]
    pub fn hold_in_flight(&mut self, block: u32) {
        let addr = self.blocks[block as usize].addr;
        let held = self.live.remove(addr);
        debug_assert_eq!(held, Some(block), "a block just carved is live");
    }

    /// Hand out a block held in flight ([`hold_in_flight`](Self::hold_in_flight)): it is
    /// live again, the caller's. Returns its address.
    pub fn publish(&mut self, block: u32) -> usize {
        let addr = self.blocks[block as usize].addr;
        self.live.insert(addr, block);
        addr
    }

    /// Every page under `block` is mapped now (expandable segments).
    pub fn mark_mapped(&mut self, block: u32) {
        let b = &mut self.blocks[block as usize];
        b.mapped_len = b.size;
    }

    // ---- allocation context ----------------------------------------------------------------

    /// Keep the context `block` was allocated in, for snapshots.
    pub fn set_frames(&mut self, block: u32, frames: crate::Frames) {
        self.frames.insert(block, frames);
    }

    /// Forget the context of a block being freed.
    pub fn forget_frames(&mut self, block: u32) {
        self.frames.remove(&block);
    }

    /// The context `block` was allocated in, if it was kept.
    pub fn frames(&self, block: u32) -> Option<&crate::Frames> {
        self.frames.get(&block)
    }

    // ---- private pools ---------------------------------------------------------------------

    /// The private pool this pool is (`MempoolId::NONE` for a stream's pool).
    pub fn pool_id(&self) -> crate::graph::MempoolId {
        self.pool_id
    }

    /// Whether this private pool's last use was dropped (it gives its memory back as its
    /// blocks are freed).
    #[inline]
    pub fn is_released(&self) -> bool {
        self.released
    }

    /// The streams that allocated from this private pool.
    pub fn users(&self) -> &[Stream] {
        &self.users
    }

    /// This pool serves private pool `id` (again): in use, not released.
    pub fn open_private(&mut self, id: crate::graph::MempoolId) {
        self.pool_id = id;
        self.released = false;
    }

    /// The last use of this private pool was dropped.
    pub fn mark_released(&mut self) {
        self.released = true;
    }

    /// `stream` allocated from this private pool.
    pub fn add_user(&mut self, stream: Stream) {
        if !self.users.contains(&stream) {
            self.users.push(stream);
        }
    }

    /// This emptied private pool serves none any more (its slot is reused).
    pub fn close_private(&mut self) {
        self.released = false;
        self.pool_id = crate::graph::MempoolId::NONE;
        self.users.clear();
    }

    // ---- teardown --------------------------------------------------------------------------

    /// Every segment, taken out as the allocator is dropped (blocks and statistics are left as
    /// they were: the pool is not used again).
    pub fn take_segments(&mut self) -> Vec<Segment> {
        std::mem::take(&mut self.segments)
    }

    /// The tickets of every pending free and fence, taken out as the allocator is dropped, for
    /// the caller to release.
    pub fn take_tickets(&mut self) -> Vec<u64> {
        let pending = std::mem::take(&mut self.pending);
        let fences = std::mem::take(&mut self.fences);
        let retired = std::mem::take(&mut self.retired);
        pending
            .into_iter()
            .flat_map(|p| p.tickets)
            .chain(fences.into_iter().map(|f| f.ticket))
            .chain(retired)
            .collect()
    }
}
