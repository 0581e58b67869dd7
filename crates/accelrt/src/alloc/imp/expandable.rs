//! Expandable segments: blocks carved from reserved virtual ranges, backed by physical pages
//! mapped on demand. Pages, not segments, are the unit of reuse.
//!
//! A page is *idle* when it lies wholly inside a free block. When a block needs pages:
//! 1. spare pages (unmapped, already created) are used first;
//! 2. while reserved memory stays under the growth threshold (the previous peak with
//!    `release_at_peak`, and the low watermark), new pages are created: no waiting;
//! 3. past it, idle pages are unmapped from free blocks (after the stream that used them has
//!    passed, waited for with `vm_lock` released) and remapped here;
//! 4. then new pages again, up to the hard limit.
//!
//! All page-table changes happen under `vm_lock`, so two blocks sharing a boundary page never
//! map it twice; the fast path never takes it (a block whose pages are all mapped carries
//! `mapped = true`).

use std::sync::atomic::Ordering::Relaxed;

use parking_lot::MutexGuard;

use super::{hold_in_flight, AllocatorEvent, CachingAllocator, SegmentFailure, StreamPool};
use crate::alloc::history::TraceAction;
use crate::alloc::pool::{BlockState, PoolState, NIL, NO_PAGE};
use crate::alloc::provider::{PageHandle, ProviderError, VirtualMemory};
use crate::alloc::size::pool_kind;
use crate::error::{Error, Result};

/// Whether taking pages may wait for the streams that used them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Only pages whose stream is known to have passed (a completed fence).
    Never,
    /// Synchronize the stream first (the last resort before an out-of-memory).
    Block,
}

/// Idle pages taken per steal at least, so that waiting for a stream is amortised.
const STEAL_BATCH_BYTES: u64 = 64 << 20;

/// Stealing budget: one steal (a wait for a stream, then remapping a batch) per this many
/// allocations, on average...
const ALLOCS_PER_STEAL: u64 = 64;
/// ...plus this many up front. Training and inference traces steal once per 90 to 160
/// allocations, around their peaks; a workload that sits at its peak and churns (RMM's
/// random benchmark: once per 3) runs out, and new pages are created instead, until reserved
/// memory settles where churn needs no remapping.
const INITIAL_STEALS: u64 = 32;

/// Consecutive runs of sorted slots: (first slot, length, index of the first in `slots`).
fn runs(slots: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    for (i, &s) in slots.iter().enumerate() {
        match out.last_mut() {
            Some((start, len, _)) if *start + *len == s => *len += 1,
            _ => out.push((s, 1, i)),
        }
    }
    out
}

impl CachingAllocator {
    fn vm(&self) -> &dyn VirtualMemory {
        self.provider
            .virtual_memory()
            .expect("expandable mode is only on for providers with virtual memory")
    }

    /// The slow path of an allocation in expandable mode.
    #[cold]
    #[inline(never)]
    pub(super) fn alloc_slow_vm(
        &self,
        pool_idx: u32,
        pool: &StreamPool,
        rounded: u64,
        size: u64,
    ) -> Result<usize> {
        for attempt in 0..2 {
            let block = {
                let mut st = pool.state.lock();
                self.process_pending(&mut st, pool.stream.index);
                st.flush_recent();
                let block = st.take_cached(rounded, size, &self.pool_config);
                if block != NIL {
                    hold_in_flight(&mut st, block);
                }
                block
            };
            let block = if block != NIL {
                block
            } else {
                self.grow_address_space(pool_idx, pool, rounded, size)?
            };
            match self.map_block(pool, block) {
                Ok(()) => return Ok(self.publish_mapped(pool, block)),
                Err(failure) => {
                    self.unwind_unmapped(pool, block);
                    match failure {
                        SegmentFailure::Driver(message) => {
                            return Err(Error::Driver {
                                call: "mapping device memory",
                                message,
                            })
                        }
                        _ if attempt == 0 => {
                            self.fire(0, size, AllocatorEvent::AllocationFailed);
                            self.counters.num_alloc_retries.fetch_add(1, Relaxed);
                            self.release_cached(true)?;
                        }
                        SegmentFailure::Limit(limit) => return Err(self.out_of_memory(size, limit)),
                        SegmentFailure::DeviceFull => {
                            return Err(self.out_of_memory(size, "device memory".into()))
                        }
                    }
                }
            }
        }
        unreachable!("the second attempt returns")
    }

