//! Expandable segments: blocks carved from reserved virtual ranges, backed by physical
//! *chunks* mapped on demand. Chunks, not segments, are the unit of memory.
//!
//! When a block needs memory (its slots hold no chunk), each unmapped run is filled from:
//! 1. spare chunks (created, mapped nowhere);
//! 2. new chunks, while reserved memory stays under the growth threshold (the previous peak
//!    with `release_at_peak`, and the low watermark): pages stay where they are used, so a
//!    workload that repeats itself settles and makes no driver call;
//! 3. **moves**: idle chunks (lying wholly inside free blocks) of the requesting pool are
//!    mapped at the new place at once, without waiting for anything: work queued on the pool's
//!    stream is ordered after the old work by the stream itself. The old range stays mapped as
//!    a *lent* block until a fence on the stream shows the work that used it done, and is then
//!    unmapped lazily (`reclaim_lent`, on later slow paths). Idle chunks of *other* pools move
//!    only behind a fence already recorded on their stream, and the requesting stream is made
//!    to wait for that fence on the device (`StreamEvents::wait`), never the host;
//! 4. new chunks up to the hard limit;
//! 5. at the limit: one device-wide synchronize, after which every idle chunk may move.
//!
//! New chunks are sized to demand: a run gets one chunk (up to the current cap: `chunk_mb`,
//! by default [`MAX_CHUNK_BYTES`]); where it shares a page with a neighbouring block, that
//! page gets a one-page chunk of its own, so that a freed block's chunk is wholly idle and
//! can move. The cap halves when a new peak happens while free memory is stranded in partly
//! used chunks. In the memory-first mode (`chunk_mb` below `max_chunk_mb`) a long run gets
//! about [`RUN_CHUNKS`] chunks instead. A chunk is always mapped whole (CUDA refuses to map part of
//! an allocation), so every chunk costs one creation. The costs behind these numbers are in
//! `provider.rs` and `ARCHITECTURE.md`.
//!
//! All chunk and page-table changes happen under the `vm` mutex (before any pool lock); the
//! fast path never takes it (a block whose pages are all mapped has `mapped_len >= size`).

use std::sync::atomic::Ordering::Relaxed;

use parking_lot::MutexGuard;

use super::{AllocatorEvent, CachingAllocator, HardLimit, SegmentFailure, StreamPool};
use crate::chunks::{ChunkTable, Home};
use crate::error::{Error, Result};
use crate::history::TraceAction;
use crate::pool::{BlockState, Run, NIL};
use crate::provider::{ChunkHandle, ProviderError, VirtualMemory};
use crate::size::pool_kind;

/// The largest chunk created and the default chunk size (`max_chunk_mb` and `chunk_mb`
/// change them). A chunk's driver calls cost about the same whatever its size
/// (`cuMemCreate` 15 us for 2 MiB, 40 us for 128 MiB; map and access 38 us for 2 MiB, 64 us
/// for 128 MiB), so larger chunks mean fewer calls; but a chunk moves only whole, so memory
/// freed around live blocks stays stranded in large ones. Replaying nine workloads recorded
/// on the H200 with their real GPU timing (`BENCHMARKS.md`), the mean peak reserved / peak
/// allocated was 1.054 with 128 MiB chunks, 1.042 with 64 MiB and 1.039 with 32 MiB, at
/// 30-40% more creations and maps for each halving: 64 MiB.
pub(crate) const MAX_CHUNK_BYTES: u64 = 64 << 20;

/// With `chunk_mb` set below the largest chunk (the memory-first mode), a run longer than
/// this many base chunks is backed by about this many chunks of 1/`RUN_CHUNKS` of its length
/// (at most the largest) instead. On the H200 (BENCHMARKS.md, "Night of 2026-11-29"),
/// `chunk_mb:4` kept peak reserved within 0.6-2.8% of allocated on five real workloads
/// (default: 1.5-5.7%) at 3-14% more steady-state time; 4 MiB chunks for every run
/// (`max_chunk_mb:4`) moved GPT-2 training's 1.5 GiB blocks as 400 chunks each, every step:
/// 63% slower. Replays of the recorded runs with 4 MiB base chunks: 8 chunks a run strands
/// memory again (Llama 1.026, GPT-2 inference 1.041), 24 or more costs 20-40% more driver
/// calls than 12 for no less memory.
const RUN_CHUNKS: usize = 12;

/// The adaptive chunk cap never falls below reserved memory divided by this during a pool's
/// first cycle (after it, by `chunk_div` when that is larger): smaller chunks would cost
/// more driver time than the memory they save (replays of `traces/`, see
/// `ARCHITECTURE.md`). On the H200, 64 made GPT-2 training move its 1.5 GiB blocks in
/// smaller chunks, ran the moves' time budget dry, and the deferred moves created memory:
/// 1.197x allocated against 1.016 (BENCHMARKS.md, "2026-11-30 00:52 UTC").
const STRANDING_FLOOR_DIV: u64 = 32;

