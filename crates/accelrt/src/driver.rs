//! The small trait a backend implements (in the spirit of wgpu-hal): raw devices, raw
//! streams, raw events, host tasks, graph capture and device memory.
//!
//! A driver does no argument checking and keeps no per-thread state: it is handed valid
//! device indices and its own streams and events. [`crate::runtime::Runtime`] wraps a driver
//! into a full [`crate::Backend`] and is the one place that validates, pools events, keeps
//! the current device and stream, the stream pool, generators, graphs and allocators.
//!
//! Optional capabilities have default bodies that answer [`Error::Unsupported`].

use std::sync::Arc;

use crate::alloc::MemoryProvider;
use crate::device::{DeviceProperties, DeviceType};
use crate::error::{Error, Result};
use crate::hooks::{EventCallback, HostTask};
use crate::stream::StreamPriority;

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

    /// Open the driver, or say why it cannot be used (the backend's unavailable reason).
    fn probe() -> std::result::Result<Self, String>;

    /// Number of devices (at least 1 for an opened driver).
    fn device_count(&self) -> u32;
    /// Properties of a valid device.
    fn device_properties(&self, device: u32) -> Result<DeviceProperties>;
    /// (major, minor) of the runtime or driver in use.
    fn runtime_version(&self) -> (u32, u32);
    /// Environment variables that configure this driver, for `show_config`.
    fn env_vars(&self) -> &'static [&'static str] {
        &[]
    }

    // ---- streams ---------------------------------------------------------------------------
    /// Create a stream; `default` marks the device's default stream (index 0).
    fn stream_create(
        &self,
        device: u32,
        priority: StreamPriority,
        default: bool,
    ) -> Result<Self::Stream>;
    /// Use a native stream created elsewhere (e.g. by PyTorch) without owning it.
    ///
    /// # Safety
    /// `handle` must be a live native stream of `device` (CUDA: a `CUstream` of the device's
    /// primary context, or 0 for its default stream) that outlives every use of the result.
    unsafe fn stream_wrap(&self, _device: u32, _handle: u64) -> Result<Self::Stream> {
        Err(Error::unsupported(
            Self::KIND,
            "wrapping an external stream",
        ))
    }
    /// The native handle reported by `stream_native_handle`.
    fn stream_native_handle(&self, stream: &Self::Stream) -> u64;
    /// Flush batched work (MPS `commit`). Drivers that never batch keep the default.
    fn stream_commit(&self, _stream: &Self::Stream) -> Result<()> {
        Ok(())
    }
    /// Block until all work queued on the stream has completed; report errors kept since
    /// the last synchronize.
    fn stream_synchronize(&self, stream: &Self::Stream) -> Result<()>;
    /// True when all work queued so far has completed.
    fn stream_query(&self, stream: &Self::Stream) -> Result<bool>;
    /// Make later work on `stream` wait for a recorded `event`.
    fn stream_wait_event(&self, stream: &Self::Stream, event: &Self::Event) -> Result<()>;
    /// Queue a host function in stream order.
    fn launch_host(&self, _stream: &Self::Stream, _task: HostTask) -> Result<()> {
        Err(Error::unsupported(Self::KIND, "launch_host()"))
    }
    /// Wait for every stream of a device. The default synchronizes the given streams (all
    /// those the runtime created on the device); a driver with a device-wide call overrides it.
    fn device_synchronize(&self, _device: u32, streams: &[&Self::Stream]) -> Result<()> {
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
    fn event_create(&self, device: u32, timing: bool) -> Result<Self::Event>;
    /// Mark the current end of `stream`; re-recording moves the event.
    fn event_record(&self, event: &Self::Event, stream: &Self::Stream) -> Result<()>;
    /// True once the recorded position has been reached.
    fn event_query(&self, event: &Self::Event) -> Result<bool>;
    /// Block until the recorded position has been reached.
    fn event_synchronize(&self, event: &Self::Event) -> Result<()>;
    /// Milliseconds between two completed, recorded timing events.
    fn event_elapsed_ms(&self, start: &Self::Event, end: &Self::Event) -> Result<f64>;
    /// Run `callback` once the recorded event completes.
    fn event_notify(&self, _event: &Self::Event, _callback: EventCallback) -> Result<()> {
        Err(Error::unsupported(Self::KIND, "event_notify()"))
    }

    // ---- graphs ----------------------------------------------------------------------------
    /// From now on, work launched on `stream` is recorded instead of run.
    fn capture_begin(&self, _stream: &Self::Stream) -> Result<()> {
        Err(Error::unsupported(Self::KIND, "graph capture"))
    }
    /// Stop recording and return what was recorded.
    fn capture_end(&self, _stream: &Self::Stream) -> Result<Self::Graph> {
        Err(Error::unsupported(Self::KIND, "graph capture"))
    }
    /// Queue the recorded work on `stream` again.
    fn graph_launch(&self, _graph: &Self::Graph, _stream: &Self::Stream) -> Result<()> {
        Err(Error::unsupported(Self::KIND, "graph replay"))
    }

    // ---- memory ----------------------------------------------------------------------------
    /// Raw device memory for the device's caching allocator.
    fn memory_provider(&self, device: u32) -> Result<Arc<dyn MemoryProvider>>;
    /// Page-locked host memory for the pinned allocator.
    fn pinned_memory_provider(&self) -> Result<Arc<dyn MemoryProvider>> {
        Err(Error::unsupported(Self::KIND, "pinned host memory"))
    }
    /// Whether `ptr` is page-locked host memory the driver knows of (allocated by anyone);
    /// the runtime also answers true for its own pinned allocator's memory.
    fn is_pinned_ptr(&self, _ptr: usize) -> bool {
        false
    }
}