    /// A cached block came out of the fast path not fully mapped: map it, or fall back to the
    /// slow path (which retries with callbacks and cache release before failing).
    #[cold]
    #[inline(never)]
    pub(super) fn finish_unmapped(
        &self,
        pool_idx: u32,
        pool: &StreamPool,
        block: u32,
        rounded: u64,
        size: u64,
    ) -> Result<usize> {
        match self.map_block(pool, block) {
            Ok(()) => Ok(self.publish_mapped(pool, block)),
            Err(_) => {
                self.unwind_unmapped(pool, block);
                self.alloc_slow_vm(pool_idx, pool, rounded, size)
            }
        }
    }

    fn publish_mapped(&self, pool: &StreamPool, block: u32) -> usize {
        let mut st = pool.state.lock();
        // The caller's from here on (see `hold_in_flight`).
        let addr = st.blocks[block as usize].addr;
        st.live.insert(addr, block);
        if self.history.enabled() {
            self.note_alloc(&mut st, block, pool.stream.index);
        }
        let ptr = st.blocks[block as usize].addr;
        drop(st);
        if self.config.debug_checks {
            self.debug_check("alloc (expandable)");
        }
        ptr
    }

    /// Give back a block that could not be mapped (it was carved, but never handed out).
    fn unwind_unmapped(&self, pool: &StreamPool, block: u32) {
        let mut st = pool.state.lock();
        // In flight (see `hold_in_flight`): no free can have reached it.
        debug_assert_eq!(st.blocks[block as usize].state, BlockState::Allocated);
        st.account_free(block);
        st.release_to_cache(block);
    }

    /// Reserve a new virtual range for `pool` and carve a block of `rounded` bytes from it.
    fn grow_address_space(
        &self,
        pool_idx: u32,
        pool: &StreamPool,
        rounded: u64,
        size: u64,
    ) -> Result<u32> {
        let (_, total) = self.provider.memory_info();
        if rounded > total {
            self.fire(0, size, AllocatorEvent::AllocationFailed);
            return Err(self.out_of_memory(size, "device memory".into()));
        }
        let page = self.vm_page;
        // Address space is cheap: twice the device, so one range serves the pool's lifetime;
        // plus 1/64 of that so the size sits mid-class in the free index, not on a class
        // boundary (a power of two): the large free remainder then keeps its class as blocks
        // come and go, and moves on its free list in O(1) (`Tlsf::replace`).
        let twice = total.saturating_mul(2);
        let span = twice
            .saturating_add(twice / 64)
            .max(rounded + page)
            .div_ceil(page)
            * page;
        let base = self
            .vm()
            .reserve(span as usize)
            .map_err(|e| Error::Driver {
                call: "reserving address space",
                message: format!(
                    "{} for an expandable segment: {}",
                    crate::alloc::format_size(span),
                    e.to_string()
                        .trim_start_matches("reserving address space: ")
                ),
            })?;
        self.pages.insert(base, span as usize, pool_idx);
        self.segment_index.write().insert(base, span);
        let segs = self.segments.fetch_add(1, Relaxed) + 1;
        self.segments_peak.fetch_max(segs, Relaxed);
        let mut st = pool.state.lock();
        st.add_vm_segment(base, span, pool_kind(rounded), page);
        let block = st.take_cached(rounded, size, &self.pool_config);
        assert_ne!(
            block, NIL,
            "a fresh range of {span} bytes holds a block of {rounded}"
        );
        hold_in_flight(&mut st, block);
        Ok(block)
    }