/// Move budget: one move (remapping chunks, or releasing idle ones at the peak) per this many
/// allocations, on average (times 64 MiB / the base chunk: the same memory moves in more,
/// smaller moves when chunks are smaller)...
const ALLOCS_PER_MOVE: u64 = 16;
/// ...plus this many up front. Training and inference traces move around their peaks; a
/// workload that sits at its peak and churns (RMM's random benchmark) runs out, and new
/// chunks are created instead, until reserved memory settles where churn needs no remapping.
const INITIAL_MOVES: u64 = 32;

/// The time budget of moves (see `clock.rs`): the driver time of moves may take this share
/// of the time that passes (`move_time_pct` changes it; times 64 MiB / the base chunk, as the
/// count budget)... 10%: GPT-2 training's steady moves (its 1.5 GiB blocks, placed anew each
/// 61 ms step) draw 4-6% at 60 us a chunk, and with 5% the budget ran dry after 24-26 steps
/// on the H200, its deferred moves created memory, and 40 steps ended at 1.184-1.199x
/// allocated; with 10%, 1.0132-1.0181 in four runs, no move deferred (BENCHMARKS.md, "longer
/// runs"). Churn at the peak (RMM's random benchmark on the H200) ran no slower.
const MOVE_TIME_SHARE: f64 = 0.10;
/// ...with at most this much in hand (microseconds of moves): a training step's moves go
/// through at once (real GPT-2 training on the H200 draws 25-41 ms at once in its first
/// steps)...
const MOVE_TIME_BURST_US: f64 = 50_000.0;
/// ...and this much when the allocator is made: the rest is earned by running. A full
/// bucket at the start let a short burst of churn spend half its time moving (RMM's random
/// benchmark with blocks up to 64 MiB: 50 ms of moves in a 110 ms run, 3,900 driver calls),
/// while an empty one deferred the first moves of real GPT-2 training in 2 of 7 runs on the
/// H200 (memory created instead: 1.197x allocated). Half: 0 deferred in 12 GPT-2 runs at
/// 1.0154-1.0180, and the random benchmark at 2,800-3,000 calls and 1.09x allocated
/// (BENCHMARKS.md, "The parked large block, and half the moves' budget at the start").
const MOVE_TIME_START_US: f64 = 25_000.0;
/// A shortfall of at least reserved memory / this moves whatever the time budget holds: the
/// budget is for churn, where each move is small and a deferred one creates little, but
/// deferring a large one creates a new peak of its size. With the budget at 5% of the time
/// (before [`MOVE_TIME_SHARE`] was raised), GPT-2 training on the H200 ran it dry after 24-26
/// steps and ended 40 steps at 1.184-1.199x allocated; exempting shortfalls of reserved / 64
/// made that 1.019-1.086, reserved / 128 1.034-1.081 (BENCHMARKS.md, "longer runs"). In the
/// replays and benchmarks a dry budget met shortfalls of reserved / 261 or less
/// in churn (RMM's random benchmark) and of reserved / 11 .. / 200 in GPT-2 training.
const TIME_EXEMPT_DIV: u64 = 128;

/// Whether a move's driver time is drawn from the moves' time budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Draw {
    Budget,
    /// A large shortfall while the budget is dry (see [`TIME_EXEMPT_DIV`]).
    Exempt,
}

/// The driver time of moving one chunk, in microseconds: mapped at its new place and given
/// access there, unmapped at its old place later. On the H200 (`provider.rs`): map 4 us,
/// set-access 34 us per handle, unmap 22 us.
const MOVE_US_PER_CHUNK: f64 = 60.0;

/// The time budget of moves: a leaky bucket of microseconds of driver time, holding
/// [`MOVE_TIME_START_US`] at the clock's zero (the allocator's birth, or a replayed trace's
/// start) and filling as the clock runs.
///
/// Invariant: `0 <= owed_us` and `in_hand_us + owed_us <= cap_us` once the clock was read.
#[derive(Debug)]
pub(crate) struct MoveTime {
    /// Microseconds of moves that may still be made (below zero after the last move
    /// overdrew it).
    in_hand_us: f64,
    /// Microseconds drawn that the time passing has not yet put back.
    owed_us: f64,
    /// Microseconds of moves earned per microsecond passing.
    refill: f64,
    /// The most that can be in hand.
    cap_us: f64,
    /// The clock's reading at the last refill (`None` before the first: the first refill
    /// counts from the clock's zero).
    last_us: Option<u64>,
}

impl MoveTime {
    /// A bucket holding [`MOVE_TIME_START_US`], refilled at `share` of the time passing up to
    /// [`MOVE_TIME_BURST_US`], all three times `scale`.
    fn new(share: f64, scale: u64) -> Self {
        MoveTime {
            in_hand_us: MOVE_TIME_START_US * scale as f64,
            owed_us: 0.0,
            refill: share * scale as f64,
            cap_us: MOVE_TIME_BURST_US * scale as f64,
            last_us: None,
        }
    }

    /// Refill for the time passed up to `now`; whether a move may be made.
    fn allows(&mut self, now: u64) -> bool {
        let earned = now.saturating_sub(self.last_us.unwrap_or(0)) as f64 * self.refill;
        self.last_us = Some(now.max(self.last_us.unwrap_or(0)));
        self.in_hand_us = (self.in_hand_us + earned).min(self.cap_us);
        self.owed_us = (self.owed_us - earned).max(0.0);
        debug_assert!(self.in_hand_us + self.owed_us <= self.cap_us * (1.0 + 1e-9) + 1e-6);
        self.in_hand_us > 0.0
    }

