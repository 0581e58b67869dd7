//! The slow path of plain segments (garbage collection, `release_at_peak`, new segments,
//! release-and-retry, the out-of-memory report) and the limits it enforces.

use super::*;

impl CachingAllocator {
    // ---- the slow path ---------------------------------------------------------------------

    /// No cached block fits: collect garbage if over a soft limit, take a new segment, and on
    /// failure let callbacks free memory, release the whole cache and try once more.
    #[cold]
    #[inline(never)]
    pub(super) fn alloc_slow(
        &self,
        pool_idx: u32,
        pool: &StreamPool,
        rounded: u64,
        size: u64,
    ) -> Result<usize> {
        if self.vm_page != 0 && !pool.private {
            return self.alloc_slow_vm(pool_idx, pool, rounded, size);
        }
        // Recently freed blocks may coalesce into a fit: never grow before trying that.
        if let Some(ptr) = self.try_cached(pool, rounded, size) {
            return Ok(ptr);
        }
        self.collect_garbage(segment_size(rounded), pool);
        if self.config.release_at_peak {
            self.release_before_new_peak(segment_size(rounded), pool);
        }
        let mut attempt = self.reserve_for(rounded);
        if matches!(
            attempt,
            Err(SegmentFailure::Limit(_)) | Err(SegmentFailure::DeviceFull)
        ) {
            self.fire(0, size, AllocatorEvent::AllocationFailed);
            if let Some(ptr) = self.try_cached(pool, rounded, size) {
                return Ok(ptr);
            }
            self.counters.num_alloc_retries.fetch_add(1, Relaxed);
            self.release_cached(true)?;
            if let Some(ptr) = self.try_cached(pool, rounded, size) {
                return Ok(ptr);
            }
            attempt = self.reserve_for(rounded);
        }
        match attempt {
            Ok((base, seg_size)) => {
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
                if self.config.debug_checks {
                    self.debug_check("alloc (new segment)");
                }
                Ok(base)
            }
            Err(SegmentFailure::Driver(message, code)) => Err(Error::Driver {
                call: "segment allocation",
                code,
                message,
            }),
            Err(SegmentFailure::Limit(limit)) => Err(self.out_of_memory(size, limit)),
            Err(SegmentFailure::DeviceFull) => Err(self.out_of_memory(size, HardLimit::Device)),
        }
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
        self.process_pending(&mut st, pool.stream.index);
        st.flush_recent();
        let block = st.take_cached(rounded, size, &self.pool_config);
        if block == NIL {
            return None;
        }
        if self.history.enabled() {
            self.note_alloc(&mut st, block, pool.stream.index);
        }
        let (ptr, block_size) = (
            st.blocks[block as usize].addr,
            st.blocks[block as usize].size,
        );
        drop(st);
        self.fire(ptr, block_size, AllocatorEvent::Recycled);
        Some(ptr)
    }

    /// The hard limit on reserved bytes and its description.
    pub(super) fn hard_limit(&self) -> Option<(u64, HardLimit)> {
        let (_, total) = self.provider.memory_info();
        let mut limit: Option<(u64, HardLimit)> = None;
        let fraction = f64::from_bits(self.limits.fraction.load(Relaxed));
        if fraction >= 0.0 {
            let bytes = (total as f64 * fraction) as u64;
            limit = Some((bytes, HardLimit::Fraction { fraction, bytes }));
        }
        let high = f64::from_bits(self.limits.high_watermark.load(Relaxed));
        if high > 0.0 {
            let recommended = self.provider.recommended_max();
            let bytes = (recommended as f64 * high) as u64;
            if limit.as_ref().is_none_or(|(l, _)| bytes < *l) {
                limit = Some((
                    bytes,
                    HardLimit::HighWatermark {
                        ratio: high,
                        recommended,
                        bytes,
                    },
                ));
            }
        }
        limit
    }

    /// The soft limit above which cached segments are released before taking new ones.
    pub(super) fn soft_limit(&self) -> Option<u64> {
        let low = f64::from_bits(self.limits.low_watermark.load(Relaxed));
        let mut soft = (low > 0.0).then(|| (self.provider.recommended_max() as f64 * low) as u64);
        if let Some(t) = self.garbage_collection_threshold() {
            let fraction = f64::from_bits(self.limits.fraction.load(Relaxed));
            if fraction >= 0.0 {
                let bytes = (self.provider.memory_info().1 as f64 * fraction * t) as u64;
                soft = Some(soft.map_or(bytes, |s| s.min(bytes)));
            }
        }
        soft
    }

