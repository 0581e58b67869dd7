//! Allocator statistics, with PyTorch's `memory_stats()` names and meanings.

use serde::Serialize;

/// One statistic: current value, peak since the last peak reset, and the totals added and
/// removed since the last accumulated reset.
///
/// Invariant: `allocated - freed == current` until `reset_accumulated` clears both totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stat {
    pub current: u64,
    pub peak: u64,
    pub allocated: u64,
    pub freed: u64,
}

impl Stat {
    #[inline(always)]
    pub fn increase(&mut self, amount: u64) {
        self.current += amount;
        self.allocated += amount;
        if self.current > self.peak {
            self.peak = self.current;
        }
    }
    #[inline(always)]
    pub fn decrease(&mut self, amount: u64) {
        debug_assert!(
            self.current >= amount,
            "stat would go negative: {} - {amount}",
            self.current
        );
        self.current -= amount;
        self.freed += amount;
    }
    pub fn reset_peak(&mut self) {
        self.peak = self.current;
    }
    pub fn reset_accumulated(&mut self) {
        self.allocated = 0;
        self.freed = 0;
    }
    /// Sum of two stats; the peak is the sum of the peaks (an upper bound of the combined peak).
    pub fn merged(self, other: Stat) -> Stat {
        Stat {
            current: self.current + other.current,
            peak: self.peak + other.peak,
            allocated: self.allocated + other.allocated,
            freed: self.freed + other.freed,
        }
    }
}

/// A size class: small or large blocks, each with its own free index and statistics in every
/// pool (PyTorch's small and large pools, whose names the statistics' keys keep).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    /// Requests of at most 1 MiB, served from 2 MiB segments.
    Small = 0,
    /// Everything else.
    Large = 1,
}

impl PoolKind {
    pub fn name(self) -> &'static str {
        match self {
            PoolKind::Small => "small_pool",
            PoolKind::Large => "large_pool",
        }
    }
}

/// The statistics PyTorch reports for a size class, or for both together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Live allocations handed to callers.
    pub allocation: Stat,
    /// Segments held from the device.
    pub segment: Stat,
    /// Blocks in use, including freed blocks waiting on other streams.
    pub active: Stat,
    /// Free blocks that are pieces of a split segment (not whole segments).
    pub inactive_split: Stat,
    /// Bytes of live allocations (rounded block sizes).
    pub allocated_bytes: Stat,
    /// Bytes held from the device.
    pub reserved_bytes: Stat,
    /// Bytes of active blocks.
    pub active_bytes: Stat,
    pub inactive_split_bytes: Stat,
    /// Bytes callers asked for (before rounding).
    pub requested_bytes: Stat,
}

