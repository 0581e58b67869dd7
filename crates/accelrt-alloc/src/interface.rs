//! [`DeviceAllocator`]: what a device's allocator answers, as PyTorch's allocator interfaces
//! (`c10::Allocator` with `c10::DeviceAllocator`, and MPS's `IMPSAllocator`) ask it. The
//! hooks (`accelrt::Backend::device_allocator`) hand it out, so they name no allocator type;
//! [`CachingAllocator`] implements it, and what only it has (private-pool routing,
//! checkpoints, IPC ranges, `check_invariants`) stays on the concrete type.
//!
//! A call through `dyn DeviceAllocator` costs one indirect call; code on a hot path that
//! holds the concrete allocator (the benches, the C ABI) calls `CachingAllocator`'s own
//! methods, which this trait only forwards to.

use std::any::Any;
use std::sync::Arc;

use crate::caching::{CachingAllocator, OomObserver};
use crate::callbacks::{AllocatorCallback, CallbackId};
use crate::device::Device;
use crate::error::Result;
use crate::graph::MempoolId;
use crate::history::{HistoryConfig, MemorySnapshot};
use crate::stats::MemoryStats;
use crate::stream::Stream;

/// A device's allocator, as PyTorch's allocator interfaces ask it (the method names are
/// accelrt's; `ARCHITECTURE.md` maps each PyTorch method to one). Addresses are `usize`,
/// sizes of blocks `u64`; every call that names a pointer refuses one the allocator does not
/// hold.
pub trait DeviceAllocator: Send + Sync + 'static {
    /// The device the memory is on.
    fn device(&self) -> Device;

    // ---- c10::Allocator and c10::DeviceAllocator -------------------------------------------
    /// `size` bytes for work on `stream` (0 bytes: address 0).
    fn raw_alloc(&self, size: usize, stream: Stream) -> Result<usize>;
    /// Give `ptr` back; work queued on its stream (and the streams given to
    /// [`DeviceAllocator::record_stream`]) may still use it.
    fn raw_free(&self, ptr: usize) -> Result<()>;
    /// `recordStream`: `ptr` is used by `stream` too, so its free waits for that stream.
    fn record_stream(&self, ptr: usize, stream: Stream) -> Result<()>;
    /// `emptyCache`: give cached whole segments back to the device.
    fn empty_cache(&self) -> Result<()>;
    /// `emptyCache(mempool)`: drop a use of private pool `id`; at zero its memory goes back.
    fn release_pool(&self, id: MempoolId) -> Result<()>;
    /// Uses of private pool `id` (`getPoolUseCount`), `None` if there is no such pool.
    fn pool_use_count(&self, id: MempoolId) -> Option<u32>;
    /// `getDeviceStats`.
    fn stats(&self) -> MemoryStats;
    /// `resetAccumulatedStats`.
    fn reset_accumulated_stats(&self);
    /// `resetPeakStats`.
    fn reset_peak_stats(&self);

    // ---- IMPSAllocator --------------------------------------------------------------------
    /// `freeInactiveBuffers`: finish frees whose streams have passed; waits for nothing.
    fn free_inactive_buffers(&self) -> Result<()>;
    /// `getUnalignedBufferSize`: the bytes asked for when `ptr` was allocated.
    fn requested_size(&self, ptr: usize) -> Result<u64>;
    /// The rounded bytes reserved for `ptr`.
    fn block_size(&self, ptr: usize) -> Result<u64>;
    /// `getBufferId`: unique among the allocator's allocations, never reused.
    fn buffer_id(&self, ptr: usize) -> Result<u64>;
    /// `setBufferShape`.
    fn set_buffer_shape(&self, ptr: usize, shape: &[i64]) -> Result<()>;
    /// `getBufferShape` (empty if none was set).
    fn buffer_shape(&self, ptr: usize) -> Result<Vec<i64>>;
    /// `isSharedStorageSupported`: whether the host can address device memory.
    fn is_shared_storage_supported(&self) -> bool;
    /// `isSharedBuffer`.
    fn is_shared_buffer(&self, ptr: usize) -> bool;
    /// `getSharedBufferPtr`: the host address of a shared buffer (refused where device
    /// memory is not host-visible).
    fn shared_host_ptr(&self, ptr: usize) -> Result<*mut u8>;
    /// `allocScalarBufferWithValue`, written by the host at once: host-visible memory only
    /// (`Backend::alloc_scalar_with_value` writes in stream order on any device).
    fn alloc_scalar_with_value(&self, value: &[u8], stream: Stream) -> Result<usize>;
    /// `setLowWatermarkRatio`: the soft limit, a ratio of the recommended maximum.
    fn set_low_watermark_ratio(&self, ratio: f64) -> Result<()>;
    /// `setHighWatermarkRatio`: the hard limit, a ratio of the recommended maximum.
    fn set_high_watermark_ratio(&self, ratio: f64) -> Result<()>;
    /// `getLowWatermarkLimit` in bytes (`None` when off).
    fn low_watermark_limit(&self) -> Option<u64>;
    /// `getHighWatermarkLimit` in bytes (`None` when off).
    fn high_watermark_limit(&self) -> Option<u64>;
    /// `getLowWatermarkValue`: bytes left before the low watermark, negative above it.
    fn low_watermark_value(&self) -> Option<i64>;
    /// `setMemoryFraction`: cap reserved memory at `fraction` of the device's.
    fn set_memory_fraction(&self, fraction: f64) -> Result<()>;
    /// `getTotalAllocatedMemory`: bytes held from the device.
    fn reserved_bytes(&self) -> u64;
    /// `getCurrentAllocatedMemory`: bytes of live blocks.
    fn allocated_bytes(&self) -> u64;
    /// `getDriverAllocatedMemory`: the memory provider's figure.
    fn driver_allocated(&self) -> u64;
    /// `getRecommendedMaxMemory`: the memory provider's figure.
    fn recommended_max(&self) -> u64;
    /// `recordEvents`: the buffers are in use on `stream` until
    /// [`DeviceAllocator::wait_for_events`].
    fn record_events(&self, ptrs: &[usize], stream: Stream) -> Result<()>;
    /// `waitForEvents`: block until the buffers' recorded events have completed.
    fn wait_for_events(&self, ptrs: &[usize]) -> Result<()>;

    // ---- history, callbacks, observers ---------------------------------------------------
    /// `recordMemoryHistory`: start (`Some`) or stop (`None`) recording events.
    fn record_memory_history(&self, config: Option<HistoryConfig>);
    /// `memorySnapshot`: segments, blocks and the recorded history.
    fn memory_snapshot(&self) -> MemorySnapshot;
    /// One allocator's callbacks (`IMpsAllocatorCallback`).
    fn add_callback(&self, callback: AllocatorCallback) -> CallbackId;
    /// Remove a callback; false if it was not registered.
    fn remove_callback(&self, id: CallbackId) -> bool;
    /// `attachOutOfMemoryObserver`.
    fn attach_oom_observer(&self, observer: OomObserver);

    /// The allocator as `Any`, for callers that need the concrete type's extras
    /// (`Arc::downcast::<CachingAllocator>`).
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

