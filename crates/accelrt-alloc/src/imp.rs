//! The caching allocator: public API, fast paths and the `#[cold]` slow paths.
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, MutexGuard, RwLock};

use super::history::{
    BlockInfo, BlockStatus, History, HistoryConfig, MemorySnapshot, SegmentInfo, TraceAction,
    TraceEntry,
};
use super::pagemap::PageMap;
use super::pool::{BlockState, PendingFree, PoolState, Segment, NIL};
use super::provider::copy_into_host_visible;
use super::size::{round_size, round_up, segment_size, MAX_REQUEST, MIN_SEGMENT};
use super::{
    format_size, AllocatorConfig, DriverCalls, EventCounters, MemoryProvider, MemoryStats,
    ProviderError, StreamEvents,
};
use crate::device::Device;

mod expandable;
mod private;
mod rare;

use rare::RareFlags;

use crate::error::{Error, OomReport, Result};
use crate::stream::Stream;
pub use private::{StreamFilter, MAX_PRIVATE_POOLS};

/// Streams per device that can have a pool (stream indices `0..MAX_STREAM_POOLS`).
pub const MAX_STREAM_POOLS: usize = 4096;

/// What a registered callback is told, and when it fires. Callbacks run on the thread that
/// made the call, after the allocator's locks are released, so they may call the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum AllocatorEvent {
    /// A new segment came from the device (ptr and size of the segment).
    Allocated,
    /// A cached block was handed out again (ptr and size of the block).
    Recycled,
    /// A block was returned to the cache by a free (for a block used on other streams:
    /// when it was freed, not when the other streams passed it).
    Freed,
    /// A segment was given back to the device (ptr and size of the segment).
    Released,
    /// The device (or a limit) refused a new segment; fired before the allocator retries, so
    /// a callback may free memory (ptr 0, size = bytes requested).
    AllocationFailed,
}

/// A callback: (ptr, size, event).
pub type AllocatorCallback = Arc<dyn Fn(usize, u64, AllocatorEvent) + Send + Sync>;
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

/// Handle for removing a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallbackId(pub u64);

/// A device allocation that returns to the cache when dropped.
#[must_use = "dropping a Buffer frees it"]
pub struct Buffer<'a> {
    alloc: &'a CachingAllocator,
    ptr: usize,
    size: usize,
    stream: Stream,
}

impl Buffer<'_> {
    /// Device address (0 for a zero-sized buffer).
    pub fn ptr(&self) -> usize {
        self.ptr
    }
    /// Bytes requested.
    pub fn size(&self) -> usize {
        self.size
    }
    /// The stream the buffer was allocated on.
    pub fn stream(&self) -> Stream {
        self.stream
    }
    /// Give up ownership: the caller must later call [`CachingAllocator::raw_free`].
    pub fn into_raw(self) -> usize {
        let ptr = self.ptr;
        std::mem::forget(self);
        ptr
    }
}

impl std::fmt::Debug for Buffer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Buffer({:#x}, {} bytes, {})",
            self.ptr, self.size, self.stream
        )
    }
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.alloc.raw_free(self.ptr) {
            // Drop cannot return it: keep it for the next call (cudarc's rule).
            self.alloc.defer_error(e);
        }
    }
}

/// One stream's pool, on its own cache line.
#[repr(align(128))]
pub(crate) struct StreamPool {
    pub(crate) stream: Stream,
    /// A private pool (plain segments, routed to by `begin_allocate_to_pool`).
    pub(crate) private: bool,
    pub(crate) state: Mutex<PoolState>,
}

/// Limits that can change at run time, stored as `f64` bits.
struct Limits {
    fraction: AtomicU64,
    high_watermark: AtomicU64,
    low_watermark: AtomicU64,
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
}

/// Why a new segment could not be had.
enum SegmentFailure {
    Limit(HardLimit),
    DeviceFull,
    /// A driver call failed: its words and result code.
    Driver(String, Option<i32>),
}

