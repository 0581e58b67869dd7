//! The slow path of plain segments (garbage collection, `release_at_peak`, new segments), the
//! retry-then-out-of-memory policy both segment sources use (`retry_or_oom`), and giving
//! cached memory back to the device (`release_cached`, `release_oldest_until`). The limits
//! and the out-of-memory report are in `limits.rs`, fences in `fences.rs`.

use super::fences::Need;
use super::*;

impl CachingAllocator {
    // ---- the slow path ---------------------------------------------------------------------

    /// No cached block fits: collect garbage if over a soft limit, take a new segment, and on
    /// failure let callbacks free memory, release the whole cache and try once more
    /// (`retry_or_oom`, shared with expandable segments).
    #[cold]
    #[inline(never)]
    pub(super) fn alloc_slow(
        &self,
        pool_idx: u32,
        pool: &StreamPool,
        rounded: u64,
        size: u64,
    ) -> Result<usize> {
        let result = if self.vm_page != 0 && !pool.private {
            self.alloc_slow_vm(pool_idx, pool, rounded, size)
        } else {
            self.retry_or_oom(
                size,
                "segment allocation",
                |retry| {
                    // Recently freed blocks may coalesce into a fit: never grow before that.
                    if let Some(ptr) = self.try_cached(pool, rounded, size) {
                        return Ok(Ok(ptr));
                    }
                    if !retry {
                        self.collect_garbage(segment_size(rounded), pool);
                        if self.config.release_at_peak {
                            self.release_before_new_peak(segment_size(rounded), pool);
                        }
                    }
                    Ok(self.reserve_for(rounded).map(|(base, seg_size)| {
                        self.add_new_segment(pool_idx, pool, base, seg_size, rounded, size)
                    }))
                },
                || self.try_cached(pool, rounded, size),
            )
        };
        // A new peak reached on the way is recorded now that the memory is in place.
        self.settle_peak();
        result
    }

    /// The one retry-then-out-of-memory policy of both segment sources (plain segments and
    /// expandable ones). `attempt(retry)` looks for the memory (the cache, then the device)
    /// and says `Err(refusal)` when the device or a limit refused it (an `Err` of the outer
    /// result is final); on a refusal of the device or a limit the `AllocationFailed`
    /// callbacks run (they may free memory), `after_callbacks` looks into the cache once
    /// more, every cached segment and idle chunk goes back to the device (after the pending
    /// frees' events), and `attempt(true)` runs; a second refusal is the out-of-memory error
    /// with its report. A failed driver call is never retried: it is an error naming `call`.
    pub(super) fn retry_or_oom(
        &self,
        size: u64,
        call: &'static str,
        mut attempt: impl FnMut(bool) -> Result<std::result::Result<usize, SegmentFailure>>,
        after_callbacks: impl FnOnce() -> Option<usize>,
    ) -> Result<usize> {
        let mut after_callbacks = Some(after_callbacks);
        for retry in [false, true] {
            let failure = match attempt(retry)? {
                Ok(ptr) => return Ok(ptr),
                Err(SegmentFailure::Driver(message, code)) => {
                    return Err(Error::Driver {
                        call,
                        code,
                        message,
                    })
                }
                Err(failure) => failure,
            };
            if retry {
                let limit = match failure {
                    SegmentFailure::Limit(limit) => limit,
                    _ => HardLimit::Device,
                };
                return Err(self.out_of_memory(size, limit));
            }
            self.fire(0, size, AllocatorEvent::AllocationFailed);
            if let Some(ptr) = after_callbacks.take().and_then(|f| f()) {
                return Ok(ptr);
            }
            self.counters.num_alloc_retries.fetch_add(1, Relaxed);
            self.release_cached(true)?;
        }
        unreachable!("the second attempt returns")
    }

    /// Put a segment just reserved in `pool` and hand out its first block.
    fn add_new_segment(
        &self,
        pool_idx: u32,
        pool: &StreamPool,
        base: usize,
        seg_size: u64,
        rounded: u64,
        size: u64,
    ) -> usize {
        self.pages.insert(base, seg_size as usize, pool_idx);
        let mut st = pool.state.lock();
        let block = st.add_segment(base, seg_size, rounded, size, &self.pool_config);
        if self.history.enabled() {
            let stream = pool.stream.index;
            self.history
                .record(TraceAction::SegmentAlloc, base as u64, seg_size, stream);
            self.note_alloc(&mut st, block, stream);
        }
        drop(st);
        self.fire(base, seg_size, AllocatorEvent::Allocated);
        base
    }

