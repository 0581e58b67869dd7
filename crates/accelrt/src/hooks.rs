//! The backend hooks interface: what every device backend answers.
//!
//! This is accelrt's equivalent of PyTorch's per-device hooks (MPSHooksInterface,
//! MTIAHooksInterface): one object-safe trait, one implementation per backend, reached
//! through [`crate::backend()`]. Backends implement the much smaller [`crate::driver::Driver`]
//! trait; the shared [`crate::runtime::Runtime`] turns a driver into a `Backend` and is the
//! single place where arguments are validated.

use std::sync::Arc;

use crate::alloc::{DeviceAllocator, PinnedAllocator};
use crate::device::{Device, DeviceProperties, DeviceType};
use crate::error::Result;
use crate::event::EventId;
use crate::generator::Generator;
use crate::graph::{GraphId, MempoolId};
use crate::stream::{Stream, StreamPriority};

pub use crate::driver::{EventCallback, HostTask};

/// The hooks a device backend provides. Every method answers with a value or an
/// [`crate::Error`]; none panics on bad input. On a backend that cannot be used here, every
/// call answers [`crate::DeviceError::NeedsBackend`] naming the call and the reason.
///
/// `ARCHITECTURE.md` maps each method of PyTorch's accelerator, MPS and MTIA hooks to the
/// method here that answers it.
pub trait Backend: Send + Sync {
    // ---- identity, initialisation -------------------------------------------------------
    fn device_type(&self) -> DeviceType;
    /// Whether the backend is built into this process (AcceleratorHooksInterface's
    /// `isBuilt`): false only for a backend whose cargo feature is off, or a name nobody
    /// registered. Never fails, never initialises.
    fn is_built(&self) -> bool;
    /// Lazy, idempotent, thread-safe initialisation. Other calls initialise on demand.
    fn init(&self) -> Result<()>;
    fn is_available(&self) -> bool;
    /// Why the backend is unavailable (`None` when it is available).
    fn unavailable_reason(&self) -> Option<String>;
    /// Number of devices; 0 when unavailable.
    fn device_count(&self) -> u32;
    /// Whether the device's primary context is active: CUDA asks the driver, so a context
    /// created by another library (PyTorch) counts; the host answers whether accelrt has
    /// set the device up. False for an invalid index. Never creates one.
    fn has_primary_context(&self, device: u32) -> bool;

    // ---- current device (per thread) -----------------------------------------------------
    fn current_device(&self) -> Result<u32>;
    fn set_device(&self, device: u32) -> Result<()>;
    /// Sets the current device and returns the previous one.
    fn exchange_device(&self, device: u32) -> Result<u32>;
    /// Like `exchange_device`, without setting the device up (no context is created), as
    /// PyTorch's `maybeExchangeDevice`. An invalid index is an error and changes nothing.
    fn maybe_exchange_device(&self, device: u32) -> Result<u32>;

    // ---- device-wide --------------------------------------------------------------------
    fn device_synchronize(&self, device: u32) -> Result<()>;
    /// Human-readable build and runtime configuration.
    fn show_config(&self) -> String;
    fn device_properties(&self, device: u32) -> Result<DeviceProperties>;
    fn device_capability(&self, device: u32) -> Result<(u32, u32)>;
    /// (major, minor) of the runtime or driver in use.
    fn runtime_version(&self) -> Result<(u32, u32)>;
    /// Whether the runtime is at least `major.minor` (MPS's `isOnMacOSorNewer`).
    fn runtime_version_at_least(&self, major: u32, minor: u32) -> Result<bool>;
    /// The device that holds `ptr`: memory of one of the backend's allocators (live or
    /// cached), or memory the driver knows (CUDA: any device allocation). An address nobody
    /// knows is [`crate::AllocError::InvalidPointer`].
    fn device_from_ptr(&self, ptr: usize) -> Result<Device>;

