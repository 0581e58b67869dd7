//! The caching allocator: the type, its construction and the fast paths (`raw_alloc`,
//! `raw_free`, each with one test for everything rare and `#[cold]` exits). The rest of its
//! `impl` lives beside, one concern a file: `slow.rs` (plain segments' slow path, the
//! retry-then-out-of-memory policy, giving cached memory back), `limits.rs` (the hard and
//! soft limits, the out-of-memory report), `fences.rs` (fences on pools' streams),
//! `expandable.rs` (chunks, moves' policy), `moves.rs` (moving and releasing idle chunks),
//! `cross_stream.rs` (record_stream, pending frees, cache control), `private.rs` (private
//! pools), `checkpoint.rs` (checkpoints of private pools), `ipc.rs` (sharing with another
//! process), `metadata.rs` (buffer metadata, limit setters), `figures.rs` (stats, driver
//! calls, history, snapshots, callbacks), `buffer.rs` (`Buffer`), `rare.rs` (the
//! rare-condition flags). Pools change only through `PoolState`'s methods (`pool/`).
//!
//! Layout: one [`StreamPool`] per stream, each behind its own mutex (so streams and
//! threads do not contend), a sharded map of live pointers, and a few atomics that change
//! only on the slow path (reserved bytes, device calls).
//!
//! Invariants (checked by [`CachingAllocator::check_invariants`]):
//! - `reserved == sum over pools of reserved_bytes == sum of segment sizes`;
//! - per pool and kind: `reserved_bytes == allocated_bytes + pending bytes + cached bytes`;
//! - every live pointer maps to an `Allocated` block at that address, and back.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use crate::pool_lock::{PoolGuard, PoolMutex};

use super::config::division_interval;
use super::history::{
    BlockInfo, BlockStatus, History, HistoryConfig, MemorySnapshot, SegmentInfo, TraceAction,
    TraceEntry,
};
use super::pagemap::PageMap;
use super::pool::{BlockState, PoolState, Segment, NIL};
use super::provider::copy_into_host_visible;
use super::size::{round_up, round_with_divisions, segment_size, MAX_REQUEST, MIN_SEGMENT};
use super::{
    format_size, AllocatorConfig, DriverCalls, EventCounters, MemoryProvider, MemoryStats,
    ProviderError, StreamEvents,
};
use crate::device::Device;

mod buffer;
mod checkpoint;
mod cross_stream;
mod expandable;
mod fences;
mod figures;
mod gate;
mod ipc;
mod limits;
mod metadata;
mod moves;
mod private;
mod rare;
mod slow;

use figures::{DriverCounters, PeakRecord};
use limits::HardLimit;

use rare::RareFlags;

use crate::callbacks::{AllocatorCallback, AllocatorEvent, CallbackId};
use crate::error::{Error, OomReport, Result};
use crate::stream::Stream;
pub use buffer::Buffer;
pub use checkpoint::{CheckpointBlock, CheckpointSegment, PoolCheckpoint, RestoreReport};
pub use figures::{OomInfo, OomObserver};
pub use ipc::{ExportedChunk, ExportedRange, ImportedRange};
pub use private::{StreamFilter, MAX_PRIVATE_POOLS};

/// Streams per device that can have a pool (stream indices `0..MAX_STREAM_POOLS`).
pub const MAX_STREAM_POOLS: usize = 4096;

/// One stream's pool, on its own cache line.
#[repr(align(128))]
pub(crate) struct StreamPool {
    pub(crate) stream: Stream,
    /// A private pool (plain segments, routed to by `begin_allocate_to_pool`).
    pub(crate) private: bool,
    pub(crate) state: PoolMutex<PoolState>,
    /// Held by the one thread asking the events of this pool's pending frees, with `state`
    /// unlocked (`process_pending`); never on the fast paths.
    pub(crate) pending_queries: Mutex<()>,
    /// Held by the one thread asking this pool's fences, with `state` unlocked (`safe_tick`):
    /// while it is held, a fence replaced by `cover` keeps its ticket alive until the asking
    /// thread is done (`PoolState::release_retired`). Never on the fast paths.
    pub(crate) fence_queries: Mutex<()>,
}

