//! [`WgpuDriver`]: accelrt's [`Driver`] over wgpu adapters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use accelrt::alloc::MemoryProvider;
use accelrt::backend::host::HostMemory;
use accelrt::driver::{Driver, MemoryUsage};
use accelrt::driver::{EventCallback, HostTask};
use accelrt::error::{DeviceError, DeviceResult};
use accelrt::{DeviceProperties, DeviceType, StreamPriority};

use crate::adapter::{self, MemoryFigures};
use crate::device::points::Point;
use crate::device::DeviceShared;
use crate::event::WgpuEvent;
use crate::kernels::{GpuOp, ReadReply, Region};
use crate::memory::WgpuMemory;
use crate::stream::{Captured, Item, StreamShared, WgpuStream};
use crate::KIND;

/// The wgpu version this crate is built against (`runtime_version`).
pub const WGPU_VERSION: (u32, u32) = (30, 0);

/// Environment variables that configure the backend (wgpu's own).
pub const ENV_VARS: &[&str] = &["WGPU_BACKEND", "WGPU_ADAPTER_NAME"];

/// Stream ids are process-wide, so a worker thread can recognise its own stream.
static NEXT_STREAM_ID: AtomicU64 = AtomicU64::new(1);

/// Work captured from streams: host tasks and GPU operations, encoded again at each replay
/// (wgpu command buffers are consumed by their submission).
#[derive(Clone)]
pub struct WgpuGraph {
    items: Vec<Captured>,
}

impl std::fmt::Debug for WgpuGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuGraph")
            .field("items", &self.items.len())
            .finish()
    }
}

