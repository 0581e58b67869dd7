//! Figures (statistics and driver calls), history and snapshots, callbacks, observers and
//! deferred errors.

use super::*;
use crate::chunks::ChunkTable;

/// An out-of-memory observer, called just before `Error::OutOfMemory` is returned.
pub type OomObserver = Arc<dyn Fn(&OomInfo) + Send + Sync>;

/// What an out-of-memory observer is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OomInfo {
    pub device: Device,
    pub requested: u64,
    pub device_total: u64,
    pub device_free: u64,
}

impl CachingAllocator {
    // ---- figures ---------------------------------------------------------------------------

    /// Bytes held from the device (MPS `getTotalAllocatedMemory`).
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved.load(Relaxed)
    }
    /// Bytes of live blocks (MPS `getCurrentAllocatedMemory`).
    pub fn allocated_bytes(&self) -> u64 {
        self.initialized_pools()
            .map(|p| p.state.lock().allocated_bytes())
            .sum()
    }
    /// Bytes the device reports as allocated through the provider.
    pub fn driver_allocated(&self) -> u64 {
        self.provider.driver_allocated()
    }
    /// The device's recommended working-set size.
    pub fn recommended_max(&self) -> u64 {
        self.provider.recommended_max()
    }

    /// Current statistics (see [`MemoryStats`] for what the aggregate peaks mean).
    pub fn stats(&self) -> MemoryStats {
        let mut s = MemoryStats::default();
        for pool in self.initialized_pools() {
            let st = pool.state.lock();
            let [small, large] = st.stats();
            s.small_pool = s.small_pool.merged(small);
            s.large_pool = s.large_pool.merged(large);
            s.combined = s.combined.merged(st.combined_stats());
        }
        let c = &self.counters;
        s.counters = EventCounters {
            num_alloc_retries: c.num_alloc_retries.load(Relaxed),
            num_ooms: c.num_ooms.load(Relaxed),
            num_sync_all_streams: c.num_sync_all_streams.load(Relaxed),
            num_device_alloc: c.num_device_alloc.load(Relaxed),
            num_device_free: c.num_device_free.load(Relaxed),
            num_page_steals: c.num_page_steals.load(Relaxed),
            num_pages_remapped: c.num_pages_remapped.load(Relaxed),
            num_moves_deferred: c.num_moves_deferred.load(Relaxed),
            num_moves_exempt: c.num_moves_exempt.load(Relaxed),
            move_time_drawn_peak_us: c.move_time_drawn_peak_us.load(Relaxed),
            vm_call_us: c.vm_call_ns.load(Relaxed) / 1_000,
        };
        s.driver_calls = self.driver.snapshot();
        s.reserved_bytes_peak = self.reserved_peak.load(Relaxed);
        s.segment_peak = self.segments_peak.load(Relaxed);
        s
    }

    /// Set every peak to its current value.
    pub fn reset_peak_stats(&self) {
        for pool in self.initialized_pools() {
            pool.state.lock().reset_peak_stats();
        }
        self.reserved_peak
            .store(self.reserved.load(Relaxed), Relaxed);
        self.segments_peak
            .store(self.segments.load(Relaxed), Relaxed);
        let drawn = self.vm_state.lock().move_time.drawn_us();
        self.counters
            .move_time_drawn_peak_us
            .store(drawn as u64, Relaxed);
    }

    /// Zero the allocated/freed totals and the event counters.
    pub fn reset_accumulated_stats(&self) {
        for pool in self.initialized_pools() {
            pool.state.lock().reset_accumulated_stats();
        }
        let c = &self.counters;
        for a in [
            &c.num_alloc_retries,
            &c.num_ooms,
            &c.num_sync_all_streams,
            &c.num_device_alloc,
            &c.num_device_free,
            &c.num_page_steals,
            &c.num_pages_remapped,
            &c.num_moves_deferred,
            &c.num_moves_exempt,
            &c.vm_call_ns,
        ] {
            a.store(0, Relaxed);
        }
        for a in self.driver.all() {
            a.store(0, Relaxed);
        }
    }

    // ---- history and snapshots -------------------------------------------------------------

    /// Start (`Some`) or stop (`None`) recording allocator events into a ring buffer
    /// (PyTorch's `_record_memory_history`). Stopping keeps what was recorded.
    pub fn record_memory_history(&self, config: Option<HistoryConfig>) {
        self.history.configure(config);
        self.rare.set(RareFlags::HISTORY, self.history.enabled());
    }

    /// How history is being recorded (`None` when it is off).
    pub fn memory_history_config(&self) -> Option<HistoryConfig> {
        self.history.config()
    }

    /// The recorded events, oldest first.
    pub fn memory_history(&self) -> Vec<TraceEntry> {
        self.history.entries()
    }

    /// Forget the recorded events.
    pub fn clear_memory_history(&self) {
        self.history.clear();
    }

    #[cold]
    pub(super) fn note_alloc(&self, st: &mut PoolState, block: u32, stream: u32) {
        let b = st.block(block);
        let (addr, requested) = (b.addr as u64, b.requested);
        self.history
            .record(TraceAction::Alloc, addr, requested, stream);
        if let Some(frames) = self.history.context() {
            st.set_frames(block, frames);
        }
    }

    #[cold]
    pub(super) fn note_free(&self, st: &mut PoolState, block: u32, stream: u32) {
        let b = st.block(block);
        let (addr, requested, pending) = (b.addr as u64, b.requested, b.has_extras);
        self.history
            .record(TraceAction::FreeRequested, addr, requested, stream);
        if !pending {
            self.history
                .record(TraceAction::FreeCompleted, addr, requested, stream);
        }
        st.forget_frames(block);
    }

    /// Every segment with its blocks, and the recorded history (PyTorch's `_snapshot`).
    /// Segments are ordered by address.
    ///
    /// Taking a snapshot coalesces the blocks waiting in recent-free slots.
    ///
    /// The `snapshot` action this records lands after the history it returns, as PyTorch's
    /// does: a snapshot's own history ends with the last real event, and the next snapshot's
    /// history shows where this one was taken.
    pub fn memory_snapshot(&self) -> MemorySnapshot {
        let mut segments = Vec::new();
        for pool in self.initialized_pools() {
            let mut st = pool.state.lock();
            // Blocks waiting uncoalesced in recent-free slots are free memory like their
            // neighbours: coalesced first, the segments show the layout PyTorch's would (and
            // the one a checkpoint of the pool restores).
            st.flush_recent();
            for (pos, seg) in st.segments().iter().enumerate() {
                let mut info = SegmentInfo {
                    device: self.device.index,
                    address: seg.base as u64,
                    total_size: seg.size,
                    stream: pool.stream.index,
                    segment_type: seg.kind,
                    segment_pool_id: (st.pool_id().0, st.pool_id().1),
                    is_expandable: seg.vm.is_some(),
                    unmapped: Self::unmapped_ranges(&st, pos),
                    allocated_size: 0,
                    active_size: 0,
                    requested_size: 0,
                    blocks: Vec::new(),
                };
                for (cur, b) in st.blocks_of(seg) {
                    let state = match b.state {
                        BlockState::Allocated => BlockStatus::ActiveAllocated,
                        BlockState::Pending => BlockStatus::ActivePendingFree,
                        _ => BlockStatus::Inactive,
                    };
                    if state == BlockStatus::ActiveAllocated {
                        info.allocated_size += b.size;
                        info.requested_size += b.requested;
                    }
                    if state != BlockStatus::Inactive {
                        info.active_size += b.size;
                    }
                    info.blocks.push(BlockInfo {
                        address: b.addr as u64,
                        size: b.size,
                        requested_size: b.requested,
                        state,
                        frames: st.frames(cur).cloned(),
                    });
                }
                segments.push(info);
            }
        }
        segments.sort_by_key(|s| s.address);
        let history = self.history.entries();
        if self.history.enabled() {
            self.history.record(TraceAction::Snapshot, 0, 0, u32::MAX);
        }
        MemorySnapshot {
            device: self.device,
            segments,
            history,
        }
    }

    // ---- callbacks, observers, deferred errors ---------------------------------------------

    /// Register a callback for allocator events (see [`AllocatorEvent`] for when each fires).
    pub fn add_callback(&self, callback: AllocatorCallback) -> CallbackId {
        let id = CallbackId(self.next_callback.fetch_add(1, Relaxed));
        let mut cbs = self.callbacks.write();
        cbs.push((id, callback));
        self.rare.set(RareFlags::CALLBACKS, true);
        id
    }

    /// Remove a callback; false if it was not registered.
    pub fn remove_callback(&self, id: CallbackId) -> bool {
        let mut cbs = self.callbacks.write();
        let before = cbs.len();
        cbs.retain(|(i, _)| *i != id);
        self.rare.set(RareFlags::CALLBACKS, !cbs.is_empty());
        cbs.len() != before
    }

    /// Register an observer told of every out-of-memory before the error is returned.
    pub fn attach_oom_observer(&self, observer: OomObserver) {
        self.oom_observers.write().push(observer);
    }

    /// Whether any callback would fire: this allocator's, or a global one
    /// ([`crate::callbacks::add_allocator_callback`]). Two relaxed loads.
    #[inline]
    pub(super) fn callbacks_on(&self) -> bool {
        self.rare.has(RareFlags::CALLBACKS) || crate::callbacks::has_allocator_callbacks()
    }

    #[cold]
    #[inline(never)]
    pub(super) fn fire(&self, ptr: usize, size: u64, event: AllocatorEvent) {
        if self.rare.has(RareFlags::CALLBACKS) {
            let cbs: Vec<AllocatorCallback> = self
                .callbacks
                .read()
                .iter()
                .map(|(_, c)| c.clone())
                .collect();
            for cb in cbs {
                cb(ptr, size, event);
            }
        }
        crate::callbacks::fire_allocator_callbacks(self.device, ptr, size, event);
    }

    /// Keep the error of a free that a `Drop` could not return, for the next call.
    #[cold]
    pub(super) fn defer_error(&self, e: Error) {
        self.deferred.keep(e);
        self.rare.set(RareFlags::DEFERRED, true);
    }

    /// The kept errors as one: the error itself when there was one, else every one's words.
    #[cold]
    pub(super) fn take_deferred(&self) -> Error {
        self.rare.set(RareFlags::DEFERRED, false);
        let taken = self.deferred.take(|mut t| {
            if t.count() == 1 {
                return t.errors.remove(0);
            }
            Error::Driver {
                call: "freeing dropped buffers",
                code: t.code(),
                message: format!(
                    "{} frees failed where no error could be returned (Buffer drops): {}",
                    t.count(),
                    t.joined()
                ),
            }
        });
        taken.err().unwrap_or_else(|| {
            Error::InvalidArgument("the kept error was taken by another call".into())
        })
    }

    pub(crate) fn pool_states(&self) -> impl Iterator<Item = (u32, &StreamPool)> {
        self.pools_with_index().map(|(i, p)| (i as u32, p))
    }
}