    /// Draw the driver time of `chunks` moved chunks.
    fn charge(&mut self, chunks: usize) {
        let us = chunks as f64 * MOVE_US_PER_CHUNK;
        self.in_hand_us -= us;
        self.owed_us += us;
    }

    /// Microseconds drawn and not yet put back by the time passing (0 without a clock:
    /// nothing is put back then, and nothing is withheld).
    pub(crate) fn drawn_us(&self) -> f64 {
        match self.last_us {
            Some(_) => self.owed_us,
            None => 0.0,
        }
    }
}

/// The state behind the allocator's `vm` mutex.
#[derive(Debug)]
pub(crate) struct VmState {
    pub chunks: ChunkTable,
    /// The chunk size of short runs now, in pages: starts at the base chunk (`chunk_mb`,
    /// default the largest, [`MAX_CHUNK_BYTES`]) and halves each time memory stranded in
    /// partly used chunks forces a new peak.
    pub chunk_cap: usize,
    /// The configured chunk size and largest chunk, in pages (see [`chunk_pages`]).
    pub base_pages: usize,
    pub max_pages: usize,
    /// 64 MiB / the base chunk (at least 1): smaller chunks move the same memory in more
    /// moves, so both move budgets grow by this factor.
    pub move_scale: u64,
    /// The time budget: [`MOVE_TIME_SHARE`] (or `move_time_pct`) times `move_scale`.
    pub move_time: MoveTime,
    /// `chunk_div`: short runs' chunks are at most reserved memory / this.
    pub chunk_div: Option<u64>,
    /// `halving_div` (default [`STRANDING_FLOOR_DIV`]): the chunk cap halves down to reserved
    /// memory / this at most.
    pub halving_div: u64,
    /// The chunk size of short runs at the last fill, in pages (with `chunk_div` it follows
    /// reserved memory, and the count budget grows by 64 MiB / it: see `count_scale`).
    pub short_cap: usize,
}

impl VmState {
    pub(crate) fn new(config: &crate::AllocatorConfig, page: u64) -> Self {
        let (base_pages, max_pages) = chunk_pages(config, page);
        let move_scale = (MAX_CHUNK_BYTES / (base_pages as u64 * page).max(1)).max(1);
        VmState {
            chunks: ChunkTable::default(),
            chunk_cap: base_pages,
            base_pages,
            max_pages,
            move_scale,
            move_time: MoveTime::new(
                config
                    .move_time_pct
                    .map_or(MOVE_TIME_SHARE, |pct| pct / 100.0),
                move_scale,
            ),
            chunk_div: config.chunk_div,
            halving_div: config.halving_div.unwrap_or(STRANDING_FLOOR_DIV),
            short_cap: base_pages,
        }
    }

    /// The count budget's factor: `move_scale`, and with `chunk_div` at least
    /// [`MAX_CHUNK_BYTES`] / the chunk size of short runs now (smaller chunks move the same
    /// memory in more moves).
    fn count_scale(&self, page: u64) -> u64 {
        if self.chunk_div.is_none() {
            return self.move_scale;
        }
        let short = (self.short_cap as u64).saturating_mul(page).max(1);
        (MAX_CHUNK_BYTES / short).max(self.move_scale)
    }

    /// The chunks a move is charged to the time budget for: one per chunk moved, scaled by
    /// the chunk size short runs get now over the largest (at least one): each chunk costs
    /// its driver calls, and a workload that `chunk_div` gives small chunks gets a budget
    /// as much larger, as the memory-first mode scales its own. Chunks small for other
    /// reasons (a run's remainder) are charged whole: charged by pages moved instead, random
    /// churn of blocks up to 64 MiB moved twice as often and reserved 1.13x allocated
    /// instead of 1.10x (host backend). Charged per chunk while chunks were made small from
    /// the start, GPT-2 training with `chunk_div:256` on the H200 deferred 82 moves over 40
    /// steps and reserved 1.049-1.107x allocated (default 1.013-1.018).
    fn charged_chunks(&self, moved: &[(u32, usize)]) -> usize {
        let (short, max) = (self.short_cap.max(1), self.max_pages.max(1));
        if self.chunk_div.is_none() || short >= max {
            return moved.len();
        }
        (moved.len() * short).div_ceil(max).max(1).min(moved.len())
    }

    /// The chunk size for short runs now, in pages: the cap, and with a divisor `div` (the
    /// `chunk_div` in force) at most `reserved_pages / div` (at least one page).
    fn short_run_cap(&self, reserved_pages: u64, div: Option<u64>) -> usize {
        let cap = self.chunk_cap.min(self.max_pages).max(1);
        match div {
            Some(d) => cap.min((reserved_pages / d).clamp(1, usize::MAX as u64) as usize),
            None => cap,
        }
    }
}

/// Whose idle memory a move may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reach {
    /// The requesting pool's only: without events, a pool another one robbed of its idle
    /// memory creates what it lacks rather than rob a third (`PoolState::take_robbed`).
    OwnPool,
    /// Also other pools', behind fences recorded on their streams (all of it without events).
    OtherPools,
    /// Every pool's: the device was synchronized.
    All,
}