impl PoolStats {
    fn each_mut(&mut self) -> [&mut Stat; 9] {
        [
            &mut self.allocation,
            &mut self.segment,
            &mut self.active,
            &mut self.inactive_split,
            &mut self.allocated_bytes,
            &mut self.reserved_bytes,
            &mut self.active_bytes,
            &mut self.inactive_split_bytes,
            &mut self.requested_bytes,
        ]
    }
    pub fn reset_peak(&mut self) {
        self.each_mut().into_iter().for_each(Stat::reset_peak);
    }
    pub fn reset_accumulated(&mut self) {
        self.each_mut()
            .into_iter()
            .for_each(Stat::reset_accumulated);
    }
    pub fn merged(mut self, mut other: PoolStats) -> PoolStats {
        let mine = self.each_mut();
        for (a, b) in mine.into_iter().zip(other.each_mut()) {
            *a = a.merged(*b);
        }
        self
    }
    /// These statistics with every peak at its current value.
    pub fn with_current_as_peak(mut self) -> PoolStats {
        self.reset_peak();
        self
    }
    /// These statistics with every peak taken from `peaks`.
    pub fn with_peaks_of(mut self, mut peaks: PoolStats) -> PoolStats {
        for (s, p) in self.each_mut().into_iter().zip(peaks.each_mut()) {
            s.peak = p.peak;
        }
        self
    }
    /// The (name, stat) pairs, in PyTorch's key order.
    pub fn named(&self) -> [(&'static str, Stat); 9] {
        [
            ("allocation", self.allocation),
            ("segment", self.segment),
            ("active", self.active),
            ("inactive_split", self.inactive_split),
            ("allocated_bytes", self.allocated_bytes),
            ("reserved_bytes", self.reserved_bytes),
            ("active_bytes", self.active_bytes),
            ("inactive_split_bytes", self.inactive_split_bytes),
            ("requested_bytes", self.requested_bytes),
        ]
    }
}

/// Counters of events that are not current/peak values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventCounters {
    /// Allocations that released the cache and tried again.
    pub num_alloc_retries: u64,
    /// Allocations that failed with out-of-memory.
    pub num_ooms: u64,
    /// Times the allocator waited for every pending cross-stream event.
    pub num_sync_all_streams: u64,
    /// Segments taken from the device.
    pub num_device_alloc: u64,
    /// Segments given back to the device.
    pub num_device_free: u64,
    /// Expandable segments: times idle physical memory in free blocks was moved to serve a
    /// block elsewhere (a chunk mapped at its new place at once; its old place unmapped later).
    pub num_page_steals: u64,
    /// Expandable segments: granules (pages) moved by those moves.
    pub num_pages_remapped: u64,
    /// Expandable segments: moves not made because the driver time of moves had used up its
    /// share of the time passed (memory was created instead; see `ARCHITECTURE.md`).
    pub num_moves_deferred: u64,
    /// Expandable segments: moves made while the time budget was dry, because the shortfall
    /// was at least 1/128 of what is reserved (deferring it would have created a new peak of
    /// that size); not drawn from the budget.
    pub num_moves_exempt: u64,
    /// Expandable segments: the most driver time of moves (microseconds, at 60 us a moved
    /// chunk) drawn from the time budget at once beyond what the time passing had put back:
    /// how near moves came to being deferred. The budget holds 25 ms at the start and at most
    /// 50 ms (times 64 MiB / the chunk size); a peak, reset by `reset_peak_stats` to what is
    /// drawn now.
    pub move_time_drawn_peak_us: u64,
    /// Expandable segments: microseconds spent in virtual-memory driver calls (creating,
    /// mapping with access, unmapping and releasing chunks), measured around each call. What
    /// the counts in `driver_calls` cost this process: on the H200 inside a PyTorch process,
    /// set-access and unmap cost 32-36 us and 21 us per handle remapped (140-240 us and 70-150
    /// us for a lone freshly created handle), map 3 us, event calls 1-2 us (BENCHMARKS.md).
    /// The host backend's simulated calls cost next to nothing.
    pub vm_call_us: u64,
}

impl EventCounters {
    /// What happened since `before` (an earlier reading of the same allocator): each count's
    /// difference; the peak as it stands now.
    pub fn since(&self, before: &EventCounters) -> EventCounters {
        let d = |now: u64, then: u64| now.saturating_sub(then);
        EventCounters {
            num_alloc_retries: d(self.num_alloc_retries, before.num_alloc_retries),
            num_ooms: d(self.num_ooms, before.num_ooms),
            num_sync_all_streams: d(self.num_sync_all_streams, before.num_sync_all_streams),
            num_device_alloc: d(self.num_device_alloc, before.num_device_alloc),
            num_device_free: d(self.num_device_free, before.num_device_free),
            num_page_steals: d(self.num_page_steals, before.num_page_steals),
            num_pages_remapped: d(self.num_pages_remapped, before.num_pages_remapped),
            num_moves_deferred: d(self.num_moves_deferred, before.num_moves_deferred),
            num_moves_exempt: d(self.num_moves_exempt, before.num_moves_exempt),
            move_time_drawn_peak_us: self.move_time_drawn_peak_us,
            vm_call_us: d(self.vm_call_us, before.vm_call_us),
        }
    }
}