/// Limits that can change at run time, stored as `f64` bits.
struct Limits {
    fraction: AtomicU64,
    high_watermark: AtomicU64,
    low_watermark: AtomicU64,
    /// `garbage_collection_threshold` (f64 bits; 0 when unset).
    gc_threshold: AtomicU64,
}

#[derive(Default)]
struct Counters {
    num_alloc_retries: AtomicU64,
    num_ooms: AtomicU64,
    num_sync_all_streams: AtomicU64,
    num_device_alloc: AtomicU64,
    num_device_free: AtomicU64,
    num_page_steals: AtomicU64,
    num_pages_remapped: AtomicU64,
    num_moves_deferred: AtomicU64,
    num_moves_exempt: AtomicU64,
    move_time_drawn_peak_us: AtomicU64,
    /// Nanoseconds in virtual-memory driver calls (`EventCounters::vm_call_us`).
    vm_call_ns: AtomicU64,
}

/// Why a new segment could not be had.
enum SegmentFailure {
    Limit(HardLimit),
    DeviceFull,
    /// A driver call failed: its words and result code.
    Driver(String, Option<i32>),
}

/// A provider's refusal: out of memory (the allocator may release its cache and retry), or a
/// failed driver call with its words and code.
impl From<ProviderError> for SegmentFailure {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::OutOfMemory => SegmentFailure::DeviceFull,
            e => {
                let (message, code) = e.into_parts();
                SegmentFailure::Driver(message, code)
            }
        }
    }
}

/// The caching allocator of one device. See the module docs and `ARCHITECTURE.md`.
pub struct CachingAllocator {
    device: Device,
    provider: Arc<dyn MemoryProvider>,
    events: Option<Arc<dyn StreamEvents>>,
    config: AllocatorConfig,
    /// What the pools act on: `config`, less the oversize rules (`max_split_size_mb`) in
    /// expandable mode, where address ranges are not what fragments.
    pool_config: AllocatorConfig,
    /// `roundup_power2_divisions` per size interval: set at build, changeable at run time
    /// (PyTorch's `_set_allocator_settings`); the fast path reads one entry, relaxed.
    rounding: [AtomicU32; crate::config::ROUNDUP_INTERVALS],
    limits: Limits,
    pub(crate) pools: Box<[OnceLock<Box<StreamPool>>]>,
    /// Private pools and the routes to them.
    private: Mutex<private::PrivatePools>,
    /// What the fast paths leave to their cold exit: routes to private pools, a deferred
    /// error, history, callbacks, shapes, `debug_checks`.
    rare: RareFlags,
    /// One past the highest pool index created: slow paths scan `pools[..pools_in_use]`.
    pools_in_use: AtomicUsize,
    /// Address -> owning pool, lock-free for readers.
    pub(crate) pages: PageMap,
    pub(crate) reserved: AtomicU64,
    reserved_peak: AtomicU64,
    /// Where reserved memory was at its last peak, when `record_peak_breakdown` is on.
    peak: PeakRecord,
    segments: AtomicU64,
    segments_peak: AtomicU64,
    counters: Counters,
    callbacks: RwLock<Vec<(CallbackId, AllocatorCallback)>>,
    next_callback: AtomicU64,
    oom_observers: RwLock<Vec<OomObserver>>,
    shapes: Mutex<HashMap<usize, Vec<i64>>>,
    pub(crate) segment_index: RwLock<BTreeMap<usize, u64>>,
    /// Errors of frees that `Buffer`'s `Drop` could not return.
    deferred: crate::deferred::Deferred,
    history: History,
    /// Page size of expandable segments; 0 when they are off.
    pub(crate) vm_page: u64,
    /// Chunks and page-table changes (expandable segments only; never on the fast path).
    pub(crate) vm_state: Mutex<expandable::VmState>,
    /// Driver calls made, per kind.
    driver: DriverCounters,
    /// What the move budget's time is read from ([`Clock`]), and the wall clock's zero.
    clock: RwLock<crate::Clock>,
    born: std::time::Instant,
    /// With `debug_checks`: calls share it, the invariant checker takes it alone
    /// (`check.rs`).
    gate: gate::CheckGate,
}