    /// Count `bytes` more as reserved if the hard limit allows; returns the new total.
    pub(super) fn claim_reserved(&self, bytes: u64) -> std::result::Result<u64, SegmentFailure> {
        let limit = self.hard_limit();
        let mut cur = self.reserved.load(Relaxed);
        loop {
            let next = cur.saturating_add(bytes);
            if let Some((max, ref what)) = limit {
                if next > max {
                    return Err(SegmentFailure::Limit(*what));
                }
            }
            match self
                .reserved
                .compare_exchange_weak(cur, next, Relaxed, Relaxed)
            {
                Ok(_) => return Ok(next),
                Err(actual) => cur = actual,
            }
        }
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

    /// The pool tick up to which memory freed in `pool` is no longer used by queued work, as
    /// proven by completed fences (events on the pool's own stream), `None` until one has
    /// completed (`u64::MAX` without an event source: there is no queued work). With
    /// `cover: Some(tick)`, records a new fence unless one in flight already covers `tick`:
    /// only for the pool being allocated on (its stream is alive; another pool's may be an
    /// external stream its owner destroyed). Never waits.
    pub(super) fn fence(&self, pool: &StreamPool, cover: Option<u64>) -> Option<u64> {
        let Some(events) = self.events.as_ref() else {
            return Some(u64::MAX);
        };
        let mut st = pool.state.lock();
        if self.capturing() {
            // No event query or record during a capture: what completed fences proved so far.
            return (st.safe_tick > 0).then_some(st.safe_tick);
        }
        while let Some(&(tick, ticket)) = st.fences.front() {
            self.driver.event_query.fetch_add(1, Relaxed);
            match events.query(ticket) {
                Ok(true) => {
                    events.release(ticket);
                    st.safe_tick = st.safe_tick.max(tick);
                    st.fences.pop_front();
                }
                Ok(false) => break,
                Err(_) => return None, // a broken stream: leave its memory alone
            }
        }
        let newest = st.fences.back().map_or(st.safe_tick, |&(t, _)| t);
        if let Some(tick) = cover {
            if tick > newest && st.fences.len() < crate::pool::MAX_FENCES {
                self.driver.event_record.fetch_add(1, Relaxed);
                if let Ok(ticket) = events.record(pool.stream) {
                    let now = st.tick;
                    st.fences.push_back((now, ticket));
                }
            }
        }
        (st.safe_tick > 0).then_some(st.safe_tick)
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
                self.reserved_peak.fetch_max(new_total, Relaxed);
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

    /// Finish frees whose events have all completed.
    #[cold]
    pub(super) fn process_pending(&self, st: &mut PoolState, stream: u32) {
        let Some(events) = &self.events else { return };
        if self.capturing() {
            return; // no event queries during a capture: the frees wait for its end
        }
        let mut i = 0;
        while i < st.pending.len() {
            if !st.pending[i].deferred.is_empty() {
                // Freed during a capture: record its streams' events now.
                let streams = std::mem::take(&mut st.pending[i].deferred);
                for s in streams {
                    self.driver.event_record.fetch_add(1, Relaxed);
                    match events.record(s) {
                        Ok(t) => st.pending[i].tickets.push(t),
                        // A stream that cannot record (destroyed since): wait for the whole
                        // device instead (rare), so the block is not reused under its work.
                        Err(_) => {
                            self.driver.synchronize.fetch_add(1, Relaxed);
                            let _ = events.synchronize_device(self.device.index);
                        }
                    }
                }
            }
            // A failed query means the stream is broken: waiting would never end, so the block
            // is treated as done with.
            let done = st.pending[i].tickets.iter().all(|&t| {
                self.driver.event_query.fetch_add(1, Relaxed);
                events.query(t).unwrap_or(true)
            });
            if done {
                let p = st.pending.swap_remove(i);
                p.tickets.iter().for_each(|&t| events.release(t));
                if self.history.enabled() {
                    let b = &st.blocks[p.block as usize];
                    self.history.record(
                        TraceAction::FreeCompleted,
                        b.addr as u64,
                        b.requested,
                        stream,
                    );
                }
                st.release_to_cache(p.block);
            } else {
                i += 1;
            }
        }
    }

    /// Wait for every pending free of one pool, without holding its lock while waiting.
    pub(super) fn sync_pending(&self, pool: &StreamPool) -> Result<()> {
        let Some(events) = &self.events else {
            return Ok(());
        };
        let tickets: Vec<u64> = pool
            .state
            .lock()
            .pending
            .iter()
            .flat_map(|p| p.tickets.iter().copied())
            .collect();
        for t in tickets {
            self.driver.synchronize.fetch_add(1, Relaxed);
            events.synchronize(t)?;
        }
        Ok(())
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
            self.process_pending(&mut st, pool.stream.index);
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
                        .map(|(age, i)| (age, pi, st.segments[i].base)),
                );
            }
            if candidates.len() > before {
                safe.push((pi, self.fence(pool, None).unwrap_or(0)));
            }
        }
        candidates.sort_unstable();
        let mut too_recent = false;
        for (age, pi, base) in candidates {
            if fits() {
                break;
            }
            let since = safe.iter().find(|s| s.0 == pi).map_or(0, |s| s.1);
            if age > since {
                too_recent |= requester.is_some_and(|r| std::ptr::eq(r, self.pool_at(pi as u32)));
                continue;
            }
            let pool = self.pool_at(pi as u32);
            let seg = pool.state.lock().remove_segment(base, since);
            if let Some(seg) = seg {
                self.give_back(seg, pool.stream.index);
            }
        }
        if let (true, Some(r)) = (too_recent && !fits(), requester) {
            let tick = r.state.lock().tick;
            self.fence(r, Some(tick));
        }
    }

    #[cold]
    pub(super) fn out_of_memory(&self, requested: u64, limit: HardLimit) -> Error {
        self.counters.num_ooms.fetch_add(1, Relaxed);
        let (free, total) = self.provider.memory_info();
        if self.history.enabled() {
            self.history
                .record(TraceAction::Oom, free, requested, u32::MAX);
        }
        let info = OomInfo {
            device: self.device,
            requested,
            device_total: total,
            device_free: free,
        };
        for obs in self.oom_observers.read().clone() {
            obs(&info);
        }
        let allocated = self.allocated_bytes();
        let reserved = self.reserved.load(Relaxed);
        let unallocated = reserved.saturating_sub(allocated);
        let hint = if let Some(hint) = limit.hint() {
            hint.to_string()
        } else if unallocated > requested / 2 && unallocated > (32 << 20) {
            "Much of the reserved memory is cached but unallocated: fragmentation. Try expandable_segments:true, \
             or max_split_size_mb to keep large blocks whole."
                .to_string()
        } else {
            "Free memory (tensors, other processes on the device) or reduce the working set."
                .to_string()
        };
        Error::OutOfMemory(Box::new(OomReport {
            device: self.device.to_string(),
            requested,
            device_total: total,
            device_free: free,
            allocated,
            reserved_unallocated: unallocated,
            limit: limit.to_string(),
            hint,
        }))
    }
}

