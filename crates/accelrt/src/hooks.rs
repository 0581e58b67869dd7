//! The backend hooks interface: what every device backend answers.
//!
//! This is accelrt's equivalent of PyTorch's per-device hooks (MPSHooksInterface,
//! MTIAHooksInterface): one object-safe trait, one implementation per backend, reached
//! through [`crate::backend()`]. Backends implement the much smaller [`crate::driver::Driver`]
//! trait; the shared [`crate::runtime::Runtime`] turns a driver into a `Backend` and is the
//! single place where arguments are validated.

use std::sync::Arc;

use crate::alloc::{CachingAllocator, PinnedAllocator};
use crate::device::{DeviceProperties, DeviceType};
use crate::error::Result;
use crate::event::EventId;
use crate::generator::Generator;
use crate::graph::{GraphId, MempoolId};
use crate::stream::{Stream, StreamPriority};

/// A host task launched on a stream. `Fn` (not `FnOnce`) so a captured graph can replay it.
pub type HostTask = Arc<dyn Fn() + Send + Sync + 'static>;

/// A callback run on a backend thread once an event completes.
pub type EventCallback = Box<dyn FnOnce() + Send + 'static>;

/// The hooks a device backend provides. Every method answers with a value or an
/// [`crate::Error`]; none panics on bad input.
pub trait Backend: Send + Sync {
    // ---- identity, initialisation -------------------------------------------------------
    fn device_type(&self) -> DeviceType;
    /// Lazy, idempotent, thread-safe initialisation. Other calls initialise on demand.
    fn init(&self) -> Result<()>;
    fn is_available(&self) -> bool;
    /// Why the backend is unavailable (`None` when it is available).
    fn unavailable_reason(&self) -> Option<String>;
    /// Number of devices; 0 when unavailable.
    fn device_count(&self) -> u32;
    /// Whether the device's primary context (host: its state) has been created yet.
    fn has_primary_context(&self, device: u32) -> bool;

    // ---- current device (per thread) -----------------------------------------------------
    fn current_device(&self) -> Result<u32>;
    fn set_device(&self, device: u32) -> Result<()>;
    /// Sets the current device and returns the previous one.
    fn exchange_device(&self, device: u32) -> Result<u32>;
    /// Like `exchange_device`, but an invalid index is ignored (returns the current one
    /// unchanged), as PyTorch's `maybeExchangeDevice` does.
    fn maybe_exchange_device(&self, device: u32) -> Result<u32>;

    // ---- device-wide --------------------------------------------------------------------
    fn device_synchronize(&self, device: u32) -> Result<()>;
    /// Human-readable build and runtime configuration.
    fn show_config(&self) -> String;
    fn device_properties(&self, device: u32) -> Result<DeviceProperties>;
    fn device_capability(&self, device: u32) -> Result<(u32, u32)>;
    /// (major, minor) of the runtime or driver in use.
    fn runtime_version(&self) -> Result<(u32, u32)>;
    fn runtime_version_at_least(&self, major: u32, minor: u32) -> Result<bool> {
        Ok(self.runtime_version()? >= (major, minor))
    }

    // ---- streams ------------------------------------------------------------------------
    fn default_stream(&self, device: u32) -> Result<Stream>;
    /// The calling thread's current stream on `device` (the default stream until set).
    fn current_stream(&self, device: u32) -> Result<Stream>;
    fn set_current_stream(&self, stream: Stream) -> Result<()>;
    /// A stream from the device's pool (round-robin over a fixed set per priority).
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
    unsafe fn wrap_external_stream(&self, _device: u32, _handle: u64) -> Result<Stream> {
        Err(crate::Error::unsupported(
            self.device_type(),
            "wrapping an external stream",
        ))
    }
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
    /// Run `callback` once the event completes (immediately if it has).
    fn event_notify(&self, id: EventId, callback: EventCallback) -> Result<()>;

    // ---- pinned host memory ---------------------------------------------------------------
    fn is_pinned_ptr(&self, ptr: usize) -> bool;
    /// The caching allocator of page-locked host memory.
    fn pinned_allocator(&self) -> Result<Arc<PinnedAllocator>>;

    // ---- random numbers -------------------------------------------------------------------
    fn default_generator(&self, device: u32) -> Result<Arc<Generator>>;

    // ---- graph capture (MTIA graph API) ---------------------------------------------------
    fn graph_create(&self, device: u32) -> Result<GraphId>;
    /// Start capturing work launched on `stream`; allocations go to `pool`.
    fn graph_capture_begin(&self, graph: GraphId, stream: Stream, pool: MempoolId) -> Result<()>;
    fn graph_capture_end(&self, graph: GraphId) -> Result<()>;
    fn graph_instantiate(&self, graph: GraphId) -> Result<()>;
    /// Enqueue the captured work again on the capture stream.
    fn graph_replay(&self, graph: GraphId) -> Result<()>;
    /// Drop the captured work; the graph can capture again.
    fn graph_reset(&self, graph: GraphId) -> Result<()>;
    fn graph_destroy(&self, graph: GraphId) -> Result<()>;
    fn graph_pool(&self, graph: GraphId) -> Result<MempoolId>;

    // ---- memory (delegates to the device's caching allocator) ------------------------------
    /// The device's caching allocator, created on first use.
    fn allocator(&self, device: u32) -> Result<Arc<CachingAllocator>>;
    /// The raw memory provider under the device's allocator (for building other allocators
    /// over the same device, e.g. `accelrt replay --backend cuda`).
    fn memory_provider(&self, _device: u32) -> Result<Arc<dyn crate::alloc::MemoryProvider>> {
        Err(crate::Error::unsupported(
            self.device_type(),
            "memory_provider()",
        ))
    }
    fn empty_cache(&self, device: u32) -> Result<()> {
        self.allocator(device)?.empty_cache()
    }
    fn memory_stats(&self, device: u32) -> Result<crate::alloc::MemoryStats> {
        Ok(self.allocator(device)?.stats())
    }
    fn reset_peak_memory_stats(&self, device: u32) -> Result<()> {
        self.allocator(device)?.reset_peak_stats();
        Ok(())
    }
    fn set_memory_fraction(&self, device: u32, fraction: f64) -> Result<()> {
        self.allocator(device)?.set_memory_fraction(fraction)
    }

    // ---- profiler (PyTorch MPS's profilerStartTrace / profilerStopTrace) --------------------
    /// Start recording a timeline of what `mode` selects (event records, waits and
    /// synchronizations; host tasks as executed; allocations, frees and segment allocations
    /// from the allocators' memory history, which the trace turns on). With
    /// `wait_until_completed`, stopping first synchronizes every device, so work still queued
    /// is in the trace. An error if a trace is already running.
    fn profiler_start_trace(
        &self,
        _mode: crate::profiler::ProfilerMode,
        _wait_until_completed: bool,
    ) -> Result<()> {
        Err(crate::Error::unsupported(
            self.device_type(),
            "the profiler",
        ))
    }
    /// End the running trace and return it (write it with
    /// [`crate::profiler::ProfilerTrace::write_chrome_trace`]). An error if none runs.
    fn profiler_stop_trace(&self) -> Result<crate::profiler::ProfilerTrace> {
        Err(crate::Error::unsupported(
            self.device_type(),
            "the profiler",
        ))
    }
}