/// Where reserved memory was when it peaked: the memory a workload paid for beyond what it
/// had allocated, by why it was not available to the request that raised the peak. Recorded
/// when asked for (`CachingAllocator::record_peak_breakdown`), as soon as the allocation that
/// raised the peak is done (its memory in place; chunks moved for it counted once, where they
/// are now); every field in bytes.
///
/// `reserved = allocated + free_in_shared_pages + free_in_used_chunks + idle_chunks +
/// spare_chunks + free_in_segments + other`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PeakBreakdown {
    /// Reserved memory when recorded: the peak (less anything the allocation that raised it
    /// gave back on its way).
    pub reserved: u64,
    /// Blocks handed out (their rounded sizes), the request that raised the peak included;
    /// a block another thread is still mapping counts only the part memory backs already.
    pub allocated: u64,
    /// Expandable segments: free bytes on pages that also hold allocated bytes (a page is
    /// the mapping unit, 2 MiB on CUDA).
    pub free_in_shared_pages: u64,
    /// Expandable segments: whole free pages of chunks that also back allocated pages. A chunk
    /// is mapped and moved only whole, so only requests that fit these holes can use them;
    /// smaller chunks leave less here at the price of more driver calls.
    pub free_in_used_chunks: u64,
    /// Expandable segments: chunks lying wholly inside free blocks, which a request elsewhere
    /// could have had by a move.
    pub idle_chunks: u64,
    /// Expandable segments: chunks created and mapped nowhere.
    pub spare_chunks: u64,
    /// Plain segments: cached free blocks.
    pub free_in_segments: u64,
    /// The rest: blocks freed but waiting for other streams' work, and blocks held by
    /// allocations under way on other threads.
    pub other: u64,
}

impl PeakBreakdown {
    /// Every part but `other`: what the breakdown accounts for (at most `reserved`).
    pub fn accounted(&self) -> u64 {
        self.allocated
            + self.free_in_shared_pages
            + self.free_in_used_chunks
            + self.idle_chunks
            + self.spare_chunks
            + self.free_in_segments
    }
}

/// The driver calls an allocator made, one count per kind. Both backends count the same
/// logical operations on their providers, so a replay on the host predicts the calls a CUDA
/// run makes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DriverCalls {
    /// Plain segments taken (`cuMemAlloc`).
    pub segment_alloc: u64,
    /// Plain segments given back (`cuMemFree`).
    pub segment_free: u64,
    /// Address ranges reserved (`cuMemAddressReserve`).
    pub reserve: u64,
    /// Address ranges given back (`cuMemAddressFree`).
    pub unreserve: u64,
    /// Physical chunks created (`cuMemCreate`).
    pub create: u64,
    /// Physical chunks released (`cuMemRelease`).
    pub release: u64,
    /// Chunks mapped (`cuMemMap`, one per chunk).
    pub map: u64,
    /// Ranges unmapped (`cuMemUnmap`, one per contiguous range).
    pub unmap: u64,
    /// Access grants (`cuMemSetAccess`, one per mapped range).
    pub set_access: u64,
    /// Host waits for the device or a stream (`cuCtxSynchronize`, `cuEventSynchronize`).
    pub synchronize: u64,
    /// Events recorded (`cuEventRecord`).
    pub event_record: u64,
    /// Events queried (`cuEventQuery`).
    pub event_query: u64,
    /// Device-side waits (`cuStreamWaitEvent`).
    pub event_wait: u64,
}