/// The limit an allocation hit: the device itself, or one of the configured caps.
#[derive(Debug, Clone, Copy)]
pub(super) enum HardLimit {
    Device,
    /// `per_process_memory_fraction` of the device's total.
    Fraction {
        fraction: f64,
        bytes: u64,
    },
    /// `high_watermark_ratio` times the recommended maximum.
    HighWatermark {
        ratio: f64,
        recommended: u64,
        bytes: u64,
    },
}

impl HardLimit {
    /// What to try when this limit is hit (`None`: it depends on the memory's state).
    fn hint(&self) -> Option<&'static str> {
        match self {
            HardLimit::Device => None,
            HardLimit::Fraction { .. } => {
                Some("Raise per_process_memory_fraction, or free memory before this allocation.")
            }
            HardLimit::HighWatermark { .. } => Some(
                "Raise high_watermark_ratio (0 disables the limit), or free memory before this allocation.",
            ),
        }
    }
}

/// The limit as the OOM report names it.
impl std::fmt::Display for HardLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            HardLimit::Device => f.write_str("device memory"),
            HardLimit::Fraction { fraction, bytes } => write!(
                f,
                "per_process_memory_fraction {fraction} ({})",
                format_size(bytes)
            ),
            HardLimit::HighWatermark {
                ratio,
                recommended,
                bytes,
            } => write!(
                f,
                "high_watermark_ratio {ratio} x recommended max {} ({})",
                format_size(recommended),
                format_size(bytes)
            ),
        }
    }
}
