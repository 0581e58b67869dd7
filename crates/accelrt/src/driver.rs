//! The small trait a backend implements (in the spirit of wgpu-hal): raw devices, raw
//! streams, raw events, host tasks, graph capture and device memory.
//!
//! A driver does no argument checking and keeps no per-thread state: it is handed valid
//! device indices and its own streams and events. [`crate::runtime::Runtime`] wraps a driver
//! into a full [`crate::Backend`] and is the one place that validates, pools events, keeps
//! the current device and stream, the pooled streams, generators, graphs and allocators.
//!
//! Optional capabilities have default bodies that answer [`DeviceError::Unsupported`].

use std::sync::Arc;

use crate::alloc::MemoryProvider;
use crate::device::{DeviceProperties, DeviceType};
use crate::error::{DeviceError, DeviceResult};
use crate::stream::StreamPriority;

/// A host task launched on a stream. `Fn` (not `FnOnce`) so a captured graph can replay it.
pub type HostTask = Arc<dyn Fn() + Send + Sync + 'static>;

/// A callback run on a backend thread once an event completes.
pub type EventCallback = Box<dyn FnOnce() + Send + 'static>;

/// What [`Driver::memory_usage`] reports, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Device memory in use as the driver counts it (MPS's `getDriverAllocatedMemory`).
    pub used: u64,
    /// The working set the device recommends (MPS's `getRecommendedMaxMemory`).
    pub recommended_max: u64,
}

