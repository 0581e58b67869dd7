//! The CUDA backend, through cudarc's driver bindings (loaded at run time: the binary builds
//! without a CUDA toolkit and runs on machines without a GPU, where the backend reports
//! itself unavailable with the reason).
//!
//! Layout, like cudarc's own `sys` / `result` / `safe` split:
//! - `sys/`: every raw driver call, one thin wrapper each, with its `SAFETY` argument (by area:
//!   `device.rs`, `stream.rs`, `memory.rs`, `module.rs` (feature `test-kernels`); `load.rs`
//!   opens the library);
//! - `context.rs`: primary contexts (retained per device on first use), the scoped
//!   current-context guard, errors kept from `Drop`;
//! - `stream.rs`, `event.rs`, `graph.rs`, `memory.rs`: the handle types;
//! - `kernels.rs` (feature `test-kernels`): the PTX kernels of the GPU tests, launched on a
//!   raw stream; `launch.rs`: the [`CudaDriver`] methods that launch them on a stream;
//! - this file: [`CudaDriver`], the [`Driver`] the runtime turns into the `cuda` backend.
//!
//! Conventions: the device's default stream is the legacy NULL stream (native handle 0, as
//! PyTorch's); other streams are non-blocking. Handle-based calls do not touch the calling
//! thread's current context; calls that need one (creating streams, events, memory) make the
//! device's primary context current for the call and restore the previous one. Errors that
//! happen where none can be returned (`Drop`, callbacks) are kept and returned by the next
//! call on that device.

mod context;
mod event;
mod graph;
#[cfg(feature = "test-kernels")]
mod kernels;
#[cfg(feature = "test-kernels")]
mod launch;
mod memory;
mod raw_stream;
mod stream;
mod sys;
mod task;

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

pub use event::CudaEvent;
pub use graph::CudaGraph;
pub use memory::{CudaMemory, PinnedMemory};
pub use stream::CudaStream;

use context::Context;
use task::check_not_in_host_task;

use crate::alloc::MemoryProvider;
use crate::device::{DeviceProperties, DeviceType};
use crate::driver::{Driver, MemoryUsage};
use crate::driver::{EventCallback, HostTask};
use crate::error::{DeviceError, DeviceResult};
use crate::stream::StreamPriority;

/// The oldest driver API version this backend runs on (CUDA 12.8: `cuEventElapsedTime_v2`).
pub const MIN_DRIVER_VERSION: i32 = 12080;

/// Environment variables the CUDA driver reads that change what this backend sees.
const ENV_VARS: &[&str] = &["CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"];

/// Per-device state, created on first use.
struct DeviceSlot {
    context: OnceLock<Arc<Context>>,
    memory: OnceLock<Arc<CudaMemory>>,
    properties: OnceLock<DeviceProperties>,
}

/// The CUDA [`Driver`]: devices, streams, events, graphs and memory of the NVIDIA GPUs the
/// driver library reports.
pub struct CudaDriver {
    devices: Box<[DeviceSlot]>,
    version: (u32, u32),
    pinned: OnceLock<Arc<PinnedMemory>>,
    /// Serialises the fallible first-use initialisations above.
    init: Mutex<()>,
}

impl std::fmt::Debug for CudaDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDriver")
            .field("devices", &self.devices.len())
            .field("driver_version", &self.version)
            .finish()
    }
}

