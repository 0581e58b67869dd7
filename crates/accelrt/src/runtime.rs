//! [`Runtime`]: turns a [`Driver`] into a full [`Backend`].
//!
//! This is the one place that validates arguments (device indices, stream handles, event
//! and graph ids), so drivers stay small. It owns everything that is the same for every
//! backend: lazy initialisation, the per-thread current device and stream, default and
//! pooled streams, the event pool, per-device generators, the graph table, the per-device
//! caching allocators and the pinned-memory allocator.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use crate::alloc::{
    format_size, AllocatorConfig, CachingAllocator, DeviceAllocator, HistoryConfig,
    PinnedAllocator, StreamEvents, StreamFilter, ALLOC_CONF_ENV,
};
use crate::device::{Device, DeviceProperties, DeviceType};
use crate::driver::Driver;
use crate::error::{AllocError, DeviceError, DeviceResult, Result};
use crate::event::{EventId, EventPool, EventSlot, PooledEvent};
use crate::generator::Generator;
use crate::graph::{GraphId, MempoolId};
use crate::hooks::{Backend, EventCallback, HostTask};
use crate::profiler::{Phase, Profiler, ProfilerMode, ProfilerTrace, SavedHistory};
use crate::stream::{Stream, StreamPriority};

mod caching;
mod graphs;
mod handles;
mod info;
mod peers;
mod setup;
mod shared;
mod state;

use graphs::*;
pub use handles::{DeviceGuard, Event};
use shared::*;
use state::*;

/// Pooled streams per priority and device (`stream_from_pool`).
pub const POOL_STREAMS_PER_PRIORITY: usize = 4;

// ---------------------------------------------------------------------------------------
// the runtime

struct Ready<D: Driver> {
    core: Arc<Core<D>>,
    allocators: Box<[Lazy<Arc<CachingAllocator>>]>,
    /// (device, peer) pairs with peer access enabled.
    peers: Mutex<std::collections::HashSet<(u32, u32)>>,
    pinned: Lazy<Arc<PinnedAllocator>>,
    graphs: Mutex<HashMap<u64, GraphEntry<D::Graph>>>,
    next_graph: AtomicU64,
}

type Probe<D> = Box<dyn FnOnce() -> std::result::Result<D, String> + Send>;

/// A [`Backend`] built from a [`Driver`]. Initialises on first use; thread-safe.
///
/// Several runtimes may exist at once (tests build host runtimes with different device
/// counts); each has its own per-thread current device and streams.
pub struct Runtime<D: Driver> {
    id: u64,
    /// `D::KIND`, or the name a stand-in presents (`backend::noop`).
    kind: DeviceType,
    /// `D::BUILT`, or false for the stand-in of a name nobody registered.
    built: bool,
    probe: Mutex<Option<Probe<D>>>,
    state: OnceLock<std::result::Result<Ready<D>, String>>,
}

impl<D: Driver> Default for Runtime<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: Driver> std::fmt::Debug for Runtime<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state.get() {
            None => "not initialised".to_string(),
            Some(Ok(r)) => format!("{} device(s)", r.core.count),
            Some(Err(reason)) => format!("unavailable: {reason}"),
        };
        f.debug_struct("Runtime")
            .field("kind", &self.kind)
            .field("state", &state)
            .finish()
    }
}

impl<D: Driver> Backend for Runtime<D> {
    fn device_type(&self) -> DeviceType {
        self.kind
    }

    fn is_built(&self) -> bool {
        self.built
    }

    fn init(&self) -> Result<()> {
        self.ready("init")?;
        Ok(())
    }

    fn is_available(&self) -> bool {
        self.state().is_ok()
    }

    fn unavailable_reason(&self) -> Option<String> {
        self.state().as_ref().err().cloned()
    }

    fn device_count(&self) -> u32 {
        self.state().as_ref().map_or(0, |r| r.core.count)
    }