/// Chunks to map one after another: (chunk index, pages).
pub(super) type Placement = Vec<(u32, usize)>;

impl CachingAllocator {
    pub(super) fn vm(&self) -> &dyn VirtualMemory {
        self.provider
            .virtual_memory()
            .expect("expandable mode is only on for providers with virtual memory")
    }

    pub(super) fn page_bytes(&self) -> u64 {
        self.vm_page
    }

    /// Run the virtual-memory driver call `call`, adding its time to `vm_call_us`. A clock
    /// read costs tens of nanoseconds, the calls tens of microseconds or more.
    pub(super) fn timed_vm_call<R>(&self, call: impl FnOnce() -> R) -> R {
        let start = std::time::Instant::now();
        let r = call();
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.counters.vm_call_ns.fetch_add(ns, Relaxed);
        r
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
        self.retry_or_oom(
            size,
            "mapping device memory",
            |_| {
                let block = {
                    let mut st = pool.state.lock();
                    self.process_pending(pool, &mut st);
                    let block = st.take_backed(rounded, size, &self.pool_config);
                    if block != NIL {
                        st.hold_in_flight(block);
                    }
                    block
                };
                let block = if block != NIL {
                    block
                } else {
                    self.grow_address_space(pool_idx, pool, rounded, size)?
                };
                Ok(match self.map_block(pool_idx, pool, block) {
                    Ok(()) => Ok(self.publish_mapped(pool, block)),
                    Err(failure) => {
                        self.unwind_unmapped(pool, block);
                        Err(failure)
                    }
                })
            },
            || None,
        )
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
        let result = match self.map_block(pool_idx, pool, block) {
            Ok(()) => Ok(self.publish_mapped(pool, block)),
            Err(SegmentFailure::Driver(message, code)) => {
                self.unwind_unmapped(pool, block);
                Err(Error::Driver {
                    call: "mapping device memory",
                    code,
                    message,
                })
            }
            Err(_) => {
                self.unwind_unmapped(pool, block);
                self.alloc_slow_vm(pool_idx, pool, rounded, size)
            }
        };
        // A new peak reached on the way is recorded now that the memory is in place.
        self.settle_peak();
        result
    }

    pub(super) fn publish_mapped(&self, pool: &StreamPool, block: u32) -> usize {
        let mut st = pool.state.lock();
        // The caller's from here on (see `PoolState::hold_in_flight`).
        let ptr = st.publish(block);
        if self.history.enabled() {
            self.note_alloc(&mut st, block, pool.stream.index);
        }
        drop(st);
        ptr
    }

    /// Give back a block that could not be mapped (it was carved, but never handed out).
    pub(super) fn unwind_unmapped(&self, pool: &StreamPool, block: u32) {
        let mut st = pool.state.lock();
        // In flight (see `hold_in_flight`): no free can have reached it.
        debug_assert_eq!(st.block(block).state, BlockState::Allocated);
        st.free_to_cache(block);
    }

    /// Reserve a new virtual range for `pool` and carve a block of `rounded` bytes from it.
    pub(super) fn grow_address_space(
        &self,
        pool_idx: u32,
        pool: &StreamPool,
        rounded: u64,
        size: u64,
    ) -> Result<u32> {
        let (_, total) = self.provider.memory_info();
        if rounded > total {
            self.fire(0, size, AllocatorEvent::AllocationFailed);
            return Err(self.out_of_memory(size, HardLimit::Device));
        }
        let page = self.page_bytes();
        let needed = round_up_checked(rounded.saturating_add(page), page).unwrap_or(u64::MAX);
        // Address space is cheap: twice the device, so one range serves the pool's lifetime;
        // plus 1/64 of that so the size sits mid-class in the free index, not on a class
        // boundary (a power of two): the large free remainder then keeps its class as blocks
        // come and go, and moves on its free list in O(1) (`Tlsf::replace`). Never more than
        // `MAX_RANGE` (unless one block needs more), and less if the system refuses that much.
        let twice = total.saturating_mul(2);
        let mut span = round_up_checked(twice.saturating_add(twice / 64), page)
            .unwrap_or(MAX_RANGE)
            .clamp(needed, MAX_RANGE.max(needed));
        let first_try = span;
        let base = loop {
            let attempt = usize::try_from(span)
                .map_err(|_| ProviderError::OutOfMemory)
                .and_then(|s| self.vm().reserve(s));
            match attempt {
                Ok(base) => {
                    self.driver.reserve.fetch_add(1, Relaxed);
                    break base;
                }
                Err(_) if span / 2 >= needed => {
                    span = round_up_checked(span / 2, page)
                        .unwrap_or(needed)
                        .max(needed);
                }
                Err(e) => {
                    return Err(Error::Driver {
                        call: "reserving address space",
                        code: None,
                        message: format!(
                            "no range of {} down to {} for a block of {} on {}: {} (is the \
                             process's virtual memory limited, e.g. `ulimit -v`? \
                             expandable_segments:false needs no reservation)",
                            crate::format_size(first_try),
                            crate::format_size(span),
                            crate::format_size(rounded),
                            self.device,
                            e.describe().trim_start_matches("reserving address space: ")
                        ),
                    })
                }
            }
        };
        self.pages.insert(base, span as usize, pool_idx);
        self.segment_index.write().insert(base, span);
        let segs = self.segments.fetch_add(1, Relaxed) + 1;
        self.segments_peak.fetch_max(segs, Relaxed);
        let mut st = pool.state.lock();
        st.add_vm_segment(base, span, pool_kind(rounded), page);
        let block = st.take_backed(rounded, size, &self.pool_config);
        if block == NIL {
            // Cannot happen (the range is larger than the block), but a wrong size must not
            // take the process down.
            return Err(Error::InvalidArgument(format!(
                "a fresh address range of {span} bytes did not hold a block of {rounded} bytes"
            )));
        }
        st.hold_in_flight(block);
        Ok(block)
    }