    /// Make every page under `block` (carved, not yet handed out) mapped.
    fn map_block(&self, pool: &StreamPool, block: u32) -> std::result::Result<(), SegmentFailure> {
        let mut guard = self.vm_lock.lock();
        loop {
            let (_, wanted) = pool.state.lock().unmapped_pages(block);
            if wanted.is_empty() {
                let mut st = pool.state.lock();
                let b = &mut st.blocks[block as usize];
                b.mapped_len = b.size;
                return Ok(());
            }
            let mut pages = self.obtain_pages(pool, wanted.len(), &mut guard)?;
            // Waiting for streams released `vm_lock`: look again.
            let (base, slots) = pool.state.lock().unmapped_pages(block);
            if slots.len() > pages.len() {
                self.spare.lock().extend(pages);
                continue;
            }
            self.spare.lock().extend(pages.drain(slots.len()..));
            let page = self.vm_page as usize;
            for (first, len, at) in runs(&slots) {
                let handles = &pages[at..at + len];
                let addr = base + first * page;
                // SAFETY: the slots are unmapped (checked under the pool lock, with `vm_lock`
                // held since), page-aligned inside a range reserved by this provider, and each
                // page is mapped nowhere else (fresh, spare or just unmapped).
                if let Err(e) = unsafe { self.vm().map(addr, handles, page) } {
                    self.spare.lock().extend(pages[at..].iter().copied());
                    return Err(match e {
                        ProviderError::OutOfMemory => SegmentFailure::DeviceFull,
                        ProviderError::Failed(m) => SegmentFailure::Driver(m),
                    });
                }
                let ids: Vec<u64> = handles.iter().map(|h| h.0).collect();
                pool.state
                    .lock()
                    .install_pages(base, &slots[at..at + len], &ids);
                if self.history.enabled() {
                    self.history.record(
                        TraceAction::SegmentMap,
                        addr as u64,
                        (len * page) as u64,
                        pool.stream.index,
                    );
                }
                self.fire(addr, (len * page) as u64, AllocatorEvent::Allocated);
            }
        }
    }

    /// Whether the stealing budget (see [`ALLOCS_PER_STEAL`]) allows one more steal.
    fn may_steal(&self) -> bool {
        let allocs: u64 = self
            .pools_with_index()
            .map(|(_, p)| p.state.lock().next_id)
            .sum();
        self.counters.num_page_steals.load(Relaxed) < allocs / ALLOCS_PER_STEAL + INITIAL_STEALS
    }

    /// Pages created below this many reserved bytes need no search for idle ones.
    fn growth_threshold(&self) -> Option<u64> {
        let peak = self
            .config
            .release_at_peak
            .then(|| self.reserved_peak.load(Relaxed));
        match (peak, self.soft_limit()) {
            (Some(p), Some(s)) => Some(p.min(s)),
            (p, s) => p.or(s),
        }
    }

    /// `n` pages to map: spare, new below the growth threshold, idle ones taken from free
    /// blocks, then new up to the hard limit.
    fn obtain_pages(
        &self,
        requester: &StreamPool,
        n: usize,
        guard: &mut MutexGuard<'_, ()>,
    ) -> std::result::Result<Vec<PageHandle>, SegmentFailure> {
        let mut got: Vec<PageHandle> = {
            let mut spare = self.spare.lock();
            let keep = spare.len().saturating_sub(n);
            spare.drain(keep..).collect()
        };
        let threshold = self.growth_threshold();
        while got.len() < n
            && threshold.is_none_or(|t| self.reserved.load(Relaxed) + self.vm_page <= t)
        {
            match self.create_page() {
                Ok(h) => got.push(h),
                Err(_) => break,
            }
        }
        if got.len() < n && self.may_steal() {
            // Take a batch, and keep the surplus as spare pages for the next blocks (reserved
            // memory does not change: the pages only move). Never waits: only pages behind a
            // completed fence are taken, so the device's queue is never drained.
            let need = n - got.len();
            let batch = need.max((STEAL_BATCH_BYTES / self.vm_page) as usize);
            // Only from the requesting pool: its fence goes on the stream being allocated on,
            // which is alive; another pool's stream may have been destroyed by its owner.
            // (Without an event source there are no streams to outlive: any pool will do.)
            let mut stolen = match self.events {
                Some(_) => self.take_idle(requester, Some(batch), guard, Wait::Never),
                None => self.steal_idle_pages(batch, guard, Wait::Never),
            };
            if stolen.len() > need {
                self.spare.lock().extend(stolen.drain(need..));
            }
            got.extend(stolen);
        }
        while got.len() < n {
            match self.create_page() {
                Ok(h) => got.push(h),
                Err(SegmentFailure::Driver(m)) => {
                    self.spare.lock().extend(got);
                    return Err(SegmentFailure::Driver(m));
                }
                Err(e) => {
                    // At the limit: wait for streams and take any idle page before failing.
                    let need = n - got.len();
                    got.extend(self.steal_idle_pages(need, guard, Wait::Block));
                    if got.len() < n {
                        self.spare.lock().extend(got);
                        return Err(e);
                    }
                }
            }
        }
        Ok(got)
    }