/// Open the driver library and count devices, or say why that is impossible.
fn open() -> std::result::Result<(u32, (u32, u32)), String> {
    if !sys::library_present() {
        return Err(
            "no CUDA driver library was found (libcuda.so.1 is installed with the \
                    NVIDIA driver): install the driver on a machine with an NVIDIA GPU, or use \
                    the host backend"
                .into(),
        );
    }
    let missing: Vec<&str> = [sys::SYMBOLS, sys::HOOKS_SYMBOLS]
        .into_iter()
        .chain(cfg!(feature = "test-kernels").then_some(sys::KERNEL_SYMBOLS))
        .flat_map(sys::missing_symbols)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the CUDA driver library lacks {} (it is older than CUDA {}.{}): update the NVIDIA \
             driver",
            missing.join(", "),
            MIN_DRIVER_VERSION / 1000,
            MIN_DRIVER_VERSION % 1000 / 10
        ));
    }
    sys::init().map_err(|e| format!("CUDA could not be initialised: {}", e.into_error()))?;
    let version = sys::driver_version().map_err(|e| e.into_error().to_string())?;
    if version < MIN_DRIVER_VERSION {
        return Err(format!(
            "the NVIDIA driver supports CUDA {}.{}; accelrt's CUDA backend needs {}.{} or newer: \
             update the driver",
            version / 1000,
            version % 1000 / 10,
            MIN_DRIVER_VERSION / 1000,
            MIN_DRIVER_VERSION % 1000 / 10
        ));
    }
    let count = sys::device_count().map_err(|e| e.into_error().to_string())?;
    if count <= 0 {
        return Err("the CUDA driver reports no devices (check nvidia-smi and \
                    CUDA_VISIBLE_DEVICES)"
            .into());
    }
    Ok((
        count as u32,
        ((version / 1000) as u32, (version % 1000 / 10) as u32),
    ))
}

impl CudaDriver {
    /// The primary context of a valid device, retained on first use.
    fn context(&self, device: u32) -> DeviceResult<&Arc<Context>> {
        let slot = self.slot(device)?;
        if let Some(ctx) = slot.context.get() {
            return Ok(ctx);
        }
        let _init = self.init.lock();
        if let Some(ctx) = slot.context.get() {
            return Ok(ctx);
        }
        let ctx = Arc::new(Context::retain(device)?);
        Ok(slot.context.get_or_init(|| ctx))
    }

    fn slot(&self, device: u32) -> DeviceResult<&DeviceSlot> {
        self.devices
            .get(device as usize)
            .ok_or(DeviceError::InvalidDevice {
                backend: DeviceType::Cuda,
                index: device,
                count: self.devices.len() as u32,
            })
    }

    fn device_memory(&self, device: u32) -> DeviceResult<&Arc<CudaMemory>> {
        let slot = self.slot(device)?;
        if let Some(m) = slot.memory.get() {
            return Ok(m);
        }
        let ctx = Arc::clone(self.context(device)?);
        let _init = self.init.lock();
        if let Some(m) = slot.memory.get() {
            return Ok(m);
        }
        let memory = Arc::new(CudaMemory::new(ctx)?);
        Ok(slot.memory.get_or_init(|| memory))
    }

