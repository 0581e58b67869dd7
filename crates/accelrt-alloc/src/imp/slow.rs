//! The slow path of plain segments (garbage collection, `release_at_peak`, new segments), the
//! retry-then-out-of-memory policy both segment sources use (`retry_or_oom`), the
//! out-of-memory report and the limits it enforces; pending frees and fences (asking the
//! device as little as possible: `safe_tick`, `cover`).

use super::*;
use crate::pool::QUIET_TICKS;

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
        if self.vm_page != 0 && !pool.private {
            return self.alloc_slow_vm(pool_idx, pool, rounded, size);
        }
        self.retry_or_oom(
            size,
            "segment allocation",
            |retry| {
                // Recently freed blocks may coalesce into a fit: never grow before trying that.
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
        if self.config.debug_checks {
            self.debug_check("alloc (new segment)");
        }
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
    /// proven by completed fences (events on the pool's own stream); `None` until one has
    /// completed (`u64::MAX` without an event source: there is no queued work). Never waits,
    /// never records.
    ///
    /// Fences are asked only when an answer can help: none while the safe tick already
    /// reaches `want` (the oldest use the caller would like to be past), and then the oldest
    /// fence recorded at or after `want` first. A stream passes its fences in order, so that
    /// one answer stands for every older fence; when it is done, the newest is asked (done:
    /// all are) and the first pending one found by halving. After a "not yet" that fence and
    /// the newer ones are not asked again at the same pool tick, and with [`Need::Later`] not
    /// before [`QUIET_TICKS`] more (`Fence::pending_at`).
    pub(super) fn safe_tick(&self, pool: &StreamPool, want: u64, need: Need) -> Option<u64> {
        let Some(events) = self.events.as_ref() else {
            return Some(u64::MAX);
        };
        let mut st = pool.state.lock();
        if self.capturing() {
            return st.proven_safe_tick(); // no event query during a capture
        }
        let quiet = match need {
            Need::Now => 1,
            Need::Later => QUIET_TICKS,
        };
        let Some(probe) = st.fences_to_ask(want, quiet) else {
            return st.proven_safe_tick(); // nothing to ask, or asked too recently
        };
        let ask = |ticket: u64| {
            self.driver.event_query.fetch_add(1, Relaxed);
            events.query(ticket)
        };
        // Every fence up to `done` completed, none from `pending` on did.
        let (first, len) = (probe.first, probe.fences.len());
        let (mut done, mut pending) = (None::<usize>, len);
        let mut at = first;
        loop {
            match ask(probe.fences[at].ticket) {
                Ok(true) => done = Some(at),
                Ok(false) => pending = at,
                Err(_) => return None, // a broken stream: leave its memory alone
            }
            let lo = done.map_or(first, |d| d + 1);
            if lo >= pending {
                break;
            }
            at = if pending == len && done == Some(first) {
                len - 1 // the first useful one is done: perhaps all are
            } else {
                lo + (pending - lo) / 2
            };
        }
        let pending = (pending < len).then_some(pending);
        st.apply_fence_answers(&probe, done, pending, |t| events.release(t));
        st.proven_safe_tick()
    }

    /// Make sure a fence on `pool`'s stream covers pool tick `tick` (the last use of memory
    /// the caller wants to reuse or give back later): one in flight recorded at or after it
    /// does; else record one at the stream's current position. With [`MAX_FENCES`] in
    /// flight the newest is replaced (the new one covers everything it did). Only for the
    /// pool being allocated on (its stream is alive; another pool's may be an external stream
    /// its owner destroyed). Asks nothing, never waits.
    pub(super) fn cover(&self, pool: &StreamPool, tick: u64) {
        let Some(events) = self.events.as_ref() else {
            return;
        };
        let mut st = pool.state.lock();
        if tick <= st.newest_covered() || self.capturing() {
            return;
        }
        self.driver.event_record.fetch_add(1, Relaxed);
        if let Ok(ticket) = events.record(pool.stream) {
            if let Some(replaced) = st.add_fence(ticket) {
                events.release(replaced);
            }
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

    /// Finish frees whose events have all completed. The events are asked with the pool's
    /// lock released (`st` is unlocked meanwhile and locked again on return, so the caller
    /// must look at the pool afresh): a driver query takes microseconds, and allocations and
    /// frees of the pool on other threads go on meanwhile. One thread at a time asks for a
    /// pool (`StreamPool::pending_queries`), so a ticket is never released by one thread
    /// while another asks it.
    #[cold]
    pub(super) fn process_pending(&self, pool: &StreamPool, st: &mut MutexGuard<'_, PoolState>) {
        let Some(events) = &self.events else { return };
        if !st.has_pending() || self.capturing() {
            return; // no event queries during a capture: the frees wait for its end
        }
        let stream = pool.stream.index;
        MutexGuard::unlocked(st, || {
            let _asking = pool.pending_queries.lock();
            let asked: Vec<(u32, Vec<u64>)> = {
                let mut st = pool.state.lock();
                self.record_deferred(&mut st, &**events);
                st.pending_tickets()
                    .map(|(block, tickets)| (block, tickets.to_vec()))
                    .collect()
            };
            // A failed query means the stream is broken: waiting would never end, so the
            // block is treated as done with.
            let done: Vec<u32> = asked
                .into_iter()
                .filter(|(_, tickets)| {
                    tickets.iter().all(|&t| {
                        self.driver.event_query.fetch_add(1, Relaxed);
                        events.query(t).unwrap_or(true)
                    })
                })
                .map(|(block, _)| block)
                .collect();
            if done.is_empty() {
                return;
            }
            let mut st = pool.state.lock();
            for block in done {
                // Still pending: only this thread finishes this pool's pending frees now.
                let Some(f) = st.finish_pending(block) else {
                    continue;
                };
                f.tickets.iter().for_each(|&t| events.release(t));
                if self.history.enabled() {
                    self.history.record(
                        TraceAction::FreeCompleted,
                        f.addr as u64,
                        f.requested,
                        stream,
                    );
                }
            }
        });
    }

    /// Record the events of frees made during a capture (none could be recorded then).
    fn record_deferred(&self, st: &mut PoolState, events: &dyn StreamEvents) {
        st.record_deferred(|s| {
            self.driver.event_record.fetch_add(1, Relaxed);
            match events.record(s) {
                Ok(t) => Some(t),
                // A stream that cannot record (destroyed since): wait for the whole device
                // instead (rare), so the block is not reused under its work.
                Err(_) => {
                    self.driver.synchronize.fetch_add(1, Relaxed);
                    let _ = events.synchronize_device(self.device.index);
                    None
                }
            }
        });
    }

    /// Wait for every pending free of one pool, without holding its lock while waiting.
    pub(super) fn sync_pending(&self, pool: &StreamPool) -> Result<()> {
        let Some(events) = &self.events else {
            return Ok(());
        };
        let tickets: Vec<u64> = pool
            .state
            .lock()
            .pending_tickets()
            .flat_map(|(_, tickets)| tickets.iter().copied())
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

/// Whether a fence's answer is needed now ([`CachingAllocator::safe_tick`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// Memory is needed now: without the answer a chunk or segment is created, or the
    /// allocation fails. Asked again at the next pool tick after a "not yet".
    Now,
    /// Housekeeping that can wait (unmapping lent ranges, which hold no memory of their own):
    /// asked again only [`QUIET_TICKS`] after a "not yet".
    Later,
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