    fn has_primary_context(&self, device: u32) -> bool {
        let Ok(ready) = self.state() else {
            return false;
        };
        if device >= ready.core.count {
            return false;
        }
        ready
            .core
            .driver
            .has_primary_context(device)
            .unwrap_or_else(|| ready.core.devices[device as usize].get().is_some())
    }

    fn current_device(&self) -> Result<u32> {
        self.ready("current_device")?;
        Ok(with_thread(self.id, |t| t.device))
    }

    fn set_device(&self, device: u32) -> Result<()> {
        self.core("set_device")?.check_device(device)?;
        with_thread(self.id, |t| t.device = device);
        Ok(())
    }

    fn exchange_device(&self, device: u32) -> Result<u32> {
        self.core("exchange_device")?.check_device(device)?;
        Ok(with_thread(self.id, |t| {
            std::mem::replace(&mut t.device, device)
        }))
    }

    fn maybe_exchange_device(&self, device: u32) -> Result<u32> {
        // The current device is per-thread state here: neither exchange creates a context.
        self.core("maybe_exchange_device")?.check_device(device)?;
        Ok(with_thread(self.id, |t| {
            std::mem::replace(&mut t.device, device)
        }))
    }

    fn device_synchronize(&self, device: u32) -> Result<()> {
        let core = self.core("device_synchronize")?;
        let ctx = core.device(device)?;
        let streams: Vec<StreamRef<D>> = ctx.streams.read().clone();
        for (i, s) in streams.iter().enumerate() {
            core.check_not_capturing(
                s,
                core.handle(device, i as u32),
                "synchronize the device of",
            )?;
        }
        let raws: Vec<&D::Stream> = streams.iter().map(|s| &s.raw).collect();
        if core.profiler.active() {
            return Ok(core.profile_timed("device_synchronize", device, None, || {
                core.driver.device_synchronize(device, &raws)
            })?);
        }
        Ok(core.driver.device_synchronize(device, &raws)?)
    }

    fn show_config(&self) -> String {
        self.show_config_impl()
    }

    fn device_properties(&self, device: u32) -> Result<DeviceProperties> {
        let core = self.core("device_properties")?;
        core.check_device(device)?;
        Ok(core.driver.device_properties(device)?)
    }

    fn device_capability(&self, device: u32) -> Result<(u32, u32)> {
        let core = self.core("device_capability")?;
        core.check_device(device)?;
        Ok(core.driver.device_properties(device)?.capability)
    }

    fn runtime_version(&self) -> Result<(u32, u32)> {
        Ok(self.core("runtime_version")?.driver.runtime_version())
    }

    fn runtime_version_at_least(&self, major: u32, minor: u32) -> Result<bool> {
        Ok(self
            .core("runtime_version_at_least")?
            .driver
            .runtime_version()
            >= (major, minor))
    }

    fn device_from_ptr(&self, ptr: usize) -> Result<Device> {
        let ready = self.ready("device_from_ptr")?;
        let device = |index| Device {
            kind: D::KIND,
            index,
        };
        for (index, lazy) in ready.allocators.iter().enumerate() {
            if lazy.get().is_some_and(|a| a.contains(ptr)) {
                return Ok(device(index as u32));
            }
        }
        match ready.core.driver.device_of_ptr(ptr) {
            Some(index) if index < ready.core.count => Ok(device(index)),
            _ => Err(AllocError::InvalidPointer {
                ptr,
                context: "device_from_ptr: it is not memory of any device of this backend",
            }
            .into()),
        }
    }

    // ---- streams ------------------------------------------------------------------------

    fn default_stream(&self, device: u32) -> Result<Stream> {
        let core = self.core("default_stream")?;
        core.device(device)?;
        Ok(core.handle(device, 0))
    }

    fn current_stream(&self, device: u32) -> Result<Stream> {
        let core = self.core("current_stream")?;
        core.device(device)?;
        Ok(core.handle(device, self.current_index(device)))
    }