/// The limit an allocation hit: the device itself, or one of the configured caps.
#[derive(Debug, Clone, Copy)]
enum HardLimit {
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

/// The caching allocator of one device. See the module docs and `ARCHITECTURE.md`.
pub struct CachingAllocator {
    device: Device,
    provider: Arc<dyn MemoryProvider>,
    events: Option<Arc<dyn StreamEvents>>,
    config: AllocatorConfig,
    /// What the pools act on: `config`, less the oversize rules (`max_split_size_mb`) in
    /// expandable mode, where address ranges are not what fragments.
    pool_config: AllocatorConfig,
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

/// Take a block just carved (under the pool lock) out of the live map, for an allocation
/// that goes on with the lock released (mapping its pages): it is not the caller's until
/// `publish_mapped` puts it back, under the lock the address is returned from.
///
/// The live map holds exactly the blocks callers own, so a free (or any lookup by address) of
/// an in-flight block is refused like a double free. It can only be a stale one (a double
/// free, or a use after free, of a pointer whose address is being handed out again); accepted,
/// it sent the block back to the cache while the allocation went on with it, so the block was
/// handed out twice, and released twice, onto a free list it was already on (a cycle), when
/// mapping then failed (issue 13 item 4).
#[inline]
pub(super) fn hold_in_flight(st: &mut PoolState, block: u32) {
    let addr = st.blocks[block as usize].addr;
    let held = st.live.remove(&addr);
    debug_assert_eq!(held, Some(block), "a block just carved is live");
}

fn f64_bits(v: Option<f64>) -> u64 {
    v.unwrap_or(0.0).to_bits()
}

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
                fraction: AtomicU64::new(f64_bits(config.per_process_memory_fraction)),
                high_watermark: AtomicU64::new(config.high_watermark_ratio.to_bits()),
                low_watermark: AtomicU64::new(config.low_watermark_ratio.to_bits()),
            },
            config,
            pools: (0..MAX_STREAM_POOLS + MAX_PRIVATE_POOLS)
                .map(|_| OnceLock::new())
                .collect(),
            private: Mutex::new(private::PrivatePools::default()),
            pools_in_use: AtomicUsize::new(0),
            pages: PageMap::new(),
            reserved: AtomicU64::new(0),
            reserved_peak: AtomicU64::new(0),
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
            vm_state: Mutex::new(expandable::VmState::new(vm_page)),
            driver: DriverCounters::default(),
        })
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
                let rounded = round_size(size, &self.config);
                let mut st = pool.state.lock();
                if st.pending.is_empty() {
                    let block = st.take_cached(rounded, size, &self.pool_config);
                    if block != NIL && st.blocks[block as usize].is_mapped() {
                        return Ok(st.blocks[block as usize].addr);
                    }
                    return self.alloc_missed(pool_idx, pool, st, block, rounded, size);
                }
            }
        }
        self.alloc_general(size, stream)
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
        mut st: MutexGuard<'_, PoolState>,
        block: u32,
        rounded: u64,
        size: u64,
    ) -> Result<usize> {
        if block == NIL {
            drop(st);
            return self.alloc_slow(pool_idx, pool, rounded, size);
        }
        if st.refresh_mapped(block) {
            return Ok(st.blocks[block as usize].addr);
        }
        hold_in_flight(&mut st, block);
        drop(st);
        self.finish_unmapped(pool_idx, pool, block, rounded, size)
    }

    /// `raw_alloc` with every rare condition handled.
    #[cold]
    #[inline(never)]
    fn alloc_general(&self, size: u64, stream: Stream) -> Result<usize> {
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
        let rounded = round_size(size, &self.config);
        let mut st = pool.state.lock();
        if !st.pending.is_empty() {
            self.process_pending(&mut st, pool.stream.index);
        }
        let block = st.take_cached(rounded, size, &self.pool_config);
        if block != NIL {
            let ptr = st.blocks[block as usize].addr;
            let block_size = st.blocks[block as usize].size;
            if !st.blocks[block as usize].is_mapped() && !st.refresh_mapped(block) {
                hold_in_flight(&mut st, block);
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
            if self.config.debug_checks {
                self.debug_check("alloc");
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
        let Some(block) = st.live.remove(&ptr) else {
            return Err(Self::double_free(ptr));
        };
        if self.quiet() && !pool.private && !st.blocks[block as usize].has_extras {
            st.account_free(block);
            st.release_to_cache(block);
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
        mut st: MutexGuard<'_, PoolState>,
        ptr: usize,
        block: u32,
    ) -> Result<()> {
        if self.history.enabled() {
            self.note_free(&mut st, block, pool.stream.index);
        }
        let b = &st.blocks[block as usize];
        debug_assert!(
            b.addr == ptr && b.state == BlockState::Allocated,
            "live map out of sync at {ptr:#x}"
        );
        let size = b.size;
        if b.has_extras {
            if let Err(e) = self.free_with_extras(&mut st, block) {
                st.live.insert(ptr, block);
                return Err(e);
            }
        } else {
            st.account_free(block);
            st.release_to_cache(block);
        }
        let drain = pool.private && st.released;
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
        if self.config.debug_checks {
            self.debug_check("free");
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
        let mut st = pool.state.lock();
        if !st.users.contains(&stream) {
            st.users.push(stream);
        }
        drop(st);
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
                state: Mutex::new(PoolState::new()),
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

    // ---- the slow path ---------------------------------------------------------------------

    /// No cached block fits: collect garbage if over a soft limit, take a new segment, and on
    /// failure let callbacks free memory, release the whole cache and try once more.
    #[cold]
    #[inline(never)]
    fn alloc_slow(
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
    fn reserve_for(&self, rounded: u64) -> std::result::Result<(usize, u64), SegmentFailure> {
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

    fn try_cached(&self, pool: &StreamPool, rounded: u64, size: u64) -> Option<usize> {
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
    fn hard_limit(&self) -> Option<(u64, HardLimit)> {
        let (_, total) = self.provider.memory_info();
        let mut limit: Option<(u64, HardLimit)> = None;
        let fraction = f64::from_bits(self.limits.fraction.load(Relaxed));
        if fraction > 0.0 {
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
    fn soft_limit(&self) -> Option<u64> {
        let low = f64::from_bits(self.limits.low_watermark.load(Relaxed));
        let mut soft = (low > 0.0).then(|| (self.provider.recommended_max() as f64 * low) as u64);
        if let Some(t) = self.config.garbage_collection_threshold {
            let fraction = f64::from_bits(self.limits.fraction.load(Relaxed));
            if fraction > 0.0 {
                let bytes = (self.provider.memory_info().1 as f64 * fraction * t) as u64;
                soft = Some(soft.map_or(bytes, |s| s.min(bytes)));
            }
        }
        soft
    }

    /// Count `bytes` more as reserved if the hard limit allows; returns the new total.
    fn claim_reserved(&self, bytes: u64) -> std::result::Result<u64, SegmentFailure> {
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
    fn sync_stream(&self, pool: &StreamPool) -> Result<()> {
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
            if tick > newest && st.fences.len() < super::pool::MAX_FENCES {
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

    fn reserve_segment(&self, seg_size: u64) -> std::result::Result<usize, SegmentFailure> {
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
                Err(match e {
                    ProviderError::OutOfMemory => SegmentFailure::DeviceFull,
                    e => {
                        let (message, code) = e.into_parts();
                        SegmentFailure::Driver(message, code)
                    }
                })
            }
        }
    }

    fn give_back(&self, seg: Segment, stream: u32) {
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

    fn initialized_pools(&self) -> impl Iterator<Item = &StreamPool> {
        self.pools_with_index().map(|(_, p)| p)
    }

    /// Finish frees whose events have all completed.
    fn process_pending(&self, st: &mut PoolState, stream: u32) {
        let Some(events) = &self.events else { return };
        let mut i = 0;
        while i < st.pending.len() {
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
    fn sync_pending(&self, pool: &StreamPool) -> Result<()> {
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
    fn release_cached(&self, wait: bool) -> Result<()> {
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
    fn collect_garbage(&self, incoming: u64, requester: &StreamPool) {
        if let Some(soft) = self.soft_limit() {
            self.release_oldest_until(soft, incoming, Some(requester));
        }
    }

    /// Growing by `incoming` would set a new peak of reserved memory: first give back whole
    /// cached segments (they cannot serve this request, or it would have found them), least
    /// recently used first, until the old peak holds or none is left.
    fn release_before_new_peak(&self, incoming: u64, requester: &StreamPool) {
        self.release_oldest_until(self.reserved_peak.load(Relaxed), incoming, Some(requester));
    }

    /// Give back whole cached segments of every pool, least recently used first, until
    /// `reserved + incoming <= target` or none is left. Never waits: a segment goes only once
    /// a completed fence on its pool's stream shows the work that used it done (a device free
    /// would wait for the device, and unmapping host memory would not wait at all). Where
    /// `requester`'s own segments were too recent, a fence is recorded to cover them next time.
    fn release_oldest_until(&self, target: u64, incoming: u64, requester: Option<&StreamPool>) {
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
    fn out_of_memory(&self, requested: u64, limit: HardLimit) -> Error {
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

    // ---- cross-stream use ------------------------------------------------------------------

    /// Free a block that other streams used or that has recorded events: it goes back to the
    /// cache only once events recorded now on those streams have completed.
    #[cold]
    fn free_with_extras(&self, st: &mut PoolState, block: u32) -> Result<()> {
        let extras = st.extras.remove(&block).unwrap_or_default();
        let mut recorded = Vec::with_capacity(extras.stream_uses.len());
        if let Some(events) = &self.events {
            for s in &extras.stream_uses {
                self.driver.event_record.fetch_add(1, Relaxed);
                match events.record(*s) {
                    Ok(t) => recorded.push(t),
                    Err(e) => {
                        // Leave the block allocated, with its extras, exactly as it was.
                        recorded.into_iter().for_each(|t| events.release(t));
                        st.extras.insert(block, extras);
                        return Err(e);
                    }
                }
            }
        }
        let mut tickets = extras.events;
        tickets.extend(recorded);
        st.blocks[block as usize].has_extras = false;
        st.account_free(block);
        if tickets.is_empty() {
            st.release_to_cache(block);
        } else {
            st.blocks[block as usize].state = BlockState::Pending;
            st.pending.push(PendingFree { block, tickets });
        }
        Ok(())
    }

    /// Run `f` on the live block at `ptr` under its pool's lock.
    fn with_live_block<R>(
        &self,
        ptr: usize,
        what: &'static str,
        f: impl FnOnce(&mut PoolState, u32, &StreamPool) -> R,
    ) -> Result<R> {
        let pool = self
            .pages
            .lookup(ptr)
            .and_then(|i| self.pools[i as usize].get());
        let Some(pool) = pool else {
            return Err(Error::InvalidPointer { ptr, context: what });
        };
        let mut st = pool.state.lock();
        let Some(&block) = st.live.get(&ptr) else {
            return Err(Error::InvalidPointer { ptr, context: what });
        };
        Ok(f(&mut st, block, pool))
    }

    fn require_events(&self, what: &'static str) -> Result<&Arc<dyn StreamEvents>> {
        self.events
            .as_ref()
            .ok_or(Error::unsupported(self.device.kind, what))
    }

    /// Mark `ptr` as used by `stream` too: when freed, it is not reused until the work
    /// queued on `stream` up to the free has completed.
    pub fn record_stream(&self, ptr: usize, stream: Stream) -> Result<()> {
        self.require_events("record_stream on an allocator without an event source")?;
        if stream.device != self.device {
            return Err(self.bad_stream(stream));
        }
        self.with_live_block(ptr, "record_stream", |st, block, pool| {
            if pool.stream != stream {
                let uses = &mut st.extras.entry(block).or_default().stream_uses;
                if !uses.contains(&stream) {
                    uses.push(stream);
                }
                st.blocks[block as usize].has_extras = true;
            }
        })
    }

    /// Record an event on `stream` for each buffer (MPS `recordEvents`): the buffers are in
    /// use there until [`CachingAllocator::wait_for_events`], and a free waits for them.
    pub fn record_events(&self, ptrs: &[usize], stream: Stream) -> Result<()> {
        let events =
            self.require_events("record_events on an allocator without an event source")?;
        if stream.device != self.device {
            return Err(self.bad_stream(stream));
        }
        for &ptr in ptrs {
            self.with_live_block(ptr, "record_events", |_, _, _| ())?;
        }
        for &ptr in ptrs {
            self.driver.event_record.fetch_add(1, Relaxed);
            let ticket = events.record(stream)?;
            let attached = self.with_live_block(ptr, "record_events", |st, block, _| {
                st.extras.entry(block).or_default().events.push(ticket);
                st.blocks[block as usize].has_extras = true;
            });
            if attached.is_err() {
                events.release(ticket); // freed meanwhile by another thread
            }
            attached?;
        }
        Ok(())
    }

    /// Block until the events recorded for these buffers have completed (MPS
    /// `waitForEvents`), then give back cached segments whose waits are over.
    pub fn wait_for_events(&self, ptrs: &[usize]) -> Result<()> {
        let events =
            self.require_events("wait_for_events on an allocator without an event source")?;
        for &ptr in ptrs {
            let tickets = self.with_live_block(ptr, "wait_for_events", |st, block, _| {
                let Some(x) = st.extras.get_mut(&block) else {
                    return Vec::new();
                };
                let tickets = std::mem::take(&mut x.events);
                if x.stream_uses.is_empty() {
                    st.extras.remove(&block);
                    st.blocks[block as usize].has_extras = false;
                }
                tickets
            })?;
            for t in tickets {
                self.driver.synchronize.fetch_add(1, Relaxed);
                let r = events.synchronize(t);
                events.release(t);
                r?;
            }
        }
        self.free_inactive_buffers()
    }

    // ---- cache control ---------------------------------------------------------------------

    /// Give every cached whole segment back to the device, after waiting for pending
    /// cross-stream frees. Split segments with live blocks stay.
    pub fn empty_cache(&self) -> Result<()> {
        if self.rare.has(RareFlags::DEFERRED) {
            return Err(self.take_deferred());
        }
        self.release_cached(true)?;
        if self.config.debug_checks {
            self.debug_check("empty_cache");
        }
        Ok(())
    }

    /// Finish the frees whose streams have passed (MPS's `freeInactiveBuffers`): blocks
    /// freed while other streams still used them (`record_stream`, `record_events`) go back
    /// to the cache once those streams' events have completed. Waits for nothing and gives
    /// nothing back to the device (that is [`CachingAllocator::empty_cache`]).
    pub fn free_inactive_buffers(&self) -> Result<()> {
        if self.rare.has(RareFlags::DEFERRED) {
            return Err(self.take_deferred());
        }
        for pool in self.initialized_pools() {
            let mut st = pool.state.lock();
            if !st.pending.is_empty() {
                self.process_pending(&mut st, pool.stream.index);
            }
        }
        Ok(())
    }

    // ---- buffer metadata -------------------------------------------------------------------

    /// Bytes the caller asked for when allocating `ptr` (before rounding).
    pub fn requested_size(&self, ptr: usize) -> Result<u64> {
        self.with_live_block(ptr, "requested_size", |st, b, _| {
            st.blocks[b as usize].requested
        })
    }

    /// Bytes reserved for `ptr` (the rounded block size).
    pub fn block_size(&self, ptr: usize) -> Result<u64> {
        self.with_live_block(ptr, "block_size", |st, b, _| st.blocks[b as usize].size)
    }

    /// A unique id for the allocation at `ptr` among this allocator's allocations (never 0,
    /// never reused): the pool's allocation count times the number of pool slots, plus the
    /// pool's slot (stream pools, then private pools), so ids of different pools never meet.
    pub fn buffer_id(&self, ptr: usize) -> Result<u64> {
        const POOL_SLOTS: u64 = (MAX_STREAM_POOLS + MAX_PRIVATE_POOLS) as u64;
        self.with_live_block(ptr, "buffer_id", |st, b, pool| {
            st.blocks[b as usize].id * POOL_SLOTS + u64::from(pool.stream.index)
        })
    }

    /// Attach a tensor shape to a live buffer (kept until it is freed).
    pub fn set_buffer_shape(&self, ptr: usize, shape: &[i64]) -> Result<()> {
        self.with_live_block(ptr, "set_buffer_shape", |_, _, _| {
            let mut shapes = self.shapes.lock();
            shapes.insert(ptr, shape.to_vec());
            self.rare.set(RareFlags::SHAPES, true);
        })
    }

    /// The shape attached with [`CachingAllocator::set_buffer_shape`] (empty if none).
    pub fn buffer_shape(&self, ptr: usize) -> Result<Vec<i64>> {
        self.with_live_block(ptr, "buffer_shape", |_, _, _| {
            self.shapes.lock().get(&ptr).cloned().unwrap_or_default()
        })
    }

    #[cold]
    fn forget_shape(&self, ptr: usize) {
        let mut shapes = self.shapes.lock();
        if shapes.remove(&ptr).is_some() && shapes.is_empty() {
            self.rare.set(RareFlags::SHAPES, false);
        }
    }

    /// Whether device memory is host-visible, so buffers can be shared with the host.
    pub fn is_shared_storage_supported(&self) -> bool {
        self.provider.host_visible()
    }

    /// Whether `ptr` is a live buffer the host can address directly.
    pub fn is_shared_buffer(&self, ptr: usize) -> bool {
        self.provider.host_visible()
            && self
                .with_live_block(ptr, "is_shared_buffer", |_, _, _| ())
                .is_ok()
    }

    /// The host address of a shared buffer. Refused where device memory is not
    /// host-visible (CUDA: memory from `cuMemAlloc` / `cuMemCreate` has no host address; use
    /// the backend's pinned allocator for buffers both sides address).
    pub fn shared_host_ptr(&self, ptr: usize) -> Result<*mut u8> {
        if !self.provider.host_visible() {
            return Err(Error::unsupported(
                self.device.kind,
                "shared_host_ptr() (device memory here is not host-visible: use the \
                 backend's pinned_allocator() for memory both the host and the device address)",
            ));
        }
        self.with_live_block(ptr, "shared_host_ptr", |_, _, _| ptr as *mut u8)
    }

    /// Allocate a buffer holding `value` (MPS's scalar buffers), written by the host at
    /// once: for host-visible memory only. On any backend, including CUDA, use
    /// `accelrt::Backend::alloc_scalar_with_value`, which writes in stream order.
    pub fn alloc_scalar_with_value(&self, value: &[u8], stream: Stream) -> Result<usize> {
        if !self.provider.host_visible() {
            return Err(Error::unsupported(
                self.device.kind,
                "CachingAllocator::alloc_scalar_with_value() (the host cannot write device \
                 memory here: use Backend::alloc_scalar_with_value, which writes in stream order)",
            ));
        }
        if value.is_empty() {
            return Err(Error::InvalidArgument(
                "alloc_scalar_with_value needs at least one byte".into(),
            ));
        }
        let ptr = self.raw_alloc(value.len(), stream)?;
        // SAFETY: `ptr` is a fresh block of at least `value.len()` bytes of host-visible
        // memory that nobody else has yet.
        unsafe { copy_into_host_visible(ptr, value) };
        Ok(ptr)
    }

    /// Check that `ptr .. ptr + len` lies inside one live allocation (an interior range is
    /// fine, as a tensor view's is): what a copy between device buffers may touch. An error
    /// names `what` and says which part of the check failed.
    pub fn check_live_range(&self, ptr: usize, len: usize, what: &'static str) -> Result<()> {
        let end = ptr.checked_add(len).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{what}: {ptr:#x} + {len} bytes runs past the end of the address space"
            ))
        })?;
        let pool = self
            .pages
            .lookup(ptr)
            .and_then(|i| self.pools[i as usize].get())
            .ok_or(Error::InvalidPointer {
                ptr,
                context: "not inside memory of this allocator",
            })?;
        let st = pool.state.lock();
        let Some(seg) = st
            .segments
            .iter()
            .find(|s| s.base <= ptr && ptr < s.base + s.size as usize)
        else {
            return Err(Error::InvalidPointer {
                ptr,
                context: "not inside memory of this allocator",
            });
        };
        let mut b = seg.head;
        while b != NIL {
            let block = &st.blocks[b as usize];
            if block.addr <= ptr && ptr < block.addr + block.size as usize {
                if block.state != BlockState::Allocated || !st.live.contains_key(&block.addr) {
                    return Err(Error::InvalidPointer {
                        ptr,
                        context: "inside a freed block (a use after free?)",
                    });
                }
                let block_end = block.addr + block.size as usize;
                if end > block_end {
                    return Err(Error::InvalidArgument(format!(
                        "{what}: {ptr:#x} + {len} bytes runs {} bytes past the end of its \
                         allocation ({:#x}, {} bytes)",
                        end - block_end,
                        block.addr,
                        block.size
                    )));
                }
                return Ok(());
            }
            b = block.next;
        }
        Err(Error::InvalidPointer {
            ptr,
            context: "not inside memory of this allocator",
        })
    }

    /// Whether `ptr` lies inside memory this allocator holds (live or cached).
    pub fn contains(&self, ptr: usize) -> bool {
        let index = self.segment_index.read();
        index
            .range(..=ptr)
            .next_back()
            .is_some_and(|(&base, &size)| ptr < base + size as usize)
    }

    // ---- limits ----------------------------------------------------------------------------

    fn check_ratio(what: &str, r: f64) -> Result<()> {
        if !(0.0..=2.0).contains(&r) {
            return Err(Error::InvalidArgument(format!(
                "{what} must be in [0, 2] (0 disables), got {r}"
            )));
        }
        Ok(())
    }

    /// Hard limit as a ratio of the recommended maximum; 0 disables.
    pub fn set_high_watermark_ratio(&self, ratio: f64) -> Result<()> {
        Self::check_ratio("high_watermark_ratio", ratio)?;
        let low = self.low_watermark_ratio();
        if ratio > 0.0 && low > ratio {
            return Err(Error::InvalidArgument(format!(
                "high_watermark_ratio {ratio} is below low_watermark_ratio {low}"
            )));
        }
        self.limits.high_watermark.store(ratio.to_bits(), Relaxed);
        Ok(())
    }
    pub fn high_watermark_ratio(&self) -> f64 {
        f64::from_bits(self.limits.high_watermark.load(Relaxed))
    }
    /// Soft limit as a ratio of the recommended maximum; 0 disables garbage collection.
    pub fn set_low_watermark_ratio(&self, ratio: f64) -> Result<()> {
        Self::check_ratio("low_watermark_ratio", ratio)?;
        let high = self.high_watermark_ratio();
        if high > 0.0 && ratio > high {
            return Err(Error::InvalidArgument(format!(
                "low_watermark_ratio {ratio} exceeds high_watermark_ratio {high}"
            )));
        }
        self.limits.low_watermark.store(ratio.to_bits(), Relaxed);
        Ok(())
    }
    pub fn low_watermark_ratio(&self) -> f64 {
        f64::from_bits(self.limits.low_watermark.load(Relaxed))
    }
    /// Cap reserved memory at `fraction` of device memory, in (0, 1].
    pub fn set_memory_fraction(&self, fraction: f64) -> Result<()> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "memory fraction must be in (0, 1], got {fraction}"
            )));
        }
        self.limits.fraction.store(fraction.to_bits(), Relaxed);
        Ok(())
    }
    pub fn memory_fraction(&self) -> Option<f64> {
        let f = f64::from_bits(self.limits.fraction.load(Relaxed));
        (f > 0.0).then_some(f)
    }
    /// The low watermark in bytes (MPS's `getLowWatermarkLimit`): above it, cached memory
    /// is released before the allocator grows. `None` when no low watermark is set.
    pub fn low_watermark_limit(&self) -> Option<u64> {
        let low = self.low_watermark_ratio();
        (low > 0.0).then(|| (self.provider.recommended_max() as f64 * low) as u64)
    }
    /// The high watermark in bytes (MPS's `getHighWatermarkLimit`): reserved memory never
    /// exceeds it. `None` when no high watermark is set.
    pub fn high_watermark_limit(&self) -> Option<u64> {
        let high = self.high_watermark_ratio();
        (high > 0.0).then(|| (self.provider.recommended_max() as f64 * high) as u64)
    }
    /// Bytes left before the low watermark, negative once reserved memory is above it (MPS's
    /// signed `getLowWatermarkValue`). `None` when no low watermark is set.
    pub fn low_watermark_value(&self) -> Option<i64> {
        self.low_watermark_limit().map(|limit| {
            let reserved = self.reserved_bytes();
            if limit >= reserved {
                i64::try_from(limit - reserved).unwrap_or(i64::MAX)
            } else {
                i64::try_from(reserved - limit).map_or(i64::MIN, |over| -over)
            }
        })
    }
    /// Bytes that can still be reserved before the low watermark (0 when above it; `None`
    /// when no low watermark is set).
    pub fn low_watermark_headroom(&self) -> Option<u64> {
        let low = self.low_watermark_ratio();
        (low > 0.0).then(|| {
            ((self.provider.recommended_max() as f64 * low) as u64)
                .saturating_sub(self.reserved_bytes())
        })
    }

    // ---- figures ---------------------------------------------------------------------------

    /// Bytes held from the device (MPS `getTotalAllocatedMemory`).
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved.load(Relaxed)
    }
    /// Bytes of live blocks (MPS `getCurrentAllocatedMemory`).
    pub fn allocated_bytes(&self) -> u64 {
        self.initialized_pools()
            .map(|p| {
                let st = p.state.lock();
                st.stats[0].allocated_bytes.current + st.stats[1].allocated_bytes.current
            })
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
            s.small_pool = s.small_pool.merged(st.stats[0]);
            s.large_pool = s.large_pool.merged(st.stats[1]);
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
    }

    /// Zero the allocated/freed totals and the event counters.
    pub fn reset_accumulated_stats(&self) {
        for pool in self.initialized_pools() {
            let mut st = pool.state.lock();
            st.stats.iter_mut().for_each(|s| s.reset_accumulated());
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
    fn note_alloc(&self, st: &mut PoolState, block: u32, stream: u32) {
        let b = &st.blocks[block as usize];
        let (addr, requested) = (b.addr as u64, b.requested);
        self.history
            .record(TraceAction::Alloc, addr, requested, stream);
        if let Some(frames) = self.history.context() {
            st.frames.insert(block, frames);
        }
    }

    #[cold]
    fn note_free(&self, st: &mut PoolState, block: u32, stream: u32) {
        let b = &st.blocks[block as usize];
        let (addr, requested, pending) = (b.addr as u64, b.requested, b.has_extras);
        self.history
            .record(TraceAction::FreeRequested, addr, requested, stream);
        if !pending {
            self.history
                .record(TraceAction::FreeCompleted, addr, requested, stream);
        }
        st.frames.remove(&block);
    }

    /// Every segment with its blocks, and the recorded history (PyTorch's `_snapshot`).
    /// Segments are ordered by address.
    pub fn memory_snapshot(&self) -> MemorySnapshot {
        if self.history.enabled() {
            self.history.record(TraceAction::Snapshot, 0, 0, u32::MAX);
        }
        let mut segments = Vec::new();
        for pool in self.initialized_pools() {
            let st = pool.state.lock();
            for (pos, seg) in st.segments.iter().enumerate() {
                let mut info = SegmentInfo {
                    device: self.device.index,
                    address: seg.base as u64,
                    total_size: seg.size,
                    stream: pool.stream.index,
                    segment_type: seg.kind,
                    segment_pool_id: (st.pool_id.0, st.pool_id.1),
                    is_expandable: seg.vm.is_some(),
                    unmapped: Self::unmapped_ranges(&st, pos),
                    allocated_size: 0,
                    active_size: 0,
                    requested_size: 0,
                    blocks: Vec::new(),
                };
                let mut cur = seg.head;
                while cur != NIL {
                    let b = &st.blocks[cur as usize];
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
                        frames: st.frames.get(&cur).cloned(),
                    });
                    cur = b.next;
                }
                segments.push(info);
            }
        }
        segments.sort_by_key(|s| s.address);
        MemorySnapshot {
            device: self.device,
            segments,
            history: self.history.entries(),
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
    fn callbacks_on(&self) -> bool {
        self.rare.has(RareFlags::CALLBACKS) || crate::callbacks::has_allocator_callbacks()
    }

    #[cold]
    #[inline(never)]
    fn fire(&self, ptr: usize, size: u64, event: AllocatorEvent) {
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
    fn defer_error(&self, e: Error) {
        self.deferred.keep(e);
        self.rare.set(RareFlags::DEFERRED, true);
    }

    /// The kept errors as one: the error itself when there was one, else every one's words.
    #[cold]
    fn take_deferred(&self) -> Error {
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

    #[cold]
    fn debug_check(&self, after: &str) {
        if let Err(e) = self.check_invariants() {
            panic!("accelrt allocator invariant broken after {after}: {e}");
        }
    }

    pub(crate) fn pool_states(&self) -> impl Iterator<Item = (u32, &StreamPool)> {
        self.pools_with_index().map(|(i, p)| (i as u32, p))
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
            let segments = std::mem::take(&mut pool.state.lock().segments);
            for seg in segments {
                if seg.vm.is_some() {
                    vm_segments.push(seg);
                } else {
                    // SAFETY: the segment came from `provider.allocate` with this size; the
                    // allocator is going away, so nothing can use its blocks any more.
                    unsafe { self.provider.free(seg.base, seg.size as usize) };
                }
            }
            let (pending, fence) = {
                let mut st = pool.state.lock();
                (
                    std::mem::take(&mut st.pending),
                    std::mem::take(&mut st.fences),
                )
            };
            if let Some(events) = &self.events {
                pending
                    .iter()
                    .flat_map(|p| &p.tickets)
                    .for_each(|&t| events.release(t));
                fence.into_iter().for_each(|(_, t)| events.release(t));
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
