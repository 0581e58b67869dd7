//! Backends: drivers for each device type, and the stand-in for backends not compiled in.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host;

use std::sync::Arc;

use crate::alloc::{CachingAllocator, MemoryProvider, MemoryStats, PinnedAllocator};
use crate::device::{Device, DeviceProperties, DeviceType};
use crate::error::{DeviceError, Result};
use crate::event::EventId;
use crate::generator::Generator;
use crate::graph::{GraphId, MempoolId};
use crate::hooks::{Backend, EventCallback, HostTask};
use crate::profiler::{ProfilerMode, ProfilerTrace};
use crate::stream::{Stream, StreamPriority};

/// A backend that cannot be used (not compiled in, no driver, or a name nobody registered):
/// it reports no devices, says why, and answers every other call with
/// [`DeviceError::NeedsBackend`] naming the call.
#[derive(Debug, Clone)]
pub struct UnavailableBackend {
    kind: DeviceType,
    reason: String,
    built: bool,
}

impl UnavailableBackend {
    /// A stand-in for `kind` (built into this process) that gives `reason` on every call.
    pub fn new(kind: DeviceType, reason: impl Into<String>) -> Self {
        UnavailableBackend {
            kind,
            reason: reason.into(),
            built: true,
        }
    }

    /// The stand-in for a backend whose cargo feature was not enabled (`is_built() == false`).
    pub fn not_compiled(kind: DeviceType) -> Self {
        UnavailableBackend {
            built: false,
            ..Self::new(
                kind,
                format!("accelrt was built without the {kind} backend (feature `{kind}`)"),
            )
        }
    }

    /// The stand-in for a registered backend's name that nothing registered.
    pub(crate) fn unregistered(kind: DeviceType, reason: String) -> Self {
        UnavailableBackend {
            built: false,
            ..Self::new(kind, reason)
        }
    }

    fn fail<T>(&self, call: &'static str) -> Result<T> {
        Err(DeviceError::NeedsBackend {
            call,
            needs: self.kind,
            reason: self.reason.clone(),
        }
        .into())
    }
}