    fn current_raw_stream(&self, device: u32) -> Result<u64> {
        let core = self.core("current_raw_stream")?;
        core.device(device)?;
        let slot = core.stream(core.handle(device, self.current_index(device)))?;
        Ok(core.driver.stream_native_handle(&slot.raw))
    }

    fn set_current_stream(&self, stream: Stream) -> Result<()> {
        self.core("set_current_stream")?.stream(stream)?;
        let (device, index) = (stream.device.index, stream.index);
        with_thread(self.id, |t| {
            match t.streams.iter_mut().find(|(d, _)| *d == device) {
                Some(entry) => entry.1 = index,
                None => t.streams.push((device, index)),
            }
        });
        Ok(())
    }

    fn stream_from_pool(&self, device: u32, priority: StreamPriority) -> Result<Stream> {
        let core = self.core("stream_from_pool")?;
        let ctx = core.device(device)?;
        let p = priority_index(priority);
        let pool = ctx.pool[p].get_or_try_init(|| {
            core.add_streams(device, priority, POOL_STREAMS_PER_PRIORITY)
                .map(Vec::into_boxed_slice)
        })?;
        let next = ctx.round_robin[p].fetch_add(1, Ordering::Relaxed);
        Ok(core.handle(device, pool[next % pool.len()]))
    }

    fn new_stream(&self, device: u32, priority: StreamPriority) -> Result<Stream> {
        let core = self.core("new_stream")?;
        let index = core.add_streams(device, priority, 1)?[0];
        Ok(core.handle(device, index))
    }

    fn stream_native_handle(&self, stream: Stream) -> Result<u64> {
        let core = self.core("stream_native_handle")?;
        Ok(core.driver.stream_native_handle(&core.stream(stream)?.raw))
    }

    unsafe fn wrap_external_stream(&self, device: u32, handle: u64) -> Result<Stream> {
        let core = self.core("wrap_external_stream")?;
        let ctx = core.device(device)?;
        let known = |streams: &[StreamRef<D>]| {
            streams
                .iter()
                .position(|s| core.driver.stream_native_handle(&s.raw) == handle)
        };
        if let Some(i) = known(&ctx.streams.read()) {
            return Ok(core.handle(device, i as u32));
        }
        // SAFETY: forwarded from this method's contract.
        let raw = unsafe { core.driver.stream_wrap(device, handle)? };
        let mut streams = ctx.streams.write();
        if let Some(i) = known(&streams) {
            return Ok(core.handle(device, i as u32));
        }
        streams.push(Arc::new(StreamSlot::new(raw)));
        Ok(core.handle(device, (streams.len() - 1) as u32))
    }

    fn stream_commit(&self, stream: Stream) -> Result<()> {
        let core = self.core("stream_commit")?;
        Ok(core.driver.stream_commit(&core.stream(stream)?.raw)?)
    }

    fn stream_synchronize(&self, stream: Stream) -> Result<()> {
        let core = self.core("stream_synchronize")?;
        let slot = core.stream(stream)?;
        core.check_not_capturing(&slot, stream, "synchronize")?;
        if core.profiler.active() {
            let (device, index) = (stream.device.index, Some(stream.index));
            return Ok(core.profile_timed("stream_synchronize", device, index, || {
                core.driver.stream_synchronize(&slot.raw)
            })?);
        }
        Ok(core.driver.stream_synchronize(&slot.raw)?)
    }

    fn stream_query(&self, stream: Stream) -> Result<bool> {
        let core = self.core("stream_query")?;
        let slot = core.stream(stream)?;
        core.check_not_capturing(&slot, stream, "query")?;
        Ok(core.driver.stream_query(&slot.raw)?)
    }

    fn launch_host(&self, stream: Stream, task: HostTask) -> Result<()> {
        let core = self.core("launch_host")?;
        let slot = core.stream(stream)?;
        let task = if core.profiler.active() {
            core.profile_task(task, stream)
        } else {
            task
        };
        Ok(core.driver.launch_host(&slot.raw, task)?)
    }