    fn create_page(&self) -> std::result::Result<PageHandle, SegmentFailure> {
        let new_total = self.claim_reserved(self.vm_page)?;
        match self.vm().create_page(self.vm_page as usize) {
            Ok(h) => {
                self.reserved_peak.fetch_max(new_total, Relaxed);
                self.counters.num_device_alloc.fetch_add(1, Relaxed);
                Ok(h)
            }
            Err(e) => {
                self.reserved.fetch_sub(self.vm_page, Relaxed);
                Err(match e {
                    ProviderError::OutOfMemory => SegmentFailure::DeviceFull,
                    ProviderError::Failed(m) => SegmentFailure::Driver(m),
                })
            }
        }
    }

    fn destroy_page(&self, page: PageHandle) {
        // SAFETY: the page was unmapped (taken idle or spare) and belongs to this provider.
        unsafe { self.vm().destroy_page(page, self.vm_page as usize) };
        self.reserved.fetch_sub(self.vm_page, Relaxed);
        self.counters.num_device_free.fetch_add(1, Relaxed);
    }

    /// Unmap up to `need` idle pages (least recently used first) from the pools' free blocks.
    fn steal_idle_pages(
        &self,
        need: usize,
        guard: &mut MutexGuard<'_, ()>,
        wait: Wait,
    ) -> Vec<PageHandle> {
        let mut got = Vec::new();
        for (_, pool) in self.pools_with_index() {
            if got.len() >= need {
                break;
            }
            let taken = self.take_idle(pool, Some(need - got.len()), guard, wait);
            got.extend(taken);
        }
        got
    }

    /// The pool tick up to which freed blocks are no longer used by queued work, as proven by
    /// a completed fence; records the next fence. `None` until a fence has completed.
    fn completed_fence(&self, pool: &StreamPool) -> Option<u64> {
        let events = self.events.as_ref()?;
        let mut st = pool.state.lock();
        if let Some((tick, ticket)) = st.fence {
            match events.query(ticket) {
                Ok(true) => {
                    events.release(ticket);
                    st.safe_tick = st.safe_tick.max(tick);
                    st.fence = None;
                }
                Ok(false) => {}
                Err(_) => return None, // a broken stream: leave its memory alone
            }
        }
        if st.fence.is_none() {
            if let Ok(ticket) = events.record(pool.stream) {
                st.fence = Some((st.tick, ticket));
            }
        }
        (st.safe_tick > 0).then_some(st.safe_tick)
    }

    /// Unmap idle pages of one pool (up to `limit`) and return them. With [`Wait::Block`],
    /// waits for the pool's stream (with `vm_lock` released) and may take any idle page; with
    /// [`Wait::Never`], takes only pages freed before the pool's last completed fence.
    fn take_idle(
        &self,
        pool: &StreamPool,
        limit: Option<usize>,
        guard: &mut MutexGuard<'_, ()>,
        wait: Wait,
    ) -> Vec<PageHandle> {
        let limit = limit.unwrap_or(usize::MAX);
        let (candidates, tick) = match (&self.events, wait) {
            // No streams to wait for (a bare allocator, e.g. a replay).
            (None, _) => {
                let mut st = pool.state.lock();
                st.flush_recent();
                let tick = st.tick;
                (st.idle_pages(limit, tick), tick)
            }
            (Some(_), Wait::Never) => {
                // No fence (no event) where there is nothing to take.
                let any_idle = {
                    let mut st = pool.state.lock();
                    st.flush_recent();
                    !st.idle_pages(1, u64::MAX).is_empty()
                };
                if !any_idle {
                    return Vec::new();
                }
                let Some(safe) = self.completed_fence(pool) else {
                    return Vec::new();
                };
                let mut st = pool.state.lock();
                st.flush_recent();
                (st.idle_pages(limit, safe), safe)
            }
            (Some(_), Wait::Block) => {
                let (candidates, tick) = {
                    let mut st = pool.state.lock();
                    st.flush_recent();
                    (st.idle_pages(limit, u64::MAX), st.tick)
                };
                if candidates.is_empty() {
                    return Vec::new();
                }
                if MutexGuard::unlocked(guard, || self.sync_stream(pool)).is_err() {
                    return Vec::new(); // a broken stream: leave its memory alone
                }
                (candidates, tick)
            }
        };
        if candidates.is_empty() {
            return Vec::new();
        }
        let mut taken = pool.state.lock().take_idle_pages(&candidates, tick);
        if !taken.is_empty() {
            self.counters.num_page_steals.fetch_add(1, Relaxed);
            self.counters
                .num_pages_remapped
                .fetch_add(taken.len() as u64, Relaxed);
        }
        taken.sort_unstable();
        let page = self.vm_page as usize;
        let mut i = 0;
        while i < taken.len() {
            // A run of consecutive slots of one segment: one unmap call.
            let (base, first, _) = taken[i];
            let mut len = 1;
            while i + len < taken.len()
                && taken[i + len].0 == base
                && taken[i + len].1 == first + len
            {
                len += 1;
            }
            // SAFETY: these slots were mapped, lie wholly in free blocks not reused since the
            // stream passed the point they were freed at (synchronized, or a completed fence),
            // and were removed from the page table under the pool lock, so nothing uses or maps
            // them concurrently (`vm_lock` is held).
            unsafe { self.vm().unmap(base + first * page, len, page) };
            if self.history.enabled() {
                let addr = (base + first * page) as u64;
                self.history.record(
                    TraceAction::SegmentUnmap,
                    addr,
                    (len * page) as u64,
                    pool.stream.index,
                );
            }
            i += len;
        }
        taken.into_iter().map(|(_, _, p)| PageHandle(p)).collect()
    }

