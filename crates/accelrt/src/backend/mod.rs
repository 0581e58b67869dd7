//! Backends: drivers for each device type, and the stand-in for backends not compiled in.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host;

use std::sync::Arc;

use crate::alloc::{CachingAllocator, PinnedAllocator};
use crate::device::{DeviceProperties, DeviceType};
use crate::error::{Error, Result};
use crate::event::EventId;
use crate::generator::Generator;
use crate::graph::{GraphId, MempoolId};
use crate::hooks::{Backend, EventCallback, HostTask};
use crate::stream::{Stream, StreamPriority};

/// A backend that cannot be used (not compiled in, or no driver): it reports no devices,
/// says why, and answers every other call with [`Error::BackendUnavailable`].
#[derive(Debug, Clone)]
pub struct UnavailableBackend {
    kind: DeviceType,
    reason: String,
}

impl UnavailableBackend {
    /// A stand-in for `kind` that gives `reason` on every call.
    pub fn new(kind: DeviceType, reason: impl Into<String>) -> Self {
        UnavailableBackend {
            kind,
            reason: reason.into(),
        }
    }

    /// The stand-in for a backend whose cargo feature was not enabled.
    pub fn not_compiled(kind: DeviceType) -> Self {
        Self::new(
            kind,
            format!("accelrt was built without the {kind} backend (feature `{kind}`)"),
        )
    }

    fn err(&self) -> Error {
        Error::BackendUnavailable {
            backend: self.kind,
            reason: self.reason.clone(),
        }
    }

    fn fail<T>(&self) -> Result<T> {
        Err(self.err())
    }
}

impl Backend for UnavailableBackend {
    fn device_type(&self) -> DeviceType {
        self.kind
    }
    fn init(&self) -> Result<()> {
        self.fail()
    }
    fn is_available(&self) -> bool {
        false
    }
    fn unavailable_reason(&self) -> Option<String> {
        Some(self.reason.clone())
    }
    fn device_count(&self) -> u32 {
        0
    }
    fn has_primary_context(&self, _device: u32) -> bool {
        false
    }
    fn current_device(&self) -> Result<u32> {
        self.fail()
    }
    fn set_device(&self, _device: u32) -> Result<()> {
        self.fail()
    }
    fn exchange_device(&self, _device: u32) -> Result<u32> {
        self.fail()
    }
    fn maybe_exchange_device(&self, _device: u32) -> Result<u32> {
        self.fail()
    }
    fn device_synchronize(&self, _device: u32) -> Result<()> {
        self.fail()
    }
    fn show_config(&self) -> String {
        format!(
            "accelrt {}\nbackend: {} (unavailable: {})\n",
            env!("CARGO_PKG_VERSION"),
            self.kind,
            self.reason
        )
    }
    fn device_properties(&self, _device: u32) -> Result<DeviceProperties> {
        self.fail()
    }
    fn device_capability(&self, _device: u32) -> Result<(u32, u32)> {
        self.fail()
    }
    fn runtime_version(&self) -> Result<(u32, u32)> {
        self.fail()
    }
    fn default_stream(&self, _device: u32) -> Result<Stream> {
        self.fail()
    }
    fn current_stream(&self, _device: u32) -> Result<Stream> {
        self.fail()
    }
    fn set_current_stream(&self, _stream: Stream) -> Result<()> {
        self.fail()
    }
    fn stream_from_pool(&self, _device: u32, _priority: StreamPriority) -> Result<Stream> {
        self.fail()
    }
    fn new_stream(&self, _device: u32, _priority: StreamPriority) -> Result<Stream> {
        self.fail()
    }
    fn stream_native_handle(&self, _stream: Stream) -> Result<u64> {
        self.fail()
    }
    unsafe fn wrap_external_stream(&self, _device: u32, _handle: u64) -> Result<Stream> {
        self.fail()
    }
    fn stream_commit(&self, _stream: Stream) -> Result<()> {
        self.fail()
    }
    fn stream_synchronize(&self, _stream: Stream) -> Result<()> {
        self.fail()
    }
    fn stream_query(&self, _stream: Stream) -> Result<bool> {
        self.fail()
    }
    fn launch_host(&self, _stream: Stream, _task: HostTask) -> Result<()> {
        self.fail()
    }
    fn event_acquire(&self, _device: u32, _enable_timing: bool) -> Result<EventId> {
        self.fail()
    }
    fn event_release(&self, _id: EventId) -> Result<()> {
        self.fail()
    }
    fn event_record(&self, _id: EventId, _stream: Stream) -> Result<()> {
        self.fail()
    }
    fn event_sync_record(&self, _id: EventId, _stream: Stream) -> Result<()> {
        self.fail()
    }
    fn event_wait(&self, _id: EventId, _stream: Stream) -> Result<()> {
        self.fail()
    }
    fn event_synchronize(&self, _id: EventId) -> Result<()> {
        self.fail()
    }
    fn event_query(&self, _id: EventId) -> Result<bool> {
        self.fail()
    }
    fn event_elapsed_time(&self, _start: EventId, _end: EventId) -> Result<f64> {
        self.fail()
    }
    fn event_notify(&self, _id: EventId, _callback: EventCallback) -> Result<()> {
        self.fail()
    }
    fn is_pinned_ptr(&self, _ptr: usize) -> bool {
        false
    }
    fn pinned_allocator(&self) -> Result<Arc<PinnedAllocator>> {
        self.fail()
    }
    fn default_generator(&self, _device: u32) -> Result<Arc<Generator>> {
        self.fail()
    }
    fn graph_create(&self, _device: u32) -> Result<GraphId> {
        self.fail()
    }
    fn graph_capture_begin(
        &self,
        _graph: GraphId,
        _stream: Stream,
        _pool: MempoolId,
    ) -> Result<()> {
        self.fail()
    }
    fn graph_capture_end(&self, _graph: GraphId) -> Result<()> {
        self.fail()
    }
    fn graph_instantiate(&self, _graph: GraphId) -> Result<()> {
        self.fail()
    }
    fn graph_replay(&self, _graph: GraphId) -> Result<()> {
        self.fail()
    }
    fn graph_reset(&self, _graph: GraphId) -> Result<()> {
        self.fail()
    }
    fn graph_destroy(&self, _graph: GraphId) -> Result<()> {
        self.fail()
    }
    fn graph_pool(&self, _graph: GraphId) -> Result<MempoolId> {
        self.fail()
    }
    fn allocator(&self, _device: u32) -> Result<Arc<CachingAllocator>> {
        self.fail()
    }
    fn memory_provider(&self, _device: u32) -> Result<Arc<dyn crate::alloc::MemoryProvider>> {
        self.fail()
    }
}