    // ---- events ---------------------------------------------------------------------------

    fn event_acquire(&self, device: u32, enable_timing: bool) -> Result<EventId> {
        let core = self.core("event_acquire")?;
        core.check_device(device)?;
        Ok(core.events.acquire_id(device, enable_timing)?)
    }

    fn event_release(&self, id: EventId) -> Result<()> {
        Ok(self.core("event_release")?.events.release_id(id)?)
    }

    #[inline]
    fn event_record(&self, id: EventId, stream: Stream) -> Result<()> {
        let core = self.core("event_record")?;
        Ok(core.record(&*core.events.get(id)?, stream)?)
    }

    fn event_sync_record(&self, id: EventId, stream: Stream) -> Result<()> {
        let core = self.core("event_sync_record")?;
        Ok(core.sync_record(&*core.events.get(id)?, stream)?)
    }

    fn event_wait(&self, id: EventId, stream: Stream) -> Result<()> {
        let core = self.core("event_wait")?;
        Ok(core.wait(&*core.events.get(id)?, stream)?)
    }

    fn event_synchronize(&self, id: EventId) -> Result<()> {
        let core = self.core("event_synchronize")?;
        Ok(core.synchronize(&*core.events.get(id)?)?)
    }

    #[inline]
    fn event_query(&self, id: EventId) -> Result<bool> {
        let core = self.core("event_query")?;
        Ok(core.query(&*core.events.get(id)?)?)
    }

    fn event_elapsed_time(&self, start: EventId, end: EventId) -> Result<f64> {
        let core = self.core("event_elapsed_time")?;
        let (a, b) = (core.events.get(start)?, core.events.get(end)?);
        Ok(core.elapsed(&a, &b, (Some(start), Some(end)))?)
    }

    fn event_completion_time(&self, id: EventId) -> Result<f64> {
        let core = self.core("event_completion_time")?;
        Ok(core.completion_time(&*core.events.get(id)?, Some(id))?)
    }

    fn event_notify(&self, id: EventId, callback: EventCallback) -> Result<()> {
        let core = self.core("event_notify")?;
        Ok(core.notify(&*core.events.get(id)?, callback)?)
    }

    fn event_pool_empty_cache(&self) -> Result<u64> {
        Ok(self.core("event_pool_empty_cache")?.events.empty_cache())
    }

    // ---- pinned host memory ---------------------------------------------------------------

    fn is_pinned_ptr(&self, ptr: usize) -> bool {
        self.state().as_ref().is_ok_and(|r| {
            r.pinned.get().is_some_and(|a| a.contains(ptr)) || r.core.driver.is_pinned_ptr(ptr)
        })
    }

    fn pinned_allocator(&self) -> Result<Arc<PinnedAllocator>> {
        let ready = self.ready("pinned_allocator")?;
        ready
            .pinned
            .get_or_try_init(|| {
                let provider = ready.core.driver.pinned_memory_provider()?;
                // Pinned buffers are used by work on the backend's streams (copies on CUDA
                // streams): with the event pool, `record_stream` gates their reuse.
                Ok(Arc::new(PinnedAllocator::new(
                    provider,
                    Some(Self::events_adapter(ready)),
                )))
            })
            .cloned()
    }

    // ---- random numbers -------------------------------------------------------------------

    fn default_generator(&self, device: u32) -> Result<Arc<Generator>> {
        Ok(Arc::clone(
            &self.core("default_generator")?.device(device)?.generator,
        ))
    }

    fn new_generator(&self, device: u32) -> Result<Arc<Generator>> {
        self.core("new_generator")?.check_device(device)?;
        Ok(Arc::new(Generator::default()))
    }

    // ---- graphs ---------------------------------------------------------------------------

    fn graph_create(&self, device: u32) -> Result<GraphId> {
        self.graph_create_impl(device)
    }

    fn graph_create_with(&self, device: u32, keep_graph: bool) -> Result<GraphId> {
        self.graph_create_with_impl(device, keep_graph)
    }