    // ---- streams ------------------------------------------------------------------------
    fn default_stream(&self, device: u32) -> Result<Stream>;
    /// The calling thread's current stream on `device` (the default stream until set).
    fn current_stream(&self, device: u32) -> Result<Stream>;
    /// The native handle of the current stream (MTIA's `getCurrentRawStream`).
    fn current_raw_stream(&self, device: u32) -> Result<u64>;
    fn set_current_stream(&self, stream: Stream) -> Result<()>;
    /// One of the device's pooled streams (PyTorch's `getStreamFromPool`: round-robin over a
    /// fixed set per priority).
    fn stream_from_pool(&self, device: u32, priority: StreamPriority) -> Result<Stream>;
    /// A brand-new stream owned by the backend for its lifetime.
    fn new_stream(&self, device: u32, priority: StreamPriority) -> Result<Stream>;
    /// The native handle (CUstream address; host: the stream's worker id).
    fn stream_native_handle(&self, stream: Stream) -> Result<u64>;
    /// A handle for a native stream created elsewhere (CUDA: a `CUstream` made by PyTorch or
    /// a library), used without owning it: the backend never destroys it. Wrapping the same
    /// handle again returns the same `Stream`; handle 0 is the default stream.
    ///
    /// # Safety
    /// `handle` must be a live native stream of `device` (CUDA: of its primary context) that
    /// stays alive for as long as the returned `Stream` is used.
    unsafe fn wrap_external_stream(&self, device: u32, handle: u64) -> Result<Stream>;
    /// Flush queued work to the device (MPS `commit`); a no-op where work is never batched.
    fn stream_commit(&self, stream: Stream) -> Result<()>;
    fn stream_synchronize(&self, stream: Stream) -> Result<()>;
    /// True when all work queued on the stream so far has completed.
    fn stream_query(&self, stream: Stream) -> Result<bool>;
    /// Queue a host task on the stream; it runs in stream order.
    fn launch_host(&self, stream: Stream, task: HostTask) -> Result<()>;

    // ---- events (id-based API over the event pool) ----------------------------------------
    fn event_acquire(&self, device: u32, enable_timing: bool) -> Result<EventId>;
    fn event_release(&self, id: EventId) -> Result<()>;
    /// Mark the current end of `stream`. On a stream capturing a graph, the event marks that
    /// point of the capture: another stream that waits for it joins the capture (a fork),
    /// and the capturing stream may wait for an event recorded there (a join).
    fn event_record(&self, id: EventId, stream: Stream) -> Result<()>;
    /// Record, then flush the stream so the event can complete without further work.
    fn event_sync_record(&self, id: EventId, stream: Stream) -> Result<()>;
    /// Make later work on `stream` wait until the event completes.
    fn event_wait(&self, id: EventId, stream: Stream) -> Result<()>;
    fn event_synchronize(&self, id: EventId) -> Result<()>;
    /// True when complete; true for an event never recorded.
    fn event_query(&self, id: EventId) -> Result<bool>;
    /// Milliseconds between two completed timing events.
    fn event_elapsed_time(&self, start: EventId, end: EventId) -> Result<f64>;
    /// When a completed timing event completed, in milliseconds on accelrt's clock
    /// ([`crate::event::clock_ms`]), like MPS's `getCompletionTime`.
    fn event_completion_time(&self, id: EventId) -> Result<f64>;
    /// Run `callback` once the event completes (immediately if it has).
    fn event_notify(&self, id: EventId, callback: EventCallback) -> Result<()>;
    /// Destroy the events waiting in the pool's free lists (MPSEventPool's `emptyCache`);
    /// events in use are kept. Returns how many were destroyed.
    fn event_pool_empty_cache(&self) -> Result<u64>;

    // ---- pinned host memory ---------------------------------------------------------------
    fn is_pinned_ptr(&self, ptr: usize) -> bool;
    /// The caching allocator of page-locked host memory.
    fn pinned_allocator(&self) -> Result<Arc<PinnedAllocator>>;

    // ---- random numbers -------------------------------------------------------------------
    fn default_generator(&self, device: u32) -> Result<Arc<Generator>>;
    /// A new generator for `device`, independent of the default one (seeded with the
    /// default seed).
    fn new_generator(&self, device: u32) -> Result<Arc<Generator>>;

    // ---- graph capture (MTIA graph API) ---------------------------------------------------
    /// `graph_create_with(device, false)`.
    fn graph_create(&self, device: u32) -> Result<GraphId>;
    /// A new graph. With `keep_graph`, the captured graph is kept after capture and
    /// instantiated by `graph_instantiate` (or the first replay); without, it is instantiated
    /// when the capture ends and only the executable form is kept (PyTorch's `keep_graph`).
    fn graph_create_with(&self, device: u32, keep_graph: bool) -> Result<GraphId>;
    /// Start capturing work launched on `stream`; allocations go to `pool`.
    fn graph_capture_begin(&self, graph: GraphId, stream: Stream, pool: MempoolId) -> Result<()>;
    fn graph_capture_end(&self, graph: GraphId) -> Result<()>;
    /// Instantiate a graph created with `keep_graph` after its capture ended; an error for
    /// one already instantiated (every graph made without `keep_graph` is, at capture end).
    fn graph_instantiate(&self, graph: GraphId) -> Result<()>;
    /// Whether the graph has an executable form (instantiated).
    fn graph_is_instantiated(&self, graph: GraphId) -> Result<bool>;
    /// Enqueue the captured work again on the capture stream (instantiating it first if it
    /// was not).
    fn graph_replay(&self, graph: GraphId) -> Result<()>;
    /// Drop the captured work; the graph can capture again.
    fn graph_reset(&self, graph: GraphId) -> Result<()>;
    fn graph_destroy(&self, graph: GraphId) -> Result<()>;
    fn graph_pool(&self, graph: GraphId) -> Result<MempoolId>;
    /// A fresh private pool id on `device`, for graphs to share (MTIA's `graphPoolHandle`).
    fn graph_pool_handle(&self, device: u32) -> Result<MempoolId>;