/// The memory fraction's value while none is set (a set one is in [0, 1]).
pub(crate) const NO_FRACTION: f64 = -1.0;

impl CachingAllocator {
    /// An allocator for `device` over `provider`. `events` enables cross-stream safety
    /// (`record_stream`, `record_events`); without it those calls return an error.
    pub fn new(
        device: Device,
        provider: Arc<dyn MemoryProvider>,
        events: Option<Arc<dyn StreamEvents>>,
        config: AllocatorConfig,
    ) -> Result<Self> {
        config.validate()?;
        // Expandable segments need virtual memory; without it the allocator uses plain
        // segments (`is_expandable()` says which).
        let vm_page = match provider.virtual_memory() {
            Some(vm) if config.expandable_segments => {
                let granularity = vm.granularity() as u64;
                let page = config.expandable_page_size.unwrap_or(granularity);
                if page % granularity != 0 {
                    return Err(Error::Config(format!(
                        "expandable_page_mb:{} is not a multiple of {device}'s page granularity ({}): use a multiple of {} MiB",
                        page >> 20,
                        format_size(granularity),
                        (granularity >> 20).max(1)
                    )));
                }
                page
            }
            _ => 0,
        };
        let pool_config = AllocatorConfig {
            max_split_size: if vm_page != 0 {
                None
            } else {
                config.max_split_size
            },
            ..config.clone()
        };
        let vm_state = Mutex::new(expandable::VmState::new(&config, vm_page));
        Ok(CachingAllocator {
            rare: RareFlags::new(if config.debug_checks {
                RareFlags::DEBUG
            } else {
                0
            }),
            pool_config,
            device,
            provider,
            events,
            limits: Limits {
                fraction: AtomicU64::new(
                    config
                        .per_process_memory_fraction
                        .unwrap_or(NO_FRACTION)
                        .to_bits(),
                ),
                high_watermark: AtomicU64::new(config.high_watermark_ratio.to_bits()),
                low_watermark: AtomicU64::new(config.low_watermark_ratio.to_bits()),
                gc_threshold: AtomicU64::new(
                    config.garbage_collection_threshold.unwrap_or(0.0).to_bits(),
                ),
            },
            rounding: config.roundup_power2_divisions.map(AtomicU32::new),
            config,
            pools: (0..MAX_STREAM_POOLS + MAX_PRIVATE_POOLS)
                .map(|_| OnceLock::new())
                .collect(),
            private: Mutex::new(private::PrivatePools::default()),
            pools_in_use: AtomicUsize::new(0),
            pages: PageMap::new(),
            reserved: AtomicU64::new(0),
            reserved_peak: AtomicU64::new(0),
            peak: PeakRecord::default(),
            segments: AtomicU64::new(0),
            segments_peak: AtomicU64::new(0),
            counters: Counters::default(),
            callbacks: RwLock::new(Vec::new()),
            next_callback: AtomicU64::new(1),
            oom_observers: RwLock::new(Vec::new()),
            shapes: Mutex::new(HashMap::new()),
            segment_index: RwLock::new(BTreeMap::new()),
            deferred: crate::deferred::Deferred::default(),
            history: History::new(),
            vm_page,
            vm_state,
            driver: DriverCounters::default(),
            clock: RwLock::new(crate::Clock::Wall),
            born: std::time::Instant::now(),
            gate: Default::default(),
        })
    }

    /// Read the time the move budget is weighed against from `clock` from now on (the
    /// default: [`Clock::Wall`](crate::Clock::Wall)). Replays set their trace's clock.
    pub fn set_clock(&self, clock: crate::Clock) {
        *self.clock.write() = clock;
    }