    fn graph_capture_begin(&self, graph: GraphId, stream: Stream, pool: MempoolId) -> Result<()> {
        self.graph_capture_begin_impl(graph, stream, pool)
    }

    fn graph_capture_end(&self, graph: GraphId) -> Result<()> {
        self.graph_capture_end_impl(graph)
    }

    fn graph_instantiate(&self, graph: GraphId) -> Result<()> {
        self.graph_instantiate_impl(graph)
    }

    fn graph_is_instantiated(&self, graph: GraphId) -> Result<bool> {
        self.graph_is_instantiated_impl(graph)
    }

    fn graph_replay(&self, graph: GraphId) -> Result<()> {
        self.graph_replay_impl(graph)
    }

    fn graph_reset(&self, graph: GraphId) -> Result<()> {
        self.graph_reset_impl(graph)
    }

    fn graph_destroy(&self, graph: GraphId) -> Result<()> {
        self.graph_destroy_impl(graph)
    }

    fn graph_pool(&self, graph: GraphId) -> Result<MempoolId> {
        self.graph_pool_impl(graph)
    }

    fn graph_pool_handle(&self, device: u32) -> Result<MempoolId> {
        self.graph_pool_handle_impl(device)
    }

    // ---- memory ---------------------------------------------------------------------------

    fn device_allocator(&self, device: u32) -> Result<Arc<dyn DeviceAllocator>> {
        let ready = self.ready("device_allocator")?;
        Ok(self.allocator_in(ready, device)?)
    }

    fn memory_provider(&self, device: u32) -> Result<Arc<dyn crate::alloc::MemoryProvider>> {
        let core = self.core("memory_provider")?;
        core.check_device(device)?;
        Ok(core.driver.memory_provider(device)?)
    }

    fn empty_cache(&self, device: u32) -> Result<()> {
        let ready = self.ready("empty_cache")?;
        Ok(self.allocator_in(ready, device)?.empty_cache()?)
    }

    fn memory_stats(&self, device: u32) -> Result<crate::alloc::MemoryStats> {
        let ready = self.ready("memory_stats")?;
        Ok(self.allocator_in(ready, device)?.stats())
    }

    fn reset_peak_memory_stats(&self, device: u32) -> Result<()> {
        let ready = self.ready("reset_peak_memory_stats")?;
        self.allocator_in(ready, device)?.reset_peak_stats();
        Ok(())
    }

    fn set_memory_fraction(&self, device: u32, fraction: f64) -> Result<()> {
        let ready = self.ready("set_memory_fraction")?;
        Ok(self
            .allocator_in(ready, device)?
            .set_memory_fraction(fraction)?)
    }

    fn current_allocated_memory(&self, device: u32) -> Result<u64> {
        let ready = self.ready("current_allocated_memory")?;
        Ok(self.allocator_in(ready, device)?.allocated_bytes())
    }

    fn driver_allocated_memory(&self, device: u32) -> Result<u64> {
        let core = self.core("driver_allocated_memory")?;
        core.check_device(device)?;
        Ok(core.driver.memory_usage(device)?.used)
    }

    fn recommended_max_memory(&self, device: u32) -> Result<u64> {
        let core = self.core("recommended_max_memory")?;
        core.check_device(device)?;
        Ok(core.driver.memory_usage(device)?.recommended_max)
    }

    fn alloc_scalar_with_value(&self, stream: Stream, value: &[u8]) -> Result<usize> {
        let ready = self.ready("alloc_scalar_with_value")?;
        let slot = ready.core.stream(stream)?;
        ready
            .core
            .check_not_capturing(&slot, stream, "write a scalar buffer on")?;
        if value.is_empty() {
            return Err(DeviceError::InvalidArgument(
                "alloc_scalar_with_value needs at least one byte".into(),
            )
            .into());
        }
        let allocator = self.allocator_in(ready, stream.device.index)?;
        let ptr = allocator.raw_alloc(value.len(), stream)?;
        // SAFETY: `ptr` is a fresh block of at least `value.len()` bytes of the stream's
        // device, handed to nobody else yet; the write is queued on the stream it was
        // allocated for, so earlier work on the stream that used the memory comes first.
        let written = unsafe { ready.core.driver.write_async(&slot.raw, ptr, value) };
        if let Err(e) = written {
            let _ = allocator.raw_free(ptr);
            return Err(e.into());
        }
        Ok(ptr)
    }