    // ---- memory (the device's caching allocator) --------------------------------------------
    /// The device's allocator, created on first use, through the interface PyTorch's
    /// allocators answer ([`DeviceAllocator`]: `c10::DeviceAllocator`, `IMPSAllocator`). The
    /// concrete [`crate::alloc::CachingAllocator`], with what only it has (private-pool
    /// routing, checkpoints, IPC ranges), is `allocator()` on a `dyn Backend` or a
    /// [`crate::runtime::Runtime`].
    fn device_allocator(&self, device: u32) -> Result<Arc<dyn DeviceAllocator>>;
    /// The raw memory provider under the device's allocator (for building other allocators
    /// over the same device, e.g. `accelrt replay --backend cuda`).
    fn memory_provider(&self, device: u32) -> Result<Arc<dyn crate::alloc::MemoryProvider>>;
    fn empty_cache(&self, device: u32) -> Result<()>;
    fn memory_stats(&self, device: u32) -> Result<crate::alloc::MemoryStats>;
    fn reset_peak_memory_stats(&self, device: u32) -> Result<()>;
    fn set_memory_fraction(&self, device: u32, fraction: f64) -> Result<()>;
    /// Bytes of live blocks of the device's allocator (MPS's `getCurrentAllocatedMemory`).
    fn current_allocated_memory(&self, device: u32) -> Result<u64>;
    /// Bytes of device memory in use as the driver counts them (MPS's
    /// `getDriverAllocatedMemory`): CUDA's used memory of the device (total - free, every
    /// process and context included); the host's bytes held from its memory provider.
    fn driver_allocated_memory(&self, device: u32) -> Result<u64>;
    /// The working set the device recommends (MPS's `getRecommendedMaxMemory`): CUDA's
    /// memory that was free when accelrt opened the device, plus what accelrt held then; the
    /// host's simulated capacity.
    fn recommended_max_memory(&self, device: u32) -> Result<u64>;
    /// Allocate a buffer on `stream`'s device holding `value` (MPS's
    /// `allocScalarBufferWithValue`): written in stream order, so work queued on `stream`
    /// afterwards sees it. Free it with the allocator's `raw_free`.
    fn alloc_scalar_with_value(&self, stream: Stream, value: &[u8]) -> Result<usize>;

    // ---- several devices (PyTorch's canDeviceAccessPeer, enablePeerAccess, memcpyAsync) ----
    /// Whether work on `device` can address memory of `peer` directly. A device reaches
    /// itself.
    fn can_device_access_peer(&self, device: u32, peer: u32) -> Result<bool>;
    /// Let work on `device` address `peer`'s memory, including memory `peer`'s allocator maps
    /// later. Enabling twice is fine; devices that cannot reach each other get an error that
    /// says so.
    fn enable_peer_access(&self, device: u32, peer: u32) -> Result<()>;
    /// Whether [`Backend::enable_peer_access`] has been called for `device` and `peer`.
    fn is_peer_access_enabled(&self, device: u32, peer: u32) -> Result<bool>;
    /// Copy `bytes` from `src` (memory of `src_device`) to `dst` (memory of `dst_device`) in
    /// stream order on `stream`, whose device may be either (PyTorch's `memcpyAsync` with
    /// `p2p_enabled` or not; no peer access is needed). Both ranges must lie inside live
    /// allocations of those devices' allocators (interior ranges are fine); anything else is
    /// refused before the copy is queued.
    fn memcpy_async(
        &self,
        dst: usize,
        dst_device: u32,
        src: usize,
        src_device: u32,
        bytes: usize,
        stream: Stream,
    ) -> Result<()>;

    // ---- profiler (PyTorch MPS's profilerStartTrace / profilerStopTrace) --------------------
    /// Start recording a profile: a timeline of what `mode` selects (event records, waits and
    /// synchronizations; host tasks as executed; allocations, frees and segment allocations
    /// from the allocators' memory history, which the profile turns on). With
    /// `wait_until_completed`, stopping first synchronizes every device, so work still queued
    /// is in the profile. An error if a profile is already being recorded.
    fn profiler_start_trace(
        &self,
        mode: crate::profiler::ProfilerMode,
        wait_until_completed: bool,
    ) -> Result<()>;
    /// End the profile being recorded and return it (write it with
    /// [`crate::profiler::ProfilerTrace::write_chrome_trace`]). An error if none is.
    fn profiler_stop_trace(&self) -> Result<crate::profiler::ProfilerTrace>;
}