/// Forwards `$name(args) -> ret` to `CachingAllocator`'s inherent method of that name.
macro_rules! forward {
    ($($name:ident(&self $(, $arg:ident: $ty:ty)*) $(-> $ret:ty)?;)*) => {
        $(
            #[inline]
            fn $name(&self $(, $arg: $ty)*) $(-> $ret)? {
                CachingAllocator::$name(self $(, $arg)*)
            }
        )*
    };
}

impl DeviceAllocator for CachingAllocator {
    forward! {
        device(&self) -> Device;
        raw_alloc(&self, size: usize, stream: Stream) -> Result<usize>;
        raw_free(&self, ptr: usize) -> Result<()>;
        record_stream(&self, ptr: usize, stream: Stream) -> Result<()>;
        empty_cache(&self) -> Result<()>;
        release_pool(&self, id: MempoolId) -> Result<()>;
        pool_use_count(&self, id: MempoolId) -> Option<u32>;
        stats(&self) -> MemoryStats;
        reset_accumulated_stats(&self);
        reset_peak_stats(&self);
        free_inactive_buffers(&self) -> Result<()>;
        requested_size(&self, ptr: usize) -> Result<u64>;
        block_size(&self, ptr: usize) -> Result<u64>;
        buffer_id(&self, ptr: usize) -> Result<u64>;
        set_buffer_shape(&self, ptr: usize, shape: &[i64]) -> Result<()>;
        buffer_shape(&self, ptr: usize) -> Result<Vec<i64>>;
        is_shared_storage_supported(&self) -> bool;
        is_shared_buffer(&self, ptr: usize) -> bool;
        shared_host_ptr(&self, ptr: usize) -> Result<*mut u8>;
        alloc_scalar_with_value(&self, value: &[u8], stream: Stream) -> Result<usize>;
        set_low_watermark_ratio(&self, ratio: f64) -> Result<()>;
        set_high_watermark_ratio(&self, ratio: f64) -> Result<()>;
        low_watermark_limit(&self) -> Option<u64>;
        high_watermark_limit(&self) -> Option<u64>;
        low_watermark_value(&self) -> Option<i64>;
        set_memory_fraction(&self, fraction: f64) -> Result<()>;
        reserved_bytes(&self) -> u64;
        allocated_bytes(&self) -> u64;
        driver_allocated(&self) -> u64;
        recommended_max(&self) -> u64;
        record_events(&self, ptrs: &[usize], stream: Stream) -> Result<()>;
        wait_for_events(&self, ptrs: &[usize]) -> Result<()>;
        record_memory_history(&self, config: Option<HistoryConfig>);
        memory_snapshot(&self) -> MemorySnapshot;
        add_callback(&self, callback: AllocatorCallback) -> CallbackId;
        remove_callback(&self, id: CallbackId) -> bool;
        attach_oom_observer(&self, observer: OomObserver);
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}