/// Driver calls made by the allocator (see [`DriverCalls`]).
#[derive(Default)]
pub(crate) struct DriverCounters {
    pub segment_alloc: AtomicU64,
    pub segment_free: AtomicU64,
    pub reserve: AtomicU64,
    pub unreserve: AtomicU64,
    pub create: AtomicU64,
    pub release: AtomicU64,
    pub map: AtomicU64,
    pub unmap: AtomicU64,
    pub set_access: AtomicU64,
    pub synchronize: AtomicU64,
    pub event_record: AtomicU64,
    pub event_query: AtomicU64,
    pub event_wait: AtomicU64,
}

impl DriverCounters {
    fn all(&self) -> [&AtomicU64; 13] {
        [
            &self.segment_alloc,
            &self.segment_free,
            &self.reserve,
            &self.unreserve,
            &self.create,
            &self.release,
            &self.map,
            &self.unmap,
            &self.set_access,
            &self.synchronize,
            &self.event_record,
            &self.event_query,
            &self.event_wait,
        ]
    }

    fn snapshot(&self) -> DriverCalls {
        let [segment_alloc, segment_free, reserve, unreserve, create, release, map, unmap, set_access, synchronize, event_record, event_query, event_wait] =
            self.all().map(|a| a.load(Relaxed));
        DriverCalls {
            segment_alloc,
            segment_free,
            reserve,
            unreserve,
            create,
            release,
            map,
            unmap,
            set_access,
            synchronize,
            event_record,
            event_query,
            event_wait,
        }
    }
}