    // ---- several devices ----------------------------------------------------------------------

    fn can_device_access_peer(&self, device: u32, peer: u32) -> Result<bool> {
        self.can_device_access_peer_impl(device, peer)
    }

    fn enable_peer_access(&self, device: u32, peer: u32) -> Result<()> {
        self.enable_peer_access_impl(device, peer)
    }

    fn is_peer_access_enabled(&self, device: u32, peer: u32) -> Result<bool> {
        self.is_peer_access_enabled_impl(device, peer)
    }

    fn memcpy_async(
        &self,
        dst: usize,
        dst_device: u32,
        src: usize,
        src_device: u32,
        bytes: usize,
        stream: Stream,
    ) -> Result<()> {
        self.memcpy_async_impl(dst, dst_device, src, src_device, bytes, stream)
    }

    // ---- profiler ---------------------------------------------------------------------------

    fn profiler_start_trace(&self, mode: ProfilerMode, wait_until_completed: bool) -> Result<()> {
        let ready = self.ready("profiler_start_trace")?;
        ready.core.profiler.start(mode, wait_until_completed)?;
        if mode.allocations {
            for (device, lazy) in ready.allocators.iter().enumerate() {
                if let Some(allocator) = lazy.get() {
                    profile_allocator(&ready.core.profiler, device as u32, allocator);
                }
            }
        }
        Ok(())
    }

    fn profiler_stop_trace(&self) -> Result<ProfilerTrace> {
        let ready = self.ready("profiler_stop_trace")?;
        let profiler = &ready.core.profiler;
        let mut sync_error = None;
        if profiler.wait_until_completed()? {
            for device in 0..ready.core.count {
                if ready.core.devices[device as usize].get().is_some() {
                    if let Err(e) = self.device_synchronize(device) {
                        sync_error.get_or_insert(e);
                    }
                }
            }
        }
        let crate::profiler::Stopped {
            mut events,
            start_unix_us,
            duration_us,
            dropped,
            saved,
        } = profiler.stop()?;
        for s in saved {
            let Some(allocator) = ready.allocators[s.device as usize].get() else {
                continue;
            };
            let history = allocator.memory_history();
            events.extend(crate::profiler::history_events(
                s.device,
                &history,
                start_unix_us,
            ));
            if !s.was_recording {
                // History was off and empty before the profile: put it back that way.
                allocator.record_memory_history(None);
                allocator.clear_memory_history();
            }
        }
        if let Some(e) = sync_error {
            return Err(e);
        }
        events.sort_by(|a, b| a.ts_us.total_cmp(&b.ts_us));
        Ok(ProfilerTrace {
            device_type: D::KIND,
            start_unix_us,
            duration_us,
            events,
            dropped,
        })
    }
}

/// Turn on an allocator's memory history for a profile, noting whether it was on.
fn profile_allocator(profiler: &Profiler, device: u32, allocator: &CachingAllocator) {
    // accelrt cannot read an allocator's history setting: a history that holds entries is
    // taken as the user's recording, which stays on after the profile.
    let existing = allocator.memory_history().len();
    allocator.record_memory_history(Some(HistoryConfig {
        max_entries: existing + PROFILER_HISTORY_ENTRIES,
        context: true,
    }));
    profiler.save_history(SavedHistory {
        device,
        was_recording: existing > 0,
    });
}

/// History entries a profile keeps per allocator (beyond what it already held).
const PROFILER_HISTORY_ENTRIES: usize = 1_000_000;