    /// The device's properties from the driver (no context needed), cached.
    fn read_properties(&self, device: u32) -> DeviceResult<DeviceProperties> {
        let slot = self.slot(device)?;
        let dev = sys::device_get(device as i32)?;
        let attr = |a| sys::device_attribute(dev, a).map(|v| v.max(0) as u32);
        let total = sys::device_total_mem(dev)? as u64;
        let props = DeviceProperties {
            name: sys::device_name(dev)?,
            total_memory: total,
            recommended_max_memory: total,
            multiprocessor_count: attr(sys::Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            max_threads_per_group: attr(sys::Attr::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X)?,
            capability: (
                attr(sys::Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(sys::Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
            l2_cache_bytes: u64::from(attr(sys::Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?),
            host_visible_memory: false,
        };
        Ok(slot.properties.get_or_init(|| props).clone())
    }

    /// The driver API version as (major, minor), e.g. (13, 0).
    pub fn driver_version(&self) -> (u32, u32) {
        self.version
    }

    /// Whether device `device` can read and write memory of device `peer` directly.
    pub fn can_access_peer(&self, device: u32, peer: u32) -> DeviceResult<bool> {
        let (a, b) = (self.context(device)?, self.context(peer)?);
        if device == peer {
            return Ok(true);
        }
        Ok(sys::can_access_peer(a.dev, b.dev)?)
    }

    /// Let kernels on `device` access memory of `peer` (device memory, and pages that
    /// `peer`'s provider maps from now on). Enabling twice is fine; devices that cannot
    /// reach each other give an error that says so.
    pub fn enable_peer_access(&self, device: u32, peer: u32) -> DeviceResult<()> {
        if device == peer {
            return Ok(());
        }
        if !self.can_access_peer(device, peer)? {
            return Err(DeviceError::Unsupported {
                backend: DeviceType::Cuda,
                what: "peer access between these two devices (cuDeviceCanAccessPeer says no: \
                       they share no NVLink or PCIe peer path)",
            });
        }
        let (ctx, peer_ctx) = (self.context(device)?, self.context(peer)?);
        {
            let _current = ctx.bind()?;
            // SAFETY: `peer_ctx` is retained by this driver; `ctx` is current for the call.
            unsafe { sys::ctx_enable_peer_access(peer_ctx.raw) }?;
        }
        self.device_memory(peer)?.grant_peer(device);
        Ok(())
    }

    // ---- device work for tests and benchmarks (the methods that launch the PTX kernels are
    // in `kernels.rs`, feature `test-kernels`) -------------------------------------------------

    /// Set `count` 32-bit words from `ptr` to `value` with `cuMemsetD32Async`, in stream order.
    ///
    /// # Safety
    /// `ptr .. ptr + 4 * count` must be memory of the stream's device (or pinned memory) that
    /// the caller owns until the work has run.
    pub unsafe fn memset_u32(
        &self,
        stream: &CudaStream,
        ptr: usize,
        count: usize,
        value: u32,
    ) -> DeviceResult<()> {
        stream.ctx.deferred.take()?;
        // SAFETY: forwarded from this function's contract; the stream handle is live or null.
        stream.call(|s| unsafe { sys::memset_d32_async(ptr as sys::CUdeviceptr, value, count, s) })
    }

    /// Copy host bytes to device (or pinned) memory; synchronous (waits for the copy, and
    /// for work on the legacy default stream).
    ///
    /// # Safety
    /// `dst .. dst + src.len()` must be memory of `device` the caller owns, unused by work in
    /// flight.
    pub unsafe fn copy_to_device(&self, device: u32, dst: usize, src: &[u8]) -> DeviceResult<()> {
        check_not_in_host_task("copy memory")?;
        let ctx = self.context(device)?;
        ctx.deferred.take()?;
        let _current = ctx.bind()?;
        // SAFETY: forwarded from this function's contract.
        Ok(unsafe { sys::memcpy_htod(dst as sys::CUdeviceptr, src) }?)
    }

    /// Copy device (or pinned) memory to host bytes; synchronous.
    ///
    /// # Safety
    /// `src .. src + dst.len()` must be readable memory of `device`, not written by work in
    /// flight.
    pub unsafe fn copy_to_host(&self, device: u32, dst: &mut [u8], src: usize) -> DeviceResult<()> {
        check_not_in_host_task("copy memory")?;
        let ctx = self.context(device)?;
        ctx.deferred.take()?;
        let _current = ctx.bind()?;
        // SAFETY: forwarded from this function's contract.
        Ok(unsafe { sys::memcpy_dtoh(dst, src as sys::CUdeviceptr) }?)
    }

    /// The device memory provider of `device` (the one its caching allocator uses).
    pub fn device_memory_provider(&self, device: u32) -> DeviceResult<Arc<CudaMemory>> {
        self.device_memory(device).cloned()
    }
}

impl Driver for CudaDriver {
    type Stream = CudaStream;
    type Event = CudaEvent;
    type Graph = CudaGraph;

    const KIND: DeviceType = DeviceType::Cuda;

    fn probe() -> std::result::Result<Self, String> {
        // cudarc panics where a library or symbol is missing; `open` checks both first, and
        // this turns anything it missed into the unavailable reason instead of a crash.
        let (count, version) = std::panic::catch_unwind(open).unwrap_or_else(|p| {
            Err(format!(
                "loading the CUDA driver failed: {}",
                task::panic_text(&*p)
            ))
        })?;
        Ok(CudaDriver {
            devices: (0..count)
                .map(|_| DeviceSlot {
                    context: OnceLock::new(),
                    memory: OnceLock::new(),
                    properties: OnceLock::new(),
                })
                .collect(),
            version,
            pinned: OnceLock::new(),
            init: Mutex::new(()),
        })
    }

    fn device_count(&self) -> u32 {
        self.devices.len() as u32
    }

    fn device_properties(&self, device: u32) -> DeviceResult<DeviceProperties> {
        let slot = self.slot(device)?;
        let mut props = match slot.properties.get() {
            Some(p) => p.clone(),
            None => self.read_properties(device)?,
        };
        // Once accelrt has opened the device, the recommended working set is what was free
        // then (total memory before: asking would create a context).
        if let Some(ctx) = slot.context.get() {
            props.recommended_max_memory = ctx.free_at_open;
        }
        Ok(props)
    }

    fn has_primary_context(&self, device: u32) -> Option<bool> {
        let dev = sys::device_get(device as i32).ok()?;
        sys::primary_ctx_is_active(dev).ok()
    }

    fn device_of_ptr(&self, ptr: usize) -> Option<u32> {
        // Only once a context exists: looking a pointer up must not create one.
        let ctx = self.devices.iter().find_map(|d| d.context.get())?;
        let _current = ctx.bind().ok()?;
        sys::pointer_device_ordinal(ptr).map(|o| o as u32)
    }

    fn memory_usage(&self, device: u32) -> DeviceResult<MemoryUsage> {
        let ctx = self.context(device)?;
        let (free, total) = {
            let _current = ctx.bind()?;
            sys::mem_get_info()?
        };
        Ok(MemoryUsage {
            used: (total - free) as u64,
            recommended_max: ctx.free_at_open,
        })
    }

    fn runtime_version(&self) -> (u32, u32) {
        self.version
    }

    fn env_vars(&self) -> &'static [&'static str] {
        ENV_VARS
    }

    fn stream_create(
        &self,
        device: u32,
        priority: StreamPriority,
        default: bool,
    ) -> DeviceResult<CudaStream> {
        let ctx = Arc::clone(self.context(device)?);
        if default {
            return Ok(CudaStream::default_stream(ctx));
        }
        // Lower numbers run first: `least` (usually 0) is normal, `greatest` is high.
        let (least, greatest) = ctx.priorities;
        let p = match priority {
            StreamPriority::Normal => least,
            StreamPriority::High => greatest,
        };
        CudaStream::create(ctx, p)
    }

    unsafe fn stream_wrap(&self, device: u32, handle: u64) -> DeviceResult<CudaStream> {
        let ctx = Arc::clone(self.context(device)?);
        // SAFETY: forwarded from this function's contract.
        unsafe { CudaStream::external(ctx, handle) }
    }

    fn stream_native_handle(&self, stream: &CudaStream) -> u64 {
        stream.handle()
    }

    fn stream_synchronize(&self, stream: &CudaStream) -> DeviceResult<()> {
        stream.synchronize()
    }

    #[inline]
    fn stream_query(&self, stream: &CudaStream) -> DeviceResult<bool> {
        stream.query()
    }

    fn stream_wait_event(&self, stream: &CudaStream, event: &CudaEvent) -> DeviceResult<()> {
        event.wait(stream)
    }

    fn launch_host(&self, stream: &CudaStream, task: HostTask) -> DeviceResult<()> {
        stream.launch_host(task)
    }

    fn device_synchronize(&self, device: u32, streams: &[&CudaStream]) -> DeviceResult<()> {
        check_not_in_host_task("synchronize a device")?;
        let ctx = self.context(device)?;
        ctx.deferred.take()?;
        {
            let _current = ctx.bind()?;
            sys::ctx_synchronize()?;
        }
        let mut first_error = None;
        for s in streams {
            if let Err(e) = s.take_errors() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn event_create(&self, device: u32, timing: bool) -> DeviceResult<CudaEvent> {
        CudaEvent::create(Arc::clone(self.context(device)?), timing)
    }

    #[inline]
    fn event_record(&self, event: &CudaEvent, stream: &CudaStream) -> DeviceResult<()> {
        event.record(stream)
    }

    #[inline]
    fn event_query(&self, event: &CudaEvent) -> DeviceResult<bool> {
        event.query()
    }

    fn event_synchronize(&self, event: &CudaEvent) -> DeviceResult<()> {
        event.synchronize()
    }

    fn event_elapsed_ms(&self, start: &CudaEvent, end: &CudaEvent) -> DeviceResult<f64> {
        CudaEvent::elapsed_ms(start, end)
    }

    fn event_notify(&self, event: &CudaEvent, callback: EventCallback) -> DeviceResult<()> {
        event.notify(callback)
    }

    fn event_completion_ns(&self, event: &CudaEvent) -> DeviceResult<u64> {
        event.completion_ns()
    }

    fn capture_begin(&self, stream: &CudaStream) -> DeviceResult<()> {
        stream.begin_capture()
    }

    fn capture_end(&self, stream: &CudaStream) -> DeviceResult<CudaGraph> {
        CudaGraph::end_capture(stream)
    }

    fn graph_launch(&self, graph: &CudaGraph, stream: &CudaStream) -> DeviceResult<()> {
        graph.launch(stream)
    }

    fn graph_instantiate(&self, graph: &CudaGraph) -> DeviceResult<()> {
        graph.instantiate()
    }

    fn graph_discard_template(&self, graph: &CudaGraph) {
        graph.discard_template();
    }

    fn capture_join(
        &self,
        stream: &CudaStream,
        _origin: &CudaStream,
        event: &CudaEvent,
    ) -> DeviceResult<()> {
        // Waiting for an event recorded in a capture makes the stream part of that capture.
        event.wait(stream)
    }

    fn capture_leave(&self, stream: &CudaStream, graph: Option<&CudaGraph>) -> DeviceResult<()> {
        // Host tasks captured on the joined stream run at every replay of the graph: the
        // graph keeps their boxes from now on (without a graph, nothing will run them, and
        // the stream keeps them, as it does for captures that failed).
        if let Some(graph) = graph {
            graph.adopt_tasks(stream.take_captured_tasks());
        }
        Ok(())
    }

    unsafe fn write_async(&self, stream: &CudaStream, dst: usize, src: &[u8]) -> DeviceResult<()> {
        stream.ctx.deferred.take()?;
        // SAFETY: forwarded from this function's contract; the stream handle is live or null
        // (then `call` makes its context current).
        stream.call(|s| unsafe { sys::memcpy_htod_async(dst as sys::CUdeviceptr, src, s) })
    }

    fn memory_provider(&self, device: u32) -> DeviceResult<Arc<dyn MemoryProvider>> {
        Ok(Arc::clone(self.device_memory(device)?) as Arc<dyn MemoryProvider>)
    }

    fn can_access_peer(&self, device: u32, peer: u32) -> DeviceResult<bool> {
        CudaDriver::can_access_peer(self, device, peer)
    }

    fn enable_peer_access(&self, device: u32, peer: u32) -> DeviceResult<()> {
        CudaDriver::enable_peer_access(self, device, peer)
    }

    unsafe fn copy_async(
        &self,
        stream: &CudaStream,
        dst: usize,
        src: usize,
        bytes: usize,
    ) -> DeviceResult<()> {
        stream.ctx.deferred.take()?;
        // SAFETY: forwarded from this function's contract; the stream handle is live or null
        // (then `call` makes its context current).
        stream.call(|s| unsafe {
            sys::memcpy_async(dst as sys::CUdeviceptr, src as sys::CUdeviceptr, bytes, s)
        })
    }

    fn pinned_memory_provider(&self) -> DeviceResult<Arc<dyn MemoryProvider>> {
        if let Some(p) = self.pinned.get() {
            return Ok(Arc::clone(p) as Arc<dyn MemoryProvider>);
        }
        let ctx = Arc::clone(self.context(0)?);
        let pinned = self.pinned.get_or_init(|| Arc::new(PinnedMemory::new(ctx)));
        Ok(Arc::clone(pinned) as Arc<dyn MemoryProvider>)
    }

    fn is_pinned_ptr(&self, ptr: usize) -> bool {
        // Only once a context exists: looking a pointer up must not create one.
        match self.devices.first().and_then(|d| d.context.get()) {
            Some(ctx) => ctx
                .bind()
                .is_ok_and(|_current| sys::pointer_is_host_memory(ptr)),
            None => false,
        }
    }
}