impl Backend for UnavailableBackend {
    fn device_type(&self) -> DeviceType {
        self.kind
    }
    fn is_built(&self) -> bool {
        self.built
    }
    fn init(&self) -> Result<()> {
        self.fail("init")
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
        self.fail("current_device")
    }
    fn set_device(&self, _device: u32) -> Result<()> {
        self.fail("set_device")
    }
    fn exchange_device(&self, _device: u32) -> Result<u32> {
        self.fail("exchange_device")
    }
    fn maybe_exchange_device(&self, _device: u32) -> Result<u32> {
        self.fail("maybe_exchange_device")
    }
    fn device_synchronize(&self, _device: u32) -> Result<()> {
        self.fail("device_synchronize")
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
        self.fail("device_properties")
    }
    fn device_capability(&self, _device: u32) -> Result<(u32, u32)> {
        self.fail("device_capability")
    }
    fn runtime_version(&self) -> Result<(u32, u32)> {
        self.fail("runtime_version")
    }
    fn runtime_version_at_least(&self, _major: u32, _minor: u32) -> Result<bool> {
        self.fail("runtime_version_at_least")
    }
    fn device_from_ptr(&self, _ptr: usize) -> Result<Device> {
        self.fail("device_from_ptr")
    }
    fn default_stream(&self, _device: u32) -> Result<Stream> {
        self.fail("default_stream")
    }
    fn current_stream(&self, _device: u32) -> Result<Stream> {
        self.fail("current_stream")
    }
    fn current_raw_stream(&self, _device: u32) -> Result<u64> {
        self.fail("current_raw_stream")
    }
    fn set_current_stream(&self, _stream: Stream) -> Result<()> {
        self.fail("set_current_stream")
    }
    fn stream_from_pool(&self, _device: u32, _priority: StreamPriority) -> Result<Stream> {
        self.fail("stream_from_pool")
    }
    fn new_stream(&self, _device: u32, _priority: StreamPriority) -> Result<Stream> {
        self.fail("new_stream")
    }
    fn stream_native_handle(&self, _stream: Stream) -> Result<u64> {
        self.fail("stream_native_handle")
    }
    unsafe fn wrap_external_stream(&self, _device: u32, _handle: u64) -> Result<Stream> {
        self.fail("wrap_external_stream")
    }
    fn stream_commit(&self, _stream: Stream) -> Result<()> {
        self.fail("stream_commit")
    }
    fn stream_synchronize(&self, _stream: Stream) -> Result<()> {
        self.fail("stream_synchronize")
    }
    fn stream_query(&self, _stream: Stream) -> Result<bool> {
        self.fail("stream_query")
    }
    fn launch_host(&self, _stream: Stream, _task: HostTask) -> Result<()> {
        self.fail("launch_host")
    }
    fn event_acquire(&self, _device: u32, _enable_timing: bool) -> Result<EventId> {
        self.fail("event_acquire")
    }
    fn event_release(&self, _id: EventId) -> Result<()> {
        self.fail("event_release")
    }
    fn event_record(&self, _id: EventId, _stream: Stream) -> Result<()> {
        self.fail("event_record")
    }
    fn event_sync_record(&self, _id: EventId, _stream: Stream) -> Result<()> {
        self.fail("event_sync_record")
    }
    fn event_wait(&self, _id: EventId, _stream: Stream) -> Result<()> {
        self.fail("event_wait")
    }
    fn event_synchronize(&self, _id: EventId) -> Result<()> {
        self.fail("event_synchronize")
    }
    fn event_query(&self, _id: EventId) -> Result<bool> {
        self.fail("event_query")
    }
    fn event_elapsed_time(&self, _start: EventId, _end: EventId) -> Result<f64> {
        self.fail("event_elapsed_time")
    }
    fn event_completion_time(&self, _id: EventId) -> Result<f64> {
        self.fail("event_completion_time")
    }
    fn event_notify(&self, _id: EventId, _callback: EventCallback) -> Result<()> {
        self.fail("event_notify")
    }
    fn event_pool_empty_cache(&self) -> Result<u64> {
        self.fail("event_pool_empty_cache")
    }
    fn is_pinned_ptr(&self, _ptr: usize) -> bool {
        false
    }
    fn pinned_allocator(&self) -> Result<Arc<PinnedAllocator>> {
        self.fail("pinned_allocator")
    }
    fn default_generator(&self, _device: u32) -> Result<Arc<Generator>> {
        self.fail("default_generator")
    }
    fn new_generator(&self, _device: u32) -> Result<Arc<Generator>> {
        self.fail("new_generator")
    }
    fn graph_create(&self, _device: u32) -> Result<GraphId> {
        self.fail("graph_create")
    }
    fn graph_create_with(&self, _device: u32, _keep_graph: bool) -> Result<GraphId> {
        self.fail("graph_create_with")
    }
    fn graph_capture_begin(
        &self,
        _graph: GraphId,
        _stream: Stream,
        _pool: MempoolId,
    ) -> Result<()> {
        self.fail("graph_capture_begin")
    }
    fn graph_capture_end(&self, _graph: GraphId) -> Result<()> {
        self.fail("graph_capture_end")
    }
    fn graph_instantiate(&self, _graph: GraphId) -> Result<()> {
        self.fail("graph_instantiate")
    }
    fn graph_is_instantiated(&self, _graph: GraphId) -> Result<bool> {
        self.fail("graph_is_instantiated")
    }
    fn graph_replay(&self, _graph: GraphId) -> Result<()> {
        self.fail("graph_replay")
    }
    fn graph_reset(&self, _graph: GraphId) -> Result<()> {
        self.fail("graph_reset")
    }
    fn graph_destroy(&self, _graph: GraphId) -> Result<()> {
        self.fail("graph_destroy")
    }
    fn graph_pool(&self, _graph: GraphId) -> Result<MempoolId> {
        self.fail("graph_pool")
    }
    fn graph_pool_handle(&self, _device: u32) -> Result<MempoolId> {
        self.fail("graph_pool_handle")
    }
    fn allocator(&self, _device: u32) -> Result<Arc<CachingAllocator>> {
        self.fail("allocator")
    }
    fn memory_provider(&self, _device: u32) -> Result<Arc<dyn MemoryProvider>> {
        self.fail("memory_provider")
    }
    fn empty_cache(&self, _device: u32) -> Result<()> {
        self.fail("empty_cache")
    }
    fn memory_stats(&self, _device: u32) -> Result<MemoryStats> {
        self.fail("memory_stats")
    }
    fn reset_peak_memory_stats(&self, _device: u32) -> Result<()> {
        self.fail("reset_peak_memory_stats")
    }
    fn set_memory_fraction(&self, _device: u32, _fraction: f64) -> Result<()> {
        self.fail("set_memory_fraction")
    }
    fn current_allocated_memory(&self, _device: u32) -> Result<u64> {
        self.fail("current_allocated_memory")
    }
    fn driver_allocated_memory(&self, _device: u32) -> Result<u64> {
        self.fail("driver_allocated_memory")
    }
    fn recommended_max_memory(&self, _device: u32) -> Result<u64> {
        self.fail("recommended_max_memory")
    }
    fn alloc_scalar_with_value(&self, _stream: Stream, _value: &[u8]) -> Result<usize> {
        self.fail("alloc_scalar_with_value")
    }
    fn profiler_start_trace(&self, _mode: ProfilerMode, _wait_until_completed: bool) -> Result<()> {
        self.fail("profiler_start_trace")
    }
    fn profiler_stop_trace(&self) -> Result<ProfilerTrace> {
        self.fail("profiler_stop_trace")
    }
    fn can_device_access_peer(&self, _device: u32, _peer: u32) -> Result<bool> {
        self.fail("can_device_access_peer")
    }
    fn enable_peer_access(&self, _device: u32, _peer: u32) -> Result<()> {
        self.fail("enable_peer_access")
    }
    fn is_peer_access_enabled(&self, _device: u32, _peer: u32) -> Result<bool> {
        self.fail("is_peer_access_enabled")
    }
    fn memcpy_async(
        &self,
        _dst: usize,
        _dst_device: u32,
        _src: usize,
        _src_device: u32,
        _bytes: usize,
        _stream: Stream,
    ) -> Result<()> {
        self.fail("memcpy_async")
    }
}