    /// Microseconds on the allocator's clock (`None`: no clock).
    pub(crate) fn now_us(&self) -> Option<u64> {
        self.clock.read().now_us(self.born)
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The configuration this allocator was built with (limits may since have been changed
    /// with the setters).
    pub fn config(&self) -> &AllocatorConfig {
        &self.config
    }

    // ---- allocation and free: the fast paths ----------------------------------------------

    /// Allocate `size` bytes for use on `stream`; freed when the buffer is dropped.
    pub fn allocate(&self, size: usize, stream: Stream) -> Result<Buffer<'_>> {
        let ptr = self.raw_alloc(size, stream)?;
        Ok(Buffer {
            alloc: self,
            ptr,
            size,
            stream,
        })
    }

    /// Allocate `size` bytes for use on `stream` and return the address. A zero-sized request
    /// returns 0, which [`CachingAllocator::raw_free`] accepts.
    ///
    /// The fast path: one test for everything rare (a size of 0 or too large, a deferred
    /// error, routes, history, callbacks, `debug_checks`, a stream without a pool yet), the
    /// stream's lock, a cached block already backed by memory. Anything else leaves through
    /// one of two cold exits.
    #[inline]
    pub fn raw_alloc(&self, size: usize, stream: Stream) -> Result<usize> {
        let size = size as u64;
        if size.wrapping_sub(1) < MAX_REQUEST && self.quiet() {
            if let Some((pool_idx, pool)) = self.existing_pool(stream) {
                let rounded = self.round(size);
                let mut st = pool.state.lock();
                if !st.has_pending() {
                    let block = st.take_cached(rounded, size, &self.pool_config);
                    if block != NIL && st.block(block).is_mapped() {
                        return Ok(st.block(block).addr);
                    }
                    return self.alloc_missed(pool_idx, pool, st, block, rounded, size);
                }
            }
        }
        self.alloc_general(size, stream)
    }

    /// The block size that serves `size` bytes under the current `roundup_power2_divisions`.
    #[inline(always)]
    fn round(&self, size: u64) -> u64 {
        let divisions = self.rounding[division_interval(size)].load(Relaxed);
        round_with_divisions(size, divisions)
    }

    /// Whether no rare condition holds (this allocator's, or a process-wide callback).
    #[inline(always)]
    fn quiet(&self) -> bool {
        self.rare.none() && !crate::callbacks::has_allocator_callbacks()
    }

    /// The pool of a stream of this device that already has one.
    #[inline(always)]
    fn existing_pool(&self, stream: Stream) -> Option<(u32, &StreamPool)> {
        let i = stream.index as usize;
        if stream.device != self.device || i >= MAX_STREAM_POOLS {
            return None;
        }
        self.pools[i].get().map(|p| (i as u32, &**p))
    }

    /// The fast path found no backed block in the cache (`block` is `NIL`, or taken but not
    /// wholly mapped).
    #[cold]
    #[inline(never)]
    fn alloc_missed(
        &self,
        pool_idx: u32,
        pool: &StreamPool,
        mut st: PoolGuard<'_, PoolState>,
        block: u32,
        rounded: u64,
        size: u64,
    ) -> Result<usize> {
        if block == NIL {
            drop(st);
            return self.alloc_slow(pool_idx, pool, rounded, size);
        }
        if st.refresh_mapped(block) {
            return Ok(st.block(block).addr);
        }
        st.hold_in_flight(block);
        drop(st);
        self.finish_unmapped(pool_idx, pool, block, rounded, size)
    }

    /// `raw_alloc` with every rare condition handled.
    #[cold]
    #[inline(never)]
    fn alloc_general(&self, size: u64, stream: Stream) -> Result<usize> {
        if self.outside_gate() {
            return self.gated("alloc", || self.alloc_general(size, stream));
        }
        if size == 0 {
            return Ok(0);
        }
        if size > MAX_REQUEST {
            return Err(self.too_large(size));
        }
        if self.rare.has(RareFlags::DEFERRED) {
            return Err(self.take_deferred());
        }
        let (pool_idx, pool) = match self.rare.has(RareFlags::ROUTES) {
            false => self.pool(stream)?,
            true => self.pool_for_capture(stream)?,
        };
        let rounded = self.round(size);
        let mut st = pool.state.lock();
        // Another thread asking the pending frees' events finishes them: take what the cache
        // has rather than wait for it.
        if st.has_pending() && !pool.pending_queries.is_locked() {
            self.process_pending(pool, &mut st);
        }
        let block = st.take_cached(rounded, size, &self.pool_config);
        if block != NIL {
            let (ptr, block_size) = (st.block(block).addr, st.block(block).size);
            if !st.block(block).is_mapped() && !st.refresh_mapped(block) {
                st.hold_in_flight(block);
                drop(st);
                return self.finish_unmapped(pool_idx, pool, block, rounded, size);
            }
            if self.history.enabled() {
                self.note_alloc(&mut st, block, pool.stream.index);
            }
            drop(st);
            if self.callbacks_on() {
                self.fire(ptr, block_size, AllocatorEvent::Recycled);
            }
            return Ok(ptr);
        }
        drop(st);
        self.alloc_slow(pool_idx, pool, rounded, size)
    }

    /// Free an address from [`CachingAllocator::raw_alloc`]. Freeing 0 does nothing.
    /// An address this allocator did not hand out (or already freed) is an error and
    /// changes nothing.
    ///
    /// The fast path: the owning pool from the page map, its lock, the block out of the live
    /// map and into the cache. Rare conditions (looked at under the lock, so a shape attached
    /// before this free is seen) leave through one cold exit; errors through another.
    #[inline]
    pub fn raw_free(&self, ptr: usize) -> Result<()> {
        let Some(pool) = self
            .pages
            .lookup(ptr)
            .and_then(|i| self.pools[i as usize].get())
        else {
            return self.free_unknown(ptr);
        };
        let mut st = pool.state.lock();
        let Some(block) = st.take_live(ptr) else {
            return Err(Self::double_free(ptr));
        };
        if self.quiet() && !pool.private && !st.block(block).has_extras {
            st.free_to_cache(block);
            return Ok(());
        }
        self.free_rest(pool, st, ptr, block)
    }

    /// A free of an address no pool owns: 0 (nothing to do), or not from this allocator.
    #[cold]
    #[inline(never)]
    fn free_unknown(&self, ptr: usize) -> Result<()> {
        if ptr == 0 {
            return Ok(());
        }
        Err(Error::InvalidPointer {
            ptr,
            context: "free: not from this allocator",
        })
    }

    #[cold]
    fn double_free(ptr: usize) -> Error {
        Error::InvalidPointer {
            ptr,
            context: "free: double free, or not from this allocator",
        }
    }

    /// `raw_free` with every rare condition handled, after `block` left the live map.
    #[cold]
    #[inline(never)]
    fn free_rest(
        &self,
        pool: &StreamPool,
        mut st: PoolGuard<'_, PoolState>,
        ptr: usize,
        block: u32,
    ) -> Result<()> {
        if self.outside_gate() {
            // Put the block back and free it again under the checker's gate, which is taken
            // before any pool lock (another thread's double free may win meanwhile: then
            // this one is the error).
            st.restore_live(ptr, block);
            drop(st);
            return self.gated("free", || self.raw_free(ptr));
        }
        if self.history.enabled() {
            self.note_free(&mut st, block, pool.stream.index);
        }
        let b = st.block(block);
        debug_assert!(
            b.addr == ptr && b.state == BlockState::Allocated,
            "live map out of sync at {ptr:#x}"
        );
        let size = b.size;
        if b.has_extras {
            if let Err(e) = self.free_with_extras(&mut st, block) {
                st.restore_live(ptr, block);
                return Err(e);
            }
        } else {
            st.free_to_cache(block);
        }
        let drain = pool.private && st.is_released();
        drop(st);
        if drain {
            self.drain_released_pool(pool);
        }
        if self.rare.has(RareFlags::SHAPES) {
            self.forget_shape(ptr);
        }
        if self.callbacks_on() {
            self.fire(ptr, size, AllocatorEvent::Freed);
        }
        Ok(())
    }

    #[inline(always)]
    fn pool(&self, stream: Stream) -> Result<(u32, &StreamPool)> {
        let i = stream.index as usize;
        if stream.device != self.device || i >= MAX_STREAM_POOLS {
            return Err(self.bad_stream(stream));
        }
        match self.pools[i].get() {
            Some(p) => Ok((i as u32, p)),
            None => Ok((i as u32, self.create_pool(i, stream))),
        }
    }

    /// With routes to private pools in force: the routed pool, else the stream's own.
    #[cold]
    fn pool_for_capture(&self, stream: Stream) -> Result<(u32, &StreamPool)> {
        let own = self.pool(stream)?; // validates the stream
        let Some((index, pool)) = self.routed_pool(stream) else {
            return Ok(own);
        };
        pool.state.lock().add_user(stream);
        Ok((index, pool))
    }

    fn pool_at(&self, idx: u32) -> &StreamPool {
        self.pools[idx as usize]
            .get()
            .expect("a pool index taken from a live structure refers to a pool that exists")
    }

    #[cold]
    fn create_pool(&self, i: usize, stream: Stream) -> &StreamPool {
        let pool = self.pools[i].get_or_init(|| {
            Box::new(StreamPool {
                stream,
                private: false,
                state: PoolMutex::new(PoolState::new()),
                pending_queries: Mutex::new(()),
                fence_queries: Mutex::new(()),
            })
        });
        self.pools_in_use.fetch_max(i + 1, Relaxed);
        pool
    }

    /// The pools created so far, with their indices.
    fn pools_with_index(&self) -> impl Iterator<Item = (usize, &StreamPool)> {
        let n = self.pools_in_use.load(Relaxed);
        self.pools[..n]
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.get().map(|b| (i, &**b)))
    }