    /// A new segment for a block of `rounded` bytes: the usual segment size, or, when that
    /// does not fit, the smallest segment that holds the block (PyTorch fails here instead).
    pub(super) fn reserve_for(
        &self,
        rounded: u64,
    ) -> std::result::Result<(usize, u64), SegmentFailure> {
        let preferred = segment_size(rounded);
        match self.reserve_segment(preferred) {
            Ok(base) => Ok((base, preferred)),
            Err(e @ SegmentFailure::Driver(..)) => Err(e),
            Err(e) => {
                let minimal = round_up(rounded, MIN_SEGMENT);
                if minimal < preferred {
                    self.reserve_segment(minimal).map(|base| (base, minimal))
                } else {
                    Err(e)
                }
            }
        }
    }

    pub(super) fn try_cached(&self, pool: &StreamPool, rounded: u64, size: u64) -> Option<usize> {
        let mut st = pool.state.lock();
        self.process_pending(pool, &mut st);
        st.flush_recent();
        let block = st.take_cached(rounded, size, &self.pool_config);
        if block == NIL {
            return None;
        }
        if self.history.enabled() {
            self.note_alloc(&mut st, block, pool.stream.index);
        }
        let (ptr, block_size) = (st.block(block).addr, st.block(block).size);
        drop(st);
        self.fire(ptr, block_size, AllocatorEvent::Recycled);
        Some(ptr)
    }

    /// Wait until `pool`'s stream has passed all work queued so far (no-op without events).
    ///
    /// Waits for the whole device, not with an event on `pool`'s stream: the stream may be a
    /// wrapped external one its owner has destroyed since (recording on it would be undefined
    /// behaviour in the driver). These waits are rare (memory going back to the device, the
    /// last resort before an out-of-memory), as PyTorch's own device synchronizations are.
    pub(super) fn sync_stream(&self, pool: &StreamPool) -> Result<()> {
        match &self.events {
            Some(events) => {
                self.driver.synchronize.fetch_add(1, Relaxed);
                events.synchronize_device(pool.stream.device.index)
            }
            None => Ok(()),
        }
    }

    /// Whether expandable segments are in use (asked for, and the device supports them).
    pub fn is_expandable(&self) -> bool {
        self.vm_page != 0
    }

    pub(super) fn reserve_segment(
        &self,
        seg_size: u64,
    ) -> std::result::Result<usize, SegmentFailure> {
        let new_total = self.claim_reserved(seg_size)?;
        let allocated = self.provider.allocate(seg_size as usize);
        self.driver.segment_alloc.fetch_add(1, Relaxed);
        match allocated {
            Ok(base) => {
                let before = self.reserved_peak.fetch_max(new_total, Relaxed);
                self.note_new_peak(before, new_total);
                let segs = self.segments.fetch_add(1, Relaxed) + 1;
                self.segments_peak.fetch_max(segs, Relaxed);
                self.counters.num_device_alloc.fetch_add(1, Relaxed);
                self.segment_index.write().insert(base, seg_size);
                Ok(base)
            }
            Err(e) => {
                self.reserved.fetch_sub(seg_size, Relaxed);
                Err(SegmentFailure::from(e))
            }
        }
    }

    pub(super) fn give_back(&self, seg: Segment, stream: u32) {
        self.segment_index.write().remove(&seg.base);
        self.pages.remove(seg.base, seg.size as usize);
        self.segments.fetch_sub(1, Relaxed);
        if seg.vm.is_some() {
            debug_assert_eq!(
                seg.memory(),
                0,
                "an expandable range is given back only once unmapped"
            );
            // SAFETY: the range came from `reserve` with this size, was removed from its pool,
            // and has no page mapped (all of them were idle and destroyed).
            unsafe {
                self.provider
                    .virtual_memory()
                    .expect("expandable mode")
                    .unreserve(seg.base, seg.size as usize)
            };
            self.driver.unreserve.fetch_add(1, Relaxed);
            return;
        }
        // SAFETY: `seg` was removed from its pool, which held the only record of it; it came
        // from `provider.allocate` with this size and no block in it is live (it was whole
        // and free), and its stream was synchronized, so nothing refers to the memory any more.
        unsafe { self.provider.free(seg.base, seg.size as usize) };
        self.driver.segment_free.fetch_add(1, Relaxed);
        self.reserved.fetch_sub(seg.size, Relaxed);
        self.counters.num_device_free.fetch_add(1, Relaxed);
        if self.history.enabled() {
            self.history
                .record(TraceAction::SegmentFree, seg.base as u64, seg.size, stream);
        }
        self.fire(seg.base, seg.size, AllocatorEvent::Released);
    }

    pub(super) fn initialized_pools(&self) -> impl Iterator<Item = &StreamPool> {
        self.pools_with_index().map(|(_, p)| p)
    }