    /// Give every idle page of `pool` back to the device, and whole free ranges too.
    pub(super) fn release_idle_pages(&self, pool: &StreamPool) {
        let mut guard = self.vm_lock.lock();
        for page in self.take_idle(pool, None, &mut guard, Wait::Block) {
            self.destroy_page(page);
        }
        let empty: Vec<usize> = {
            let st = pool.state.lock();
            st.segments
                .iter()
                .filter(|s| s.vm.as_ref().is_some_and(|t| t.mapped == 0))
                .map(|s| s.base)
                .collect()
        };
        for base in empty {
            let seg = pool.state.lock().remove_segment(base, u64::MAX);
            if let Some(seg) = seg {
                self.give_back(seg, pool.stream.index);
            }
        }
    }

    /// Bytes of spare pages (created, unmapped).
    pub(crate) fn spare_bytes(&self) -> u64 {
        self.spare.lock().len() as u64 * self.vm_page
    }

    /// Destroy every spare page.
    pub(super) fn release_spare_pages(&self) {
        let _guard = self.vm_lock.lock();
        let spare: Vec<PageHandle> = std::mem::take(&mut *self.spare.lock());
        spare.into_iter().for_each(|p| self.destroy_page(p));
    }

    /// Bytes of the unmapped holes of an expandable segment, for snapshots.
    pub(super) fn unmapped_ranges(st: &PoolState, seg_pos: usize) -> Vec<(u64, u64)> {
        let seg = &st.segments[seg_pos];
        let Some(table) = &seg.vm else {
            return Vec::new();
        };
        let slots: Vec<usize> = (0..table.pages.len())
            .filter(|&i| table.pages[i] == NO_PAGE)
            .collect();
        runs(&slots)
            .into_iter()
            .map(|(first, len, _)| {
                (
                    seg.base as u64 + first as u64 * table.page_size,
                    len as u64 * table.page_size,
                )
            })
            .collect()
    }
}

impl CachingAllocator {
    /// Unmap and destroy every page of an expandable segment being dropped with its allocator.
    pub(super) fn drop_vm_segment(&self, seg: &crate::alloc::pool::Segment) {
        let Some(table) = &seg.vm else { return };
        let page = table.page_size as usize;
        let slots: Vec<usize> = (0..table.pages.len())
            .filter(|&i| table.pages[i] != NO_PAGE)
            .collect();
        for (first, len, _) in runs(&slots) {
            // SAFETY: the allocator is being dropped: no block of it can be used any more (a
            // `Buffer` borrows the allocator), and its streams were synchronized.
            unsafe { self.vm().unmap(seg.base + first * page, len, page) };
        }
        for &slot in &slots {
            self.destroy_page(PageHandle(table.pages[slot]));
        }
        // SAFETY: every page of the range is unmapped now; the range came from `reserve`.
        unsafe { self.vm().unreserve(seg.base, seg.size as usize) };
    }
}