impl WgpuGraph {
    /// Captured items (host tasks and GPU operations).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// A device's memory provider, or why its address range could not be reserved.
type OpenedMemory = std::result::Result<Arc<WgpuMemory>, String>;

/// The wgpu [`Driver`]: every adapter wgpu finds is a device, best first (discrete GPUs,
/// integrated, virtual, then CPU adapters such as lavapipe).
pub struct WgpuDriver {
    devices: Vec<Arc<DeviceShared>>,
    memory: Box<[OnceLock<OpenedMemory>]>,
    pinned: OnceLock<Arc<HostMemory>>,
}

impl std::fmt::Debug for WgpuDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuDriver")
            .field(
                "adapters",
                &self.devices.iter().map(|d| d.label()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A call needs `len` bytes at 4-byte aligned addresses (wgpu's `COPY_BUFFER_ALIGNMENT`).
fn check_aligned(call: &str, what: &[(&str, usize)]) -> DeviceResult<()> {
    for (name, value) in what {
        if value % 4 != 0 {
            return Err(DeviceError::InvalidArgument(format!(
                "{call}: {name} {value:#x} is not a multiple of 4 (wgpu copies and fills whole \
                 4-byte words)"
            )));
        }
    }
    Ok(())
}

impl WgpuDriver {
    fn dev(&self, device: u32) -> &Arc<DeviceShared> {
        &self.devices[device as usize]
    }

    /// The adapter behind `device`, as wgpu describes it.
    pub fn adapter_info(&self, device: u32) -> DeviceResult<wgpu::AdapterInfo> {
        Ok(self.checked(device)?.info.clone())
    }

    /// The adapter's limits (all of them are requested when the device is opened).
    pub fn limits(&self, device: u32) -> DeviceResult<wgpu::Limits> {
        Ok(self.checked(device)?.limits.clone())
    }

    /// Whether timing events can measure GPU work on `device` (`Features::TIMESTAMP_QUERY`).
    pub fn timestamps_supported(&self, device: u32) -> DeviceResult<bool> {
        Ok(self.checked(device)?.timestamps)
    }

    /// The memory figures of `device` now (see [`MemoryFigures`]).
    pub fn memory_figures(&self, device: u32) -> DeviceResult<MemoryFigures> {
        Ok(adapter::memory_figures(&self.checked(device)?.adapter))
    }

    /// The wgpu device and queue behind `device`, for work of your own (submit it through
    /// a stream's order with [`accelrt::Backend::launch_host`] or after synchronizing).
    pub fn wgpu(&self, device: u32) -> DeviceResult<(&wgpu::Device, &wgpu::Queue)> {
        let d = self.checked(device)?;
        Ok((&d.device, &d.queue))
    }

    /// The highest submission number `device`'s GPU is known to have finished, and the last
    /// one handed out.
    pub fn submissions(&self, device: u32) -> DeviceResult<(u64, u64)> {
        let d = self.checked(device)?;
        Ok((d.done(), d.last_submitted()))
    }

    fn checked(&self, device: u32) -> DeviceResult<&Arc<DeviceShared>> {
        self.devices
            .get(device as usize)
            .ok_or(DeviceError::InvalidDevice {
                backend: KIND,
                index: device,
                count: self.devices.len() as u32,
            })
    }

    /// The memory provider of `device`, with its buffers.
    pub fn memory(&self, device: u32) -> DeviceResult<Arc<WgpuMemory>> {
        let d = self.checked(device)?;
        self.memory[device as usize]
            .get_or_init(|| WgpuMemory::new(Arc::clone(d)).map(Arc::new))
            .clone()
            .map_err(|e| crate::device::wgpu_error("reserving address space for wgpu buffers", e))
    }

    fn region(&self, stream: &WgpuStream, ptr: usize, len: usize) -> DeviceResult<Region> {
        let (buffer, offset) = self.memory(stream.device())?.resolve(ptr, len as u64)?;
        Ok(Region {
            buffer,
            offset,
            len: len as u64,
        })
    }

    fn gpu(&self, stream: &WgpuStream, op: GpuOp) -> DeviceResult<()> {
        stream.shared.launch(Item::Gpu(op))
    }

    /// Fill `len` bytes at `ptr` with the 32-bit word `value`, in stream order (zeros through
    /// `clear_buffer`, other values through a compute kernel). `ptr` and `len` must be
    /// multiples of 4.
    pub fn fill(
        &self,
        stream: &WgpuStream,
        ptr: usize,
        len: usize,
        value: u32,
    ) -> DeviceResult<()> {
        check_aligned("fill", &[("address", ptr), ("length", len)])?;
        if len == 0 {
            return Ok(());
        }
        let dst = self.region(stream, ptr, len)?;
        self.gpu(
            stream,
            GpuOp::Fill {
                dst,
                value,
                pattern: false,
                rounds: 0,
            },
        )
    }

    /// Fill `len` bytes at `ptr` with a pattern: word `i` becomes
    /// [`crate::pattern_word`]`(seed, i, rounds)`, computed by a compute kernel in stream
    /// order. Each word costs `rounds` extra hash rounds, so a large `rounds` makes a kernel
    /// that keeps the GPU busy for as long as a test needs.
    pub fn fill_pattern(
        &self,
        stream: &WgpuStream,
        ptr: usize,
        len: usize,
        seed: u32,
        rounds: u32,
    ) -> DeviceResult<()> {
        check_aligned("fill_pattern", &[("address", ptr), ("length", len)])?;
        if len == 0 {
            return Ok(());
        }
        let dst = self.region(stream, ptr, len)?;
        self.gpu(
            stream,
            GpuOp::Fill {
                dst,
                value: seed,
                pattern: true,
                rounds,
            },
        )
    }

    /// Copy `len` bytes from `src` to `dst` on the GPU, in stream order. Addresses and length
    /// must be multiples of 4. Within one segment (one buffer, which wgpu cannot copy to
    /// itself) the bytes go through a temporary buffer, so overlapping ranges copy as
    /// `memmove` does.
    pub fn copy(
        &self,
        stream: &WgpuStream,
        dst: usize,
        src: usize,
        len: usize,
    ) -> DeviceResult<()> {
        check_aligned(
            "copy",
            &[("destination", dst), ("source", src), ("length", len)],
        )?;
        if len == 0 {
            return Ok(());
        }
        let s = self.region(stream, src, len)?;
        let d = self.region(stream, dst, len)?;
        self.gpu(stream, GpuOp::Copy { src: s, dst: d })
    }

    /// Write `bytes` at `dst`, in stream order (any address and length: whole words through
    /// `Queue::write_buffer`, partly written words through an atomic kernel that keeps their
    /// other bytes). The bytes are copied; `bytes` may be dropped when this returns.
    pub fn write(&self, stream: &WgpuStream, dst: usize, bytes: &[u8]) -> DeviceResult<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let region = self.region(stream, dst, bytes.len())?;
        self.gpu(
            stream,
            GpuOp::Write {
                dst: region,
                bytes: bytes.into(),
            },
        )
    }

    /// Read `len` bytes at `src` back to the host, in stream order: the bytes as they are
    /// once the stream's earlier work has run. Blocks until then (not from a task running on
    /// the stream itself).
    pub fn read(&self, stream: &WgpuStream, src: usize, len: usize) -> DeviceResult<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        stream.shared.check_not_worker("read device memory")?;
        let region = self.region(stream, src, len)?;
        let reply = Arc::new(ReadReply::default());
        self.gpu(
            stream,
            GpuOp::Read {
                src: region,
                reply: Arc::clone(&reply),
            },
        )?;
        reply.wait(&stream.shared.device)
    }
}

impl Driver for WgpuDriver {
    type Stream = WgpuStream;
    type Event = WgpuEvent;
    type Graph = WgpuGraph;

    const KIND: DeviceType = KIND;

    /// Every adapter of the backends `WGPU_BACKEND` names (Vulkan, Metal, DX12 by default)
    /// whose name contains `WGPU_ADAPTER_NAME`; unavailable, with the reason, without any.
    fn probe() -> std::result::Result<Self, String> {
        let devices = crate::device::open_all()?;
        Ok(WgpuDriver {
            memory: devices.iter().map(|_| OnceLock::new()).collect(),
            devices,
            pinned: OnceLock::new(),
        })
    }

    fn device_count(&self) -> u32 {
        self.devices.len() as u32
    }

    /// From the adapter's info and limits: wgpu reports no multiprocessor count, compute
    /// capability or cache size (1, (0, 0) and 0 here); the widest workgroup is
    /// `max_compute_workgroup_size_x`.
    fn device_properties(&self, device: u32) -> DeviceResult<DeviceProperties> {
        let d = self.dev(device);
        let info = &d.info;
        let driver = [info.driver.as_str(), info.driver_info.as_str()]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        Ok(DeviceProperties {
            name: format!(
                "{} ({:?}, {:?}, {driver})",
                info.name, info.backend, info.device_type
            ),
            total_memory: d.memory.total,
            recommended_max_memory: d.memory.budget,
            multiprocessor_count: 1,
            max_threads_per_group: d.limits.max_compute_workgroup_size_x.max(1),
            capability: (0, 0),
            l2_cache_bytes: 0,
            host_visible_memory: false,
        })
    }

    fn runtime_version(&self) -> (u32, u32) {
        WGPU_VERSION
    }

    fn env_vars(&self) -> &'static [&'static str] {
        ENV_VARS
    }

    fn device_of_ptr(&self, ptr: usize) -> Option<u32> {
        self.memory.iter().enumerate().find_map(|(i, m)| {
            m.get()
                .and_then(|m| m.as_ref().ok())
                .filter(|m| m.owns_address(ptr))
                .map(|_| i as u32)
        })
    }

    /// Used: the driver's heap usage where it reports one (Vulkan `VK_EXT_memory_budget`),
    /// else what wgpu's allocator holds from the driver; never below what accelrt's own
    /// segments hold. Recommended: the budget when the device was opened.
    fn memory_usage(&self, device: u32) -> DeviceResult<MemoryUsage> {
        let d = self.dev(device);
        let held = self.memory(device)?.driver_allocated();
        let reported = adapter::memory_figures(&d.adapter).usage.or_else(|| {
            d.device
                .generate_allocator_report()
                .map(|r| r.total_reserved_bytes)
        });
        Ok(MemoryUsage {
            used: reported.unwrap_or(0).max(held),
            recommended_max: d.memory.budget,
        })
    }

    // ---- streams ---------------------------------------------------------------------------

    /// wgpu has one queue per device and no priorities: every stream submits to it.
    fn stream_create(
        &self,
        device: u32,
        _priority: StreamPriority,
        _default: bool,
    ) -> DeviceResult<WgpuStream> {
        Ok(WgpuStream::new(
            NEXT_STREAM_ID.fetch_add(1, Ordering::Relaxed),
            Arc::clone(self.dev(device)),
        ))
    }

    fn stream_native_handle(&self, stream: &WgpuStream) -> u64 {
        stream.shared.id
    }

    fn stream_synchronize(&self, stream: &WgpuStream) -> DeviceResult<()> {
        stream.shared.synchronize()
    }

    #[inline]
    fn stream_query(&self, stream: &WgpuStream) -> DeviceResult<bool> {
        stream.shared.query()
    }

    fn stream_wait_event(&self, stream: &WgpuStream, event: &WgpuEvent) -> DeviceResult<()> {
        match event.current() {
            Some(point) => stream.shared.launch(Item::Wait(point)),
            None => Ok(()),
        }
    }

    fn launch_host(&self, stream: &WgpuStream, task: HostTask) -> DeviceResult<()> {
        stream.shared.launch(Item::Host(task))
    }

    // ---- events ----------------------------------------------------------------------------

    fn event_create(&self, device: u32, timing: bool) -> DeviceResult<WgpuEvent> {
        Ok(WgpuEvent::new(Arc::clone(self.dev(device)), timing))
    }

    #[inline]
    fn event_record(&self, event: &WgpuEvent, stream: &WgpuStream) -> DeviceResult<()> {
        let s = &stream.shared;
        let point = if event.timing && s.device.timestamps {
            let point = Arc::new(Point::timed(s.id, &s.device)?);
            s.launch(Item::Gpu(GpuOp::Timestamp {
                point: Arc::clone(&point),
            }))?;
            point
        } else {
            s.point_at_end()?
        };
        *event.point.lock() = Some(point);
        Ok(())
    }

    /// A point of a graph capture: nothing on the device to reach (the runtime never
    /// queries such an event; a wait for it has nothing to wait for).
    fn event_record_captured(&self, event: &WgpuEvent, _stream: &WgpuStream) -> DeviceResult<()> {
        *event.point.lock() = None;
        Ok(())
    }

    #[inline]
    fn event_query(&self, event: &WgpuEvent) -> DeviceResult<bool> {
        match event.current() {
            Some(p) => p.query(&event.device),
            None => Ok(true),
        }
    }

    fn event_synchronize(&self, event: &WgpuEvent) -> DeviceResult<()> {
        match event.current() {
            Some(p) => StreamShared::wait_point(&event.device, &p, "synchronize an event"),
            None => Ok(()),
        }
    }

    fn event_elapsed_ms(&self, start: &WgpuEvent, end: &WgpuEvent) -> DeviceResult<f64> {
        WgpuEvent::elapsed_ms(start, end)
    }

    fn event_notify(&self, event: &WgpuEvent, callback: EventCallback) -> DeviceResult<()> {
        match event.current() {
            Some(p) => event.device.notifier.add(&event.device, p, callback),
            None => {
                callback();
                Ok(())
            }
        }
    }

    fn event_completion_ns(&self, event: &WgpuEvent) -> DeviceResult<u64> {
        event.completion_ns()
    }

    // ---- graphs ----------------------------------------------------------------------------

    fn capture_begin(&self, stream: &WgpuStream) -> DeviceResult<()> {
        stream.shared.begin_capture()
    }

    fn capture_end(&self, stream: &WgpuStream) -> DeviceResult<WgpuGraph> {
        Ok(WgpuGraph {
            items: stream.shared.end_capture()?,
        })
    }

    fn graph_launch(&self, graph: &WgpuGraph, stream: &WgpuStream) -> DeviceResult<()> {
        stream.shared.replay(&graph.items)
    }

    fn capture_join(
        &self,
        stream: &WgpuStream,
        origin: &WgpuStream,
        _event: &WgpuEvent,
    ) -> DeviceResult<()> {
        stream.shared.join_capture(&origin.shared)
    }

    fn capture_leave(&self, stream: &WgpuStream, _graph: Option<&WgpuGraph>) -> DeviceResult<()> {
        stream.shared.leave_capture();
        Ok(())
    }

    // ---- memory ----------------------------------------------------------------------------

    fn memory_provider(&self, device: u32) -> DeviceResult<Arc<dyn MemoryProvider>> {
        Ok(self.memory(device)?)
    }

    /// Host memory: wgpu has no page-locked host allocations (uploads are staged by
    /// `Queue::write_buffer`), so the pinned allocator's memory is ordinary host memory,
    /// which [`WgpuDriver::write`] reads directly.
    fn pinned_memory_provider(&self) -> DeviceResult<Arc<dyn MemoryProvider>> {
        Ok(self
            .pinned
            .get_or_init(|| Arc::new(HostMemory::with_default_capacity()))
            .clone())
    }

    unsafe fn write_async(&self, stream: &WgpuStream, dst: usize, src: &[u8]) -> DeviceResult<()> {
        self.write(stream, dst, src)
    }
}