/// A device backend at the level of raw handles.
pub trait Driver: Send + Sync + Sized + 'static {
    /// A native stream: an ordered queue of work on one device.
    type Stream: Send + Sync + 'static;
    /// A native event: a position in a stream that completes when the stream reaches it.
    type Event: Send + Sync + 'static;
    /// Work captured from a stream, replayable.
    type Graph: Send + Sync + 'static;

    /// The device type this driver serves.
    const KIND: DeviceType;

    /// Whether the backend is compiled into this build: false only for stand-ins of
    /// backends whose cargo feature is off (`backend::noop`), whose probe says so.
    const BUILT: bool = true;

    /// Open the driver, or say why it cannot be used (the backend's unavailable reason).
    fn probe() -> std::result::Result<Self, String>;

    /// Number of devices (at least 1 for an opened driver).
    fn device_count(&self) -> u32;
    /// Properties of a valid device.
    fn device_properties(&self, device: u32) -> DeviceResult<DeviceProperties>;
    /// (major, minor) of the runtime or driver in use.
    fn runtime_version(&self) -> (u32, u32);
    /// Environment variables that configure this driver, for `show_config`.
    fn env_vars(&self) -> &'static [&'static str] {
        &[]
    }
    /// Whether the device's context is active as the driver sees it (CUDA: the primary
    /// context, whoever created it); `None` lets the runtime answer from its own state.
    /// Must not create anything.
    fn has_primary_context(&self, _device: u32) -> Option<bool> {
        None
    }
    /// The device of memory the driver knows of (not the runtime's allocators, which the
    /// runtime asks first); `None` when it is not device memory of this driver.
    fn device_of_ptr(&self, _ptr: usize) -> Option<u32> {
        None
    }
    /// Device memory in use and the recommended working set, as the driver counts them. The
    /// default asks the device's memory provider.
    fn memory_usage(&self, device: u32) -> DeviceResult<MemoryUsage> {
        let provider = self.memory_provider(device)?;
        Ok(MemoryUsage {
            used: provider.driver_allocated(),
            recommended_max: provider.recommended_max(),
        })
    }

    // ---- streams ---------------------------------------------------------------------------
    /// Create a stream; `default` marks the device's default stream (index 0).
    fn stream_create(
        &self,
        device: u32,
        priority: StreamPriority,
        default: bool,
    ) -> DeviceResult<Self::Stream>;
    /// Use a native stream created elsewhere (e.g. by PyTorch) without owning it.
    ///
    /// # Safety
    /// `handle` must be a live native stream of `device` (CUDA: a `CUstream` of the device's
    /// primary context, or 0 for its default stream) that outlives every use of the result.
    unsafe fn stream_wrap(&self, _device: u32, _handle: u64) -> DeviceResult<Self::Stream> {
        Err(DeviceError::unsupported(
            Self::KIND,
            "wrapping an external stream",
        ))
    }
    /// The native handle reported by `stream_native_handle`.
    fn stream_native_handle(&self, stream: &Self::Stream) -> u64;
    /// Flush batched work (MPS `commit`). Drivers that never batch keep the default.
    fn stream_commit(&self, _stream: &Self::Stream) -> DeviceResult<()> {
        Ok(())
    }
    /// Block until all work queued on the stream has completed; report errors kept since
    /// the last synchronize.
    fn stream_synchronize(&self, stream: &Self::Stream) -> DeviceResult<()>;
    /// True when all work queued so far has completed.
    fn stream_query(&self, stream: &Self::Stream) -> DeviceResult<bool>;
    /// Make later work on `stream` wait for a recorded `event`.
    fn stream_wait_event(&self, stream: &Self::Stream, event: &Self::Event) -> DeviceResult<()>;
    /// Queue a host function in stream order.
    fn launch_host(&self, _stream: &Self::Stream, _task: HostTask) -> DeviceResult<()> {
        Err(DeviceError::unsupported(Self::KIND, "launch_host()"))
    }
    /// Wait for every stream of a device. The default synchronizes the given streams (all
    /// those the runtime created on the device); a driver with a device-wide call overrides it.
    fn device_synchronize(&self, _device: u32, streams: &[&Self::Stream]) -> DeviceResult<()> {
        let mut first_error = None;
        for s in streams {
            if let Err(e) = self.stream_synchronize(s) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    // ---- events ----------------------------------------------------------------------------
    /// Create an event; `timing` events also record a completion time.
    fn event_create(&self, device: u32, timing: bool) -> DeviceResult<Self::Event>;
    /// Mark the current end of `stream`; re-recording moves the event.
    fn event_record(&self, event: &Self::Event, stream: &Self::Stream) -> DeviceResult<()>;
    /// Record `event` on a stream that is capturing a graph: the event then marks a point
    /// of the capture, which other streams may wait for (joining the capture) and the
    /// runtime never queries. The default records as usual (CUDA's capture does the rest).
    fn event_record_captured(
        &self,
        event: &Self::Event,
        stream: &Self::Stream,
    ) -> DeviceResult<()> {
        self.event_record(event, stream)
    }
    /// True once the recorded position has been reached.
    fn event_query(&self, event: &Self::Event) -> DeviceResult<bool>;
    /// Block until the recorded position has been reached.
    fn event_synchronize(&self, event: &Self::Event) -> DeviceResult<()>;
    /// Milliseconds between two completed, recorded timing events.
    fn event_elapsed_ms(&self, start: &Self::Event, end: &Self::Event) -> DeviceResult<f64>;
    /// Run `callback` once the recorded event completes.
    fn event_notify(&self, _event: &Self::Event, _callback: EventCallback) -> DeviceResult<()> {
        Err(DeviceError::unsupported(Self::KIND, "event_notify()"))
    }
    /// When a recorded timing event completed, in ns on [`crate::event::clock_ns`]'s clock;
    /// an [`DeviceError::Event`] while it has not.
    fn event_completion_ns(&self, _event: &Self::Event) -> DeviceResult<u64> {
        Err(DeviceError::unsupported(
            Self::KIND,
            "event_completion_time()",
        ))
    }

    // ---- graphs ----------------------------------------------------------------------------
    /// From now on, work launched on `stream` is recorded instead of run.
    fn capture_begin(&self, _stream: &Self::Stream) -> DeviceResult<()> {
        Err(DeviceError::unsupported(Self::KIND, "graph capture"))
    }
    /// Stop recording and return what was recorded.
    fn capture_end(&self, _stream: &Self::Stream) -> DeviceResult<Self::Graph> {
        Err(DeviceError::unsupported(Self::KIND, "graph capture"))
    }
    /// Queue the recorded work on `stream` again (the runtime instantiates first).
    fn graph_launch(&self, _graph: &Self::Graph, _stream: &Self::Stream) -> DeviceResult<()> {
        Err(DeviceError::unsupported(Self::KIND, "graph replay"))
    }
    /// Make the executable form of a captured graph (CUDA: `cuGraphInstantiate`). Called
    /// once per graph, before its first launch. The default has nothing to do.
    fn graph_instantiate(&self, _graph: &Self::Graph) -> DeviceResult<()> {
        Ok(())
    }
    /// Free the captured (non-executable) form of an instantiated graph: its creator did not
    /// ask to keep it (`keep_graph`). The default keeps nothing to free.
    fn graph_discard_template(&self, _graph: &Self::Graph) {}
    /// `stream` (not capturing) waits for `event`, recorded while `origin` was capturing:
    /// from now on its work is captured into `origin`'s graph (a fork; CUDA's
    /// `cuStreamWaitEvent` on a captured event does this itself).
    fn capture_join(
        &self,
        _stream: &Self::Stream,
        _origin: &Self::Stream,
        _event: &Self::Event,
    ) -> DeviceResult<()> {
        Err(DeviceError::unsupported(
            Self::KIND,
            "forking a graph capture onto another stream",
        ))
    }
    /// `stream`, which joined a capture, leaves it: the capture ended on its origin stream,
    /// with `graph` when it produced one (which must then keep whatever work captured on
    /// `stream` needs at replays, e.g. host tasks).
    fn capture_leave(
        &self,
        _stream: &Self::Stream,
        _graph: Option<&Self::Graph>,
    ) -> DeviceResult<()> {
        Ok(())
    }

    // ---- memory ----------------------------------------------------------------------------
    /// Raw device memory for the device's caching allocator.
    fn memory_provider(&self, device: u32) -> DeviceResult<Arc<dyn MemoryProvider>>;
    /// Page-locked host memory for the pinned allocator.
    fn pinned_memory_provider(&self) -> DeviceResult<Arc<dyn MemoryProvider>> {
        Err(DeviceError::unsupported(Self::KIND, "pinned host memory"))
    }
    /// Copy `src` to device memory at `dst`, in stream order on `stream` (work queued on it
    /// later sees the bytes). `src` may be dropped when this returns.
    ///
    /// # Safety
    /// `dst .. dst + src.len()` must be memory of the stream's device that the caller owns
    /// until the copy has run.
    unsafe fn write_async(
        &self,
        _stream: &Self::Stream,
        _dst: usize,
        _src: &[u8],
    ) -> DeviceResult<()> {
        Err(DeviceError::unsupported(
            Self::KIND,
            "writing host bytes to device memory",
        ))
    }

    // ---- several devices -------------------------------------------------------------------
    /// Whether work on `device` can address memory of `peer` directly (both valid, distinct).
    /// The default: no device reaches another.
    fn can_access_peer(&self, _device: u32, _peer: u32) -> DeviceResult<bool> {
        Ok(false)
    }
    /// Let work on `device` address `peer`'s memory (both valid, distinct, and
    /// `can_access_peer` said yes); enabling twice is not an error.
    fn enable_peer_access(&self, _device: u32, _peer: u32) -> DeviceResult<()> {
        Err(DeviceError::unsupported(
            Self::KIND,
            "peer access between devices",
        ))
    }
    /// Copy `bytes` from `src` to `dst`, in stream order on `stream`; either range may be
    /// memory of another device of this driver (a peer copy, which needs no peer access).
    ///
    /// # Safety
    /// Both ranges must be device memory of this driver that stays allocated, and that no
    /// other work writes, until the copy has run.
    unsafe fn copy_async(
        &self,
        _stream: &Self::Stream,
        _dst: usize,
        _src: usize,
        _bytes: usize,
    ) -> DeviceResult<()> {
        Err(DeviceError::unsupported(
            Self::KIND,
            "copies between device buffers",
        ))
    }
    /// Whether `ptr` is page-locked host memory the driver knows of (allocated by anyone);
    /// the runtime also answers true for its own pinned allocator's memory.
    fn is_pinned_ptr(&self, _ptr: usize) -> bool {
        false
    }
}