    /// Make every page under `block` (carved, not yet handed out) mapped.
    pub(super) fn map_block(
        &self,
        pool_idx: u32,
        pool: &StreamPool,
        block: u32,
    ) -> std::result::Result<(), SegmentFailure> {
        let mut vm = self.vm_state.lock();
        self.reclaim_lent(&mut vm, Some(pool_idx));
        let mut synced = false;
        loop {
            let run = pool.state.lock().first_unmapped_run(block, vm.max_pages);
            let Some(run) = run else {
                pool.state.lock().mark_mapped(block);
                return Ok(());
            };
            match self.fill_run(&mut vm, pool_idx, pool, run, synced) {
                Ok(placement) => {
                    let placement = arrange(placement, run);
                    self.map_at(&mut vm, pool_idx, pool, run, &placement)?
                }
                Err(e @ (SegmentFailure::Limit(_) | SegmentFailure::DeviceFull))
                    if !synced && self.events.is_some() =>
                {
                    // At the limit: wait for the device once, then every idle chunk may move.
                    if MutexGuard::unlocked(&mut vm, || self.fence_all_pools()).is_err() {
                        return Err(e); // a broken stream: leave its memory alone
                    }
                    self.reclaim_lent(&mut vm, None);
                    synced = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Chunks to fill `run` (see the module docs for the order).
    pub(super) fn fill_run(
        &self,
        vm: &mut VmState,
        pool_idx: u32,
        pool: &StreamPool,
        run: Run,
        synced: bool,
    ) -> std::result::Result<Placement, SegmentFailure> {
        let page = self.page_bytes();
        // `chunk_div` is in force once the pool's first cycle is over: chunks made while
        // little is reserved would stay small, and every later move would map them one by
        // one (BENCHMARKS.md, "chunk_div by default").
        let div = vm.chunk_div.filter(|_| pool.state.lock().recycling());
        let cap = vm.short_run_cap(self.reserved.load(Relaxed) / page, div);
        vm.short_cap = cap;
        // Memory-first mode (a base chunk below the largest, or `chunk_div` making short runs'
        // chunks smaller): a long run is cut into about RUN_CHUNKS chunks at most.
        let cap = if vm.base_pages < vm.max_pages || cap < vm.max_pages.min(vm.chunk_cap) {
            cap.max((run.len / RUN_CHUNKS).min(vm.max_pages))
        } else {
            cap
        };
        let mut out: Placement = Vec::new();
        let mut remaining = run.len;
        let room = run.room;
        // A run sharing a page with a neighbouring block keeps that page in a chunk of its own.
        let shared = run.head_shared || run.tail_shared;
        let result = (|| {
            // 1. Spare chunks: exactly the size left, else the largest that fits, else one
            //    reaching into the room after the run.
            while remaining > 0 {
                let id = vm
                    .chunks
                    .take_spare(remaining as u32, true)
                    .or_else(|| vm.chunks.take_spare(remaining as u32, false))
                    .or_else(|| vm.chunks.take_spare((remaining + room) as u32, false));
                let Some(id) = id else { break };
                let pages = vm.chunks.get(id).pages as usize;
                out.push((id, pages));
                remaining = remaining.saturating_sub(pages);
            }
            // 2. New chunks below the growth threshold: no new peak.
            let threshold = self.growth_threshold();
            while remaining > 0 {
                let want = new_chunk_pages(remaining, cap, shared);
                let fits =
                    threshold.is_none_or(|t| self.reserved.load(Relaxed) + want as u64 * page <= t);
                if !fits {
                    break;
                }
                out.push((self.create_chunk(vm, want)?, want));
                remaining -= want;
            }
            let permit = match remaining {
                0 => None,
                _ if synced => Some(Draw::Budget),
                _ => self.may_move(vm, remaining),
            };
            if let Some(draw) = permit {
                // 3. Moves: idle chunks of this pool (no wait), then of other pools behind
                //    their fences (a device-side wait).
                // Without events, a pool robbed of its idle memory takes none of others' in
                // turn (`PoolState::take_robbed`): it creates what it lacks below.
                let reach = if synced {
                    Reach::All
                } else if self.events.is_none() && pool.state.lock().take_robbed() {
                    Reach::OwnPool
                } else {
                    Reach::OtherPools
                };
                let moved = self.move_idle(vm, pool_idx, pool, remaining, room, reach);
                if draw == Draw::Budget {
                    let charged = vm.charged_chunks(&moved);
                    vm.move_time.charge(charged);
                }
                self.counters
                    .move_time_drawn_peak_us
                    .fetch_max(vm.move_time.drawn_us() as u64, Relaxed);
                for (id, pages) in moved {
                    out.push((id, pages));
                    remaining = remaining.saturating_sub(pages);
                }
                // 4. Still short at the peak: give back idle chunks whose work has passed (a
                //    completed fence) and create what the run needs instead of growing, as
                //    `release_at_peak` gives back whole segments.
                if let (true, Some(t)) = (remaining > 0, threshold) {
                    let need = self.reserved.load(Relaxed) + remaining as u64 * page;
                    if need > t {
                        self.release_idle_bytes(vm, pool_idx, pool, need - t, reach);
                    }
                    while remaining > 0 {
                        let want = new_chunk_pages(remaining, cap, shared);
                        if self.reserved.load(Relaxed) + want as u64 * page > t {
                            break;
                        }
                        out.push((self.create_chunk(vm, want)?, want));
                        remaining -= want;
                    }
                }
            }
            if remaining > 0 && threshold.is_some() {
                // A new peak while free memory lies stranded in partly used chunks (a chunk
                // moves only whole): chunks are too coarse for this workload; halve them, down
                // to 1/32 of what is reserved, and once the pool's first cycle is over down to
                // 1/`chunk_div` (the scale its new chunks follow then; on the H200, GPT-2
                // inference 1.012-1.017x allocated against 1.017-1.026 with 1/32, ViT and
                // ResNet-50 0.3 points above, within 1.015; BENCHMARKS.md, "chunk_div by
                // default"). At the peak, that stranded memory is all of the
                // overhead (replays of `traces/recorded/`: 160-210 MiB of GPT-2's and Llama's
                // 230-260 MiB over allocated lie in whole free pages of partly used chunks, the
                // rest in pages shared with live blocks). Halving only for shortfalls of a
                // quarter chunk or more saved a quarter of the driver calls in replays but
                // cost 0.5-1.5 points of peak on GPT-2 and Llama training on the H200
                // (BENCHMARKS.md, "Evening of 2026-11-29").
                let stranded = pool.state.lock().stranded_bytes(&vm.chunks) / page;
                let floor_div = vm.halving_div.max(div.unwrap_or(0));
                let floor = (self.reserved.load(Relaxed) / floor_div / page).max(1);
                vm.chunk_cap = halved_cap(vm.chunk_cap, remaining, stranded, floor as usize);
            }
            // 5. New chunks up to the hard limit.
            while remaining > 0 {
                let want = new_chunk_pages(remaining, cap, shared);
                out.push((self.create_chunk(vm, want)?, want));
                remaining -= want;
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(out),
            Err(e) => {
                for (id, _) in out {
                    vm.chunks.push_spare(id);
                }
                Err(e)
            }
        }
    }

    /// Map `placement` from the start of `run` and record it in the pool's page table.
    pub(super) fn map_at(
        &self,
        vm: &mut VmState,
        pool_idx: u32,
        pool: &StreamPool,
        run: Run,
        placement: &Placement,
    ) -> std::result::Result<(), SegmentFailure> {
        let page = self.page_bytes() as usize;
        let handles: Vec<(ChunkHandle, usize)> = placement
            .iter()
            .map(|&(id, pages)| (vm.chunks.get(id).handle, pages * page))
            .collect();
        let addr = run.seg_base + run.first * page;
        // SAFETY: the slots from `run.first` hold no chunk (read under the pool lock with
        // `vm` held since, and only `vm` holders map), they are page-aligned inside a range
        // this provider reserved, and the placement covers at most the run plus its room,
        // which is unmapped free space; every chunk is live (created, spare or just moved).
        let mapped = self.timed_vm_call(|| unsafe { self.vm().map(addr, &handles) });
        self.driver.map.fetch_add(handles.len() as u64, Relaxed);
        self.driver.set_access.fetch_add(1, Relaxed);
        if let Err(e) = mapped {
            for &(id, _) in placement {
                vm.chunks.push_spare(id);
            }
            return Err(SegmentFailure::from(e));
        }
        let mut slot = run.first;
        for &(id, pages) in placement {
            vm.chunks.get_mut(id).home = Home::Mapped {
                pool: pool_idx,
                seg_base: run.seg_base,
                slot: slot as u32,
            };
            slot += pages;
        }
        pool.state
            .lock()
            .install(run.seg_base, run.first, placement);
        let bytes = (slot - run.first) * page;
        if self.history.enabled() {
            self.history.record(
                TraceAction::SegmentMap,
                addr as u64,
                bytes as u64,
                pool.stream.index,
            );
        }
        self.fire(addr, bytes as u64, AllocatorEvent::Allocated);
        Ok(())
    }

    /// Whether the move budgets allow one more move: the count budget (see
    /// [`ALLOCS_PER_MOVE`]) and the time budget (see [`MOVE_TIME_SHARE`]). Without the
    /// scaling for smaller chunks, `max_chunk_mb:2` ran out of moves on bert_varlen and grew
    /// to 2.01x allocated (replay; 1.017 with it), and `max_chunk_mb:4` reserved 1.15-1.22x
    /// on gpt2_infer_varlen on the H200.
    ///
    /// `Some(Draw::Exempt)`: the time budget is dry but the shortfall of `short_pages` is large
    /// (see [`TIME_EXEMPT_DIV`]); the move goes ahead and is not drawn from the budget, which
    /// then still holds back the small ones.
    pub(super) fn may_move(&self, vm: &mut VmState, short_pages: usize) -> Option<Draw> {
        let allocs: u64 = self
            .pools_with_index()
            .map(|(_, p)| p.state.lock().allocations())
            .sum();
        let by_count = self.counters.num_page_steals.load(Relaxed)
            < (allocs / ALLOCS_PER_MOVE + INITIAL_MOVES)
                .saturating_mul(vm.count_scale(self.page_bytes()));
        if !by_count {
            return None;
        }
        let Some(now) = self.now_us() else {
            return Some(Draw::Budget); // no clock: by count only
        };
        if vm.move_time.allows(now) {
            return Some(Draw::Budget);
        }
        let large = (short_pages as u64)
            .saturating_mul(self.page_bytes())
            .saturating_mul(TIME_EXEMPT_DIV)
            >= self.reserved.load(Relaxed);
        if large {
            self.counters.num_moves_exempt.fetch_add(1, Relaxed);
            Some(Draw::Exempt)
        } else {
            self.counters.num_moves_deferred.fetch_add(1, Relaxed);
            None
        }
    }

    /// Chunks created below this many reserved bytes need no search for idle ones.
    pub(super) fn growth_threshold(&self) -> Option<u64> {
        let peak = self
            .config
            .release_at_peak
            .then(|| self.reserved_peak.load(Relaxed));
        match (peak, self.soft_limit()) {
            (Some(p), Some(s)) => Some(p.min(s)),
            (p, s) => p.or(s),
        }
    }

    pub(super) fn create_chunk(
        &self,
        vm: &mut VmState,
        pages: usize,
    ) -> std::result::Result<u32, SegmentFailure> {
        let bytes = pages as u64 * self.page_bytes();
        let new_total = self.claim_reserved(bytes)?;
        let created = self.timed_vm_call(|| self.vm().create(bytes as usize));
        self.driver.create.fetch_add(1, Relaxed);
        match created {
            Ok(h) => {
                let before = self.reserved_peak.fetch_max(new_total, Relaxed);
                self.note_new_peak(before, new_total);
                self.counters.num_device_alloc.fetch_add(1, Relaxed);
                Ok(vm.chunks.add(h, pages as u32))
            }
            Err(e) => {
                self.reserved.fetch_sub(bytes, Relaxed);
                Err(SegmentFailure::from(e))
            }
        }
    }

    /// Release chunk `id` (mapped nowhere, no old mapping left).
    pub(super) fn release_chunk(&self, vm: &mut VmState, id: u32) {
        let c = vm.chunks.remove(id);
        debug_assert_eq!(c.lent, 0, "chunk {id} released with an old mapping");
        let bytes = c.pages as u64 * self.page_bytes();
        // SAFETY: the chunk is ours, mapped nowhere (its home was unmapped or it was spare)
        // and has no old mapping left (`lent == 0`).
        self.timed_vm_call(|| unsafe { self.vm().release(c.handle, bytes as usize) });
        self.driver.release.fetch_add(1, Relaxed);
        self.reserved.fetch_sub(bytes, Relaxed);
        self.counters.num_device_free.fetch_add(1, Relaxed);
    }
}

/// Order chunks for placement along `run`: a chunk reaching past the run goes last; the
/// smallest chunks go on slots shared with neighbours (so a block's interior chunk holds none
/// of a neighbour's bytes and becomes wholly idle when the block is freed); large ones in the
/// middle.
pub(super) fn arrange(mut placement: Placement, run: Run) -> Placement {
    let total: usize = placement.iter().map(|&(_, p)| p).sum();
    let overhang = (total > run.len)
        .then(|| {
            let i = placement
                .iter()
                .enumerate()
                .max_by_key(|(_, &(_, p))| p)
                .map(|(i, _)| i)?;
            Some(placement.swap_remove(i))
        })
        .flatten();
    placement.sort_unstable_by_key(|&(_, p)| std::cmp::Reverse(p));
    let mut out = Vec::with_capacity(placement.len() + 1);
    if run.head_shared {
        if let Some(small) = placement.pop() {
            out.push(small);
        }
    }
    let tail = (run.tail_shared && overhang.is_none())
        .then(|| placement.pop())
        .flatten();
    out.extend(placement);
    out.extend(tail);
    out.extend(overhang);
    out
}

/// Ranges are never reserved larger than this unless one block needs more: 2^42 bytes
/// (4 TiB, seven times twice an H200's memory). The address map costs 4 bytes per 2 MiB of
/// reserved range (8 MiB here), so a device that claims an absurd size (a host `--capacity`
/// of 2^64) must not make every range that large: 2^46 cost 400 MB and 1.5 s per range.
const MAX_RANGE: u64 = 1 << 42;

/// (the base chunk, the largest chunk) in pages of `page` bytes: `chunk_mb` and
/// `max_chunk_mb` (both by default [`MAX_CHUNK_BYTES`]), at least one page each, the base at
/// most the largest.
fn chunk_pages(config: &crate::AllocatorConfig, page: u64) -> (usize, usize) {
    let pages = |bytes: u64| (bytes / page.max(1)).clamp(1, u32::MAX as u64) as usize;
    let max = pages(config.max_chunk_size.unwrap_or(MAX_CHUNK_BYTES));
    let base = pages(config.chunk_size.unwrap_or(MAX_CHUNK_BYTES)).min(max);
    (base, max)
}

fn round_up_checked(n: u64, to: u64) -> Option<u64> {
    n.checked_add(to - 1).map(|v| v / to * to)
}

/// The chunk cap after a new peak `short` pages short while `stranded` pages of free memory
/// lay in partly used chunks: halved (not below `floor`) when the stranded memory could have
/// covered the shortfall.
fn halved_cap(cap: usize, short: usize, stranded: u64, floor: usize) -> usize {
    if short > 0 && stranded >= short as u64 && cap > floor {
        (cap / 2).max(floor)
    } else {
        cap
    }
}

/// Pages of a new chunk for a run with `remaining` pages to fill: the run's size up to `cap`,
/// less one page left for a chunk of its own when the run `shared` a page with a neighbouring
/// block (`arrange` puts that chunk on the shared page, so that the block's other chunks lie
/// wholly inside it and become idle, free to move, when it is freed). A run that shares no
/// page gets no one-page chunk: on the H200 (BENCHMARKS.md, "2026-11-30 08:34 and 08:46
/// UTC", six runs each against splitting every run) that lowered ViT's peak reserved from
/// 1.023-1.027 to 1.014-1.021 of allocated in every run, left GPT-2 training's unchanged with
/// 10% fewer driver calls, and ResNet-50's, Llama's and GPT-2 inference's within their
/// run-to-run spreads (medians +0.1, +0.2 and +1 point; GPT-2 inference swings 1.026-1.078).
fn new_chunk_pages(remaining: usize, cap: usize, shared: bool) -> usize {
    if shared && remaining >= 2 && remaining <= cap {
        remaining - 1
    } else {
        remaining.min(cap)
    }
}

impl ProviderError {
    /// The error for a message: what went wrong, without debug formatting.
    pub fn describe(&self) -> String {
        match self {
            ProviderError::OutOfMemory => "out of memory".into(),
            ProviderError::Failed(m) | ProviderError::Driver { message: m, .. } => m.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_halves_when_stranded_memory_could_have_covered_the_shortfall() {
        // Short by a page or by a quarter chunk, with enough stranded around: halve.
        assert_eq!(halved_cap(32, 1, 100, 1), 16);
        assert_eq!(halved_cap(32, 8, 100, 1), 16);
        // Not below the floor, and not when less than the shortfall lies stranded.
        assert_eq!(halved_cap(32, 8, 100, 24), 24);
        assert_eq!(halved_cap(16, 8, 100, 16), 16);
        assert_eq!(halved_cap(32, 8, 7, 1), 32);
        // No shortfall, no change.
        assert_eq!(halved_cap(32, 0, 100, 1), 32);
    }

    /// The moves' time budget, as a table of clock readings: what is in hand at the start,
    /// what the time passing earns (5% of it here), the cap, an overdraft, and what is reported
    /// as drawn.
    #[test]
    fn the_move_time_budget_starts_half_full_and_is_earned_by_running() {
        let mut t = MoveTime::new(0.05, 1);
        assert_eq!(
            t.drawn_us(),
            0.0,
            "before the first reading: no clock, nothing drawn"
        );
        // The first reading at 0 us: 25 ms in hand.
        assert!(t.allows(0));
        t.charge(400); // 24 ms
        assert!(t.allows(0), "1 ms left");
        t.charge(100); // 6 ms: overdrawn by 5 ms
        assert!(!t.allows(0));
        assert_eq!(t.drawn_us(), 30_000.0);
        // 100 ms earn 5 ms: back to zero, still not allowed; 20 us later, allowed again.
        assert!(!t.allows(100_000));
        assert_eq!(t.drawn_us(), 25_000.0);
        assert!(t.allows(100_020));
        // Ten seconds earn 500 ms, but at most 50 ms are held, and nothing is owed any more.
        assert!(t.allows(10_100_020));
        assert_eq!(t.in_hand_us, MOVE_TIME_BURST_US);
        assert_eq!(t.drawn_us(), 0.0);
        // A clock read late for the first time credits the time since its zero.
        let mut late = MoveTime::new(0.05, 1);
        assert!(late.allows(400_000));
        assert_eq!(late.in_hand_us, 45_000.0);
        // Smaller chunks scale all three amounts.
        let mut scaled = MoveTime::new(0.05, 4);
        assert!(scaled.allows(0));
        assert_eq!(scaled.in_hand_us, 100_000.0);
        // A clock that goes back in time earns nothing and takes nothing.
        t.charge(100);
        assert!(t.allows(5));
        assert_eq!(t.in_hand_us, MOVE_TIME_BURST_US - 6_000.0);
        assert_eq!(t.last_us, Some(10_100_020));
    }
}