    /// Give every whole cached segment (and, in expandable mode, every idle chunk) back to the
    /// device. With `wait`, first wait for the events of pending cross-stream frees so their
    /// blocks can go too. One device-wide wait covers everything: cached memory may still be
    /// used by queued work (a device free would wait anyway; unmapping host memory would not).
    pub(super) fn release_cached(&self, wait: bool) -> Result<()> {
        if self.capturing() {
            // Giving memory back waits for the device, which a capture forbids (PyTorch's
            // allocator does not release cached blocks while captures are underway either).
            return Ok(());
        }
        if wait {
            self.counters.num_sync_all_streams.fetch_add(1, Relaxed);
            for pool in self.initialized_pools() {
                self.sync_pending(pool)?;
            }
        }
        let mut releasable = false;
        for pool in self.initialized_pools() {
            let mut st = pool.state.lock();
            self.process_pending(pool, &mut st);
            st.flush_recent();
            releasable |= !st.releasable().is_empty();
        }
        let vm = self.vm_page != 0;
        releasable |= vm && self.reserved.load(Relaxed) > self.allocated_bytes();
        if !releasable {
            return Ok(());
        }
        if self.fence_all_pools().is_err() {
            return Ok(()); // a broken stream: leave its memory alone
        }
        for (pi, pool) in self.pools_with_index() {
            let freed = pool.state.lock().take_releasable_segments();
            freed
                .into_iter()
                .for_each(|s| self.give_back(s, pool.stream.index));
            if vm && !pool.private {
                self.release_idle_pages(pool, pi as u32);
            }
        }
        if vm {
            self.release_spare_pages();
        }
        Ok(())
    }

    /// Under a soft limit (low watermark, or garbage_collection_threshold), release whole
    /// cached segments, least recently used first, until `incoming` more bytes fit.
    pub(super) fn collect_garbage(&self, incoming: u64, requester: &StreamPool) {
        if let Some(soft) = self.soft_limit() {
            self.release_oldest_until(soft, incoming, Some(requester));
        }
    }

    /// Growing by `incoming` would set a new peak of reserved memory: first give back whole
    /// cached segments (they cannot serve this request, or it would have found them), least
    /// recently used first, until the old peak holds or none is left.
    pub(super) fn release_before_new_peak(&self, incoming: u64, requester: &StreamPool) {
        self.release_oldest_until(self.reserved_peak.load(Relaxed), incoming, Some(requester));
    }

    /// Give back whole cached segments of every pool, least recently used first, until
    /// `reserved + incoming <= target` or none is left. Never waits: a segment goes only once
    /// a completed fence on its pool's stream shows the work that used it done (a device free
    /// would wait for the device, and unmapping host memory would not wait at all). Where
    /// `requester`'s own segments were too recent, a fence is recorded to cover them next time.
    pub(super) fn release_oldest_until(
        &self,
        target: u64,
        incoming: u64,
        requester: Option<&StreamPool>,
    ) {
        let fits = || self.reserved.load(Relaxed) + incoming <= target;
        if fits() {
            return;
        }
        let mut candidates: Vec<(u64, usize, usize)> = Vec::new(); // (age, pool, base)
        let mut safe: Vec<(usize, u64)> = Vec::new(); // (pool, safe tick)
        for (pi, pool) in self.pools_with_index() {
            let before = candidates.len();
            {
                let mut st = pool.state.lock();
                st.flush_recent();
                candidates.extend(
                    st.releasable()
                        .into_iter()
                        .map(|(age, i)| (age, pi, st.segments()[i].base)),
                );
            }
            if let Some(oldest) = candidates[before..].iter().map(|c| c.0).min() {
                let since = self.safe_tick(pool, oldest, Need::Now).unwrap_or(0);
                safe.push((pi, since));
            }
        }
        candidates.sort_unstable();
        // The newest of the requester's segments too recent to go: a fence should cover it.
        let mut too_recent: Option<u64> = None;
        for (age, pi, base) in candidates {
            if fits() {
                break;
            }
            let since = safe.iter().find(|s| s.0 == pi).map_or(0, |s| s.1);
            if age > since {
                if requester.is_some_and(|r| std::ptr::eq(r, self.pool_at(pi as u32))) {
                    too_recent = too_recent.max(Some(age));
                }
                continue;
            }
            let pool = self.pool_at(pi as u32);
            let seg = pool.state.lock().remove_segment(base, since);
            if let Some(seg) = seg {
                self.give_back(seg, pool.stream.index);
            }
        }
        if let (Some(age), Some(r), false) = (too_recent, requester, fits()) {
            self.cover(r, age);
        }
    }
}