    #[cold]
    fn bad_stream(&self, stream: Stream) -> Error {
        let reason = if stream.device != self.device {
            format!(
                "this allocator serves {}, not {}",
                self.device, stream.device
            )
        } else {
            format!(
                "stream index {} is above the {} streams an allocator serves",
                stream.index,
                MAX_STREAM_POOLS - 1
            )
        };
        Error::InvalidStream {
            backend: stream.device.kind,
            device: stream.device.index,
            stream: stream.index,
            reason,
        }
    }

    #[cold]
    fn too_large(&self, size: u64) -> Error {
        Error::InvalidArgument(format!(
            "cannot allocate {size} bytes on {}: requests are limited to {} (is the size a negative number cast to unsigned?)",
            self.device,
            format_size(MAX_REQUEST)
        ))
    }
}

/// Dropping the allocator gives every byte it holds back to the device, live blocks too: a
/// [`Buffer`] borrows the allocator, so none can outlive it, and raw pointers from
/// [`CachingAllocator::raw_alloc`] are invalid once their allocator is gone. Streams that used
/// its memory are waited for first.
impl Drop for CachingAllocator {
    fn drop(&mut self) {
        let mut vm_segments = Vec::new();
        for pool in self.initialized_pools() {
            let _ = self.sync_pending(pool);
            let _ = self.sync_stream(pool);
            let segments = pool.state.lock().take_segments();
            for seg in segments {
                if seg.vm.is_some() {
                    vm_segments.push(seg);
                } else {
                    // SAFETY: the segment came from `provider.allocate` with this size; the
                    // allocator is going away, so nothing can use its blocks any more.
                    unsafe { self.provider.free(seg.base, seg.size as usize) };
                }
            }
            let tickets = pool.state.lock().take_tickets();
            if let Some(events) = &self.events {
                tickets.into_iter().for_each(|t| events.release(t));
            }
        }
        if self.vm_page != 0 {
            self.drop_vm(&vm_segments);
        }
    }
}

impl std::fmt::Debug for CachingAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachingAllocator")
            .field("device", &self.device)
            .field("reserved", &format_size(self.reserved_bytes()))
            .field("config", &self.config.to_conf_string())
            .finish()
    }
}