impl DriverCalls {
    /// The (name, count) pairs.
    pub fn named(&self) -> [(&'static str, u64); 13] {
        [
            ("segment_alloc", self.segment_alloc),
            ("segment_free", self.segment_free),
            ("reserve", self.reserve),
            ("unreserve", self.unreserve),
            ("create", self.create),
            ("release", self.release),
            ("map", self.map),
            ("unmap", self.unmap),
            ("set_access", self.set_access),
            ("synchronize", self.synchronize),
            ("event_record", self.event_record),
            ("event_query", self.event_query),
            ("event_wait", self.event_wait),
        ]
    }
    /// All calls together.
    pub fn total(&self) -> u64 {
        self.named().iter().map(|(_, n)| n).sum()
    }
}

/// A device's allocator statistics: per size class (PyTorch's `small_pool` and `large_pool`),
/// both together, and counters.
///
/// Peaks are exact per stream (small, large, and both together); when several streams have
/// allocated, the device-wide peaks are the sum of the per-stream peaks (an upper bound),
/// except `reserved_bytes` and `segment`, whose device-wide peaks are always exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryStats {
    pub small_pool: PoolStats,
    pub large_pool: PoolStats,
    /// Both size classes together, kept per pool as its own record (exact peaks per stream).
    pub combined: PoolStats,
    pub counters: EventCounters,
    /// Driver calls made by the allocator.
    pub driver_calls: DriverCalls,
    /// Exact peak of reserved bytes over all streams.
    pub reserved_bytes_peak: u64,
    /// Exact peak of segments over all streams.
    pub segment_peak: u64,
}

impl MemoryStats {
    /// Both size classes together (PyTorch's `all`).
    pub fn all(&self) -> PoolStats {
        let mut all = self.combined;
        all.reserved_bytes.peak = self.reserved_bytes_peak;
        all.segment.peak = self.segment_peak;
        all
    }

    /// A flat map with PyTorch's keys (`allocated_bytes.all.current`, `num_ooms`, ...).
    pub fn to_flat_map(&self) -> std::collections::BTreeMap<String, u64> {
        let mut m = std::collections::BTreeMap::new();
        for (pool_name, pool) in [
            ("all", self.all()),
            ("small_pool", self.small_pool),
            ("large_pool", self.large_pool),
        ] {
            for (stat_name, s) in pool.named() {
                m.insert(format!("{stat_name}.{pool_name}.current"), s.current);
                m.insert(format!("{stat_name}.{pool_name}.peak"), s.peak);
                m.insert(format!("{stat_name}.{pool_name}.allocated"), s.allocated);
                m.insert(format!("{stat_name}.{pool_name}.freed"), s.freed);
            }
        }
        let c = self.counters;
        m.insert("num_alloc_retries".into(), c.num_alloc_retries);
        m.insert("num_ooms".into(), c.num_ooms);
        m.insert("num_sync_all_streams".into(), c.num_sync_all_streams);
        m.insert("num_device_alloc".into(), c.num_device_alloc);
        m.insert("num_device_free".into(), c.num_device_free);
        m.insert("num_page_steals".into(), c.num_page_steals);
        m.insert("num_pages_remapped".into(), c.num_pages_remapped);
        m.insert("num_moves_deferred".into(), c.num_moves_deferred);
        m.insert("num_moves_exempt".into(), c.num_moves_exempt);
        m.insert("move_time_drawn_peak_us".into(), c.move_time_drawn_peak_us);
        m.insert("vm_call_us".into(), c.vm_call_us);
        for (name, n) in self.driver_calls.named() {
            m.insert(format!("driver_calls.{name}"), n);
        }
        m.insert("driver_calls.total".into(), self.driver_calls.total());
        m
    }
}

#[cfg(test)]
mod tests {
    use super::EventCounters;

    #[test]
    fn since_takes_differences_of_counts_and_keeps_the_peak() {
        let before = EventCounters {
            num_page_steals: 5,
            num_moves_deferred: 1,
            move_time_drawn_peak_us: 900,
            ..Default::default()
        };
        let after = EventCounters {
            num_page_steals: 12,
            num_pages_remapped: 40,
            num_moves_deferred: 1,
            move_time_drawn_peak_us: 700,
            vm_call_us: 5_000,
            ..Default::default()
        };
        let d = after.since(&before);
        assert_eq!(
            (
                d.num_page_steals,
                d.num_pages_remapped,
                d.num_moves_deferred
            ),
            (7, 40, 0)
        );
        assert_eq!(d.move_time_drawn_peak_us, 700);
        assert_eq!(d.vm_call_us, 5_000);
        // A reading taken after a reset: no count goes below zero.
        assert_eq!(before.since(&after).num_page_steals, 0);
    }
}