/// The breakdown of reserved memory at its peak, recorded only while asked for.
#[derive(Debug, Default)]
pub(super) struct PeakRecord {
    on: std::sync::atomic::AtomicBool,
    /// A new peak was reached inside an allocation still under way: recorded once it is done.
    pending: std::sync::atomic::AtomicBool,
    last: Mutex<Option<crate::stats::PeakBreakdown>>,
    /// Time spent recording, in nanoseconds (a replay leaves it out of its call times).
    spent_ns: AtomicU64,
}

impl CachingAllocator {
    /// Record, from now on, where reserved memory is each time it reaches a new peak
    /// ([`PeakBreakdown`](crate::PeakBreakdown)): each new peak costs a walk over every block
    /// with every pool locked (at the end of the slow path that raised it), so it is off
    /// unless asked for; `accelrt replay` turns it on.
    pub fn record_peak_breakdown(&self, on: bool) {
        self.peak.on.store(on, Relaxed);
        if !on {
            *self.peak.last.lock() = None;
        }
    }

    /// Where reserved memory was when it last reached a new peak, if recording was on then.
    pub fn peak_breakdown(&self) -> Option<crate::stats::PeakBreakdown> {
        *self.peak.last.lock()
    }

    /// Time spent recording peak breakdowns so far (inside the calls that raised a peak).
    pub fn peak_breakdown_cost(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.peak.spent_ns.load(Relaxed))
    }

    /// Reserved memory just rose from `before` to `reserved`: a new peak is recorded (when
    /// asked for) once the allocation that raised it is done, when the memory is where the
    /// allocation put it (`settle_peak`).
    #[inline]
    pub(super) fn note_new_peak(&self, before: u64, reserved: u64) {
        if reserved > before && self.peak.on.load(Relaxed) {
            self.peak.pending.store(true, Relaxed);
        }
    }

    /// At the end of a slow path, with no lock held: record the breakdown of a new peak
    /// reached during it.
    #[inline]
    pub(super) fn settle_peak(&self) {
        if self.peak.pending.load(Relaxed) {
            self.record_peak();
        }
    }

    #[cold]
    #[inline(never)]
    fn record_peak(&self) {
        if !self.peak.pending.swap(false, Relaxed) || !self.peak.on.load(Relaxed) {
            return;
        }
        let start = std::time::Instant::now();
        // One consistent picture under concurrent calls: the chunk table, then every pool
        // (the lock order; no other thread holding a pool lock waits for another pool's, so
        // taking them all cannot deadlock). Chunks and pools stand still meanwhile; plain
        // segments are reserved before their pool gets them and leave their pool before they
        // are given back, so `reserved`, read last, covers every byte counted.
        let vm = self.vm_state.lock();
        let chunks: &ChunkTable = &vm.chunks;
        let pools: Vec<_> = self.initialized_pools().map(|p| p.state.lock()).collect();
        let mut b = crate::stats::PeakBreakdown {
            reserved: self.reserved.load(Relaxed),
            ..Default::default()
        };
        for st in &pools {
            let free = st.free_memory(chunks);
            b.allocated += st.allocated_bytes() - free.unbacked_in_flight;
            b.free_in_shared_pages += free.in_shared_pages;
            b.free_in_used_chunks += free.in_used_chunks;
            b.idle_chunks += free.idle_chunks;
            b.free_in_segments += free.in_segments;
        }
        b.spare_chunks = chunks.spare_pages() * self.vm_page;
        drop(pools);
        drop(vm);
        b.other = b.reserved.saturating_sub(b.accounted());
        *self.peak.last.lock() = Some(b);
        let spent = start.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.peak.spent_ns.fetch_add(spent, Relaxed);
    }
}
