//! The host backend: always built. Device memory is host memory; each stream is a worker
//! thread that runs launched host tasks in FIFO order; events mark positions in streams and
//! complete when the worker reaches them. It behaves like an asynchronous device, so code
//! written against it (and the allocator's cross-stream logic) is exercised for real.
//!
//! `ACCELRT_HOST_DEVICES=N` sets the number of host devices (default 1).

mod event;
mod graph;
mod stream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

pub use crate::alloc::HostMemory;
pub use event::HostEvent;
pub use graph::HostGraph;
pub use stream::HostStream;

use crate::alloc::MemoryProvider;
use crate::device::{DeviceProperties, DeviceType};
use crate::driver::Driver;
use crate::driver::{EventCallback, HostTask};
use crate::error::{DeviceError, DeviceResult};
use crate::stream::StreamPriority;

/// Environment variable with the number of host devices.
pub const HOST_DEVICES_ENV: &str = "ACCELRT_HOST_DEVICES";

/// The most host devices one process may ask for.
pub const MAX_HOST_DEVICES: u32 = 256;

/// Stream ids are process-wide so a worker can recognise its own stream (ids start at 1).
static NEXT_STREAM_ID: AtomicU64 = AtomicU64::new(1);

/// The host [`Driver`].
pub struct HostDriver {
    devices: u32,
    memory: Box<[OnceLock<Arc<HostMemory>>]>,
    pinned: OnceLock<Arc<HostMemory>>,
}

impl std::fmt::Debug for HostDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostDriver")
            .field("devices", &self.devices)
            .finish()
    }
}

impl HostDriver {
    /// A driver with `devices` host devices (1..=[`MAX_HOST_DEVICES`]).
    pub fn with_devices(devices: u32) -> DeviceResult<Self> {
        if !(1..=MAX_HOST_DEVICES).contains(&devices) {
            return Err(DeviceError::InvalidArgument(format!(
                "a host driver needs 1..={MAX_HOST_DEVICES} devices, got {devices}"
            )));
        }
        Ok(HostDriver {
            devices,
            memory: (0..devices).map(|_| OnceLock::new()).collect(),
            pinned: OnceLock::new(),
        })
    }

    /// The device count that `ACCELRT_HOST_DEVICES` set to `value` means (`None`: unset),
    /// or the reason it is unusable.
    pub fn parse_device_count(value: Option<&std::ffi::OsStr>) -> std::result::Result<u32, String> {
        let Some(raw) = value else { return Ok(1) };
        let text = raw
            .to_str()
            .ok_or_else(|| format!("{HOST_DEVICES_ENV} is not valid UTF-8"))?;
        match text.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_HOST_DEVICES).contains(&n) => Ok(n),
            _ => Err(format!(
                "{HOST_DEVICES_ENV}={text:?} is not a device count: expected a whole number \
                 from 1 to {MAX_HOST_DEVICES} (or unset it for 1 device)"
            )),
        }
    }

    fn memory(&self, device: u32) -> &Arc<HostMemory> {
        self.memory[device as usize].get_or_init(|| Arc::new(HostMemory::with_default_capacity()))
    }
}

/// The CPU model from `/proc/cpuinfo`, or `"host"`.
fn cpu_name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines().find_map(|l| {
                    let (key, value) = l.split_once(':')?;
                    (key.trim() == "model name").then(|| value.trim().to_string())
                })
            })
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "host".to_string())
    })
}

/// Size of the CPU's level-2 cache in bytes (0 when unknown).
fn l2_cache_bytes() -> u64 {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).ok();
    (0..8)
        .map(|i| dir.join(format!("index{i}")))
        .find(|d| read(d.join("level")).is_some_and(|l| l.trim() == "2"))
        .and_then(|d| read(d.join("size")))
        .and_then(|size| parse_cache_size(size.trim()))
        .unwrap_or(0)
}

/// `"1024K"`, `"32M"`, `"512"` → bytes.
fn parse_cache_size(s: &str) -> Option<u64> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = digits.parse().ok()?;
    let mult = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl Driver for HostDriver {
    type Stream = HostStream;
    type Event = HostEvent;
    type Graph = HostGraph;

    const KIND: DeviceType = DeviceType::Host;

    fn probe() -> std::result::Result<Self, String> {
        let n = Self::parse_device_count(std::env::var_os(HOST_DEVICES_ENV).as_deref())?;
        Self::with_devices(n).map_err(|e| e.to_string())
    }

    fn device_count(&self) -> u32 {
        self.devices
    }

    fn device_properties(&self, device: u32) -> DeviceResult<DeviceProperties> {
        let mem = self.memory(device);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Ok(DeviceProperties {
            name: cpu_name().to_string(),
            total_memory: mem.memory_info().1,
            recommended_max_memory: mem.recommended_max(),
            multiprocessor_count: cores,
            max_threads_per_group: 1,
            capability: (0, 0),
            l2_cache_bytes: l2_cache_bytes(),
            host_visible_memory: true,
        })
    }

    fn runtime_version(&self) -> (u32, u32) {
        let mut parts = env!("CARGO_PKG_VERSION")
            .split('.')
            .map(|p| p.parse().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    }

    fn env_vars(&self) -> &'static [&'static str] {
        &[HOST_DEVICES_ENV]
    }

    // The host runs every stream's worker at the same OS priority.
    fn stream_create(
        &self,
        device: u32,
        _priority: StreamPriority,
        _default: bool,
    ) -> DeviceResult<HostStream> {
        Ok(HostStream::new(
            NEXT_STREAM_ID.fetch_add(1, Ordering::Relaxed),
            device,
        ))
    }

    fn stream_native_handle(&self, stream: &HostStream) -> u64 {
        stream.shared.id
    }

    fn stream_synchronize(&self, stream: &HostStream) -> DeviceResult<()> {
        let s = &stream.shared;
        s.check_not_worker("synchronize")?;
        s.wait_for(s.end());
        s.take_errors()
    }

    #[inline]
    fn stream_query(&self, stream: &HostStream) -> DeviceResult<bool> {
        Ok(stream.shared.reached(stream.shared.end()))
    }

    fn stream_wait_event(&self, stream: &HostStream, event: &HostEvent) -> DeviceResult<()> {
        match event.position() {
            // Same stream: FIFO order already waits. Reached: nothing to wait for.
            Some(p) if !Arc::ptr_eq(&p.stream, &stream.shared) && !p.reached() => {
                stream.shared.push_wait(p.stream, p.seq)
            }
            _ => Ok(()),
        }
    }

    fn launch_host(&self, stream: &HostStream, task: HostTask) -> DeviceResult<()> {
        stream.shared.launch(task)
    }

    fn event_create(&self, _device: u32, timing: bool) -> DeviceResult<HostEvent> {
        Ok(HostEvent::new(timing))
    }

    #[inline]
    fn event_record(&self, event: &HostEvent, stream: &HostStream) -> DeviceResult<()> {
        event.record(&stream.shared)
    }

    fn event_record_captured(&self, event: &HostEvent, _stream: &HostStream) -> DeviceResult<()> {
        event.record_captured();
        Ok(())
    }

    #[inline]
    fn event_query(&self, event: &HostEvent) -> DeviceResult<bool> {
        Ok(event.query())
    }

    fn event_synchronize(&self, event: &HostEvent) -> DeviceResult<()> {
        event.synchronize()
    }

    fn event_elapsed_ms(&self, start: &HostEvent, end: &HostEvent) -> DeviceResult<f64> {
        HostEvent::elapsed_ms(start, end)
    }

    fn event_notify(&self, event: &HostEvent, callback: EventCallback) -> DeviceResult<()> {
        event.notify(callback);
        Ok(())
    }

    fn event_completion_ns(&self, event: &HostEvent) -> DeviceResult<u64> {
        event.completion_ns()
    }

    fn capture_begin(&self, stream: &HostStream) -> DeviceResult<()> {
        stream.shared.begin_capture()
    }

    fn capture_end(&self, stream: &HostStream) -> DeviceResult<HostGraph> {
        Ok(HostGraph {
            tasks: stream.shared.end_capture()?,
        })
    }

    fn graph_launch(&self, graph: &HostGraph, stream: &HostStream) -> DeviceResult<()> {
        stream.shared.launch_all(&graph.tasks)
    }

    fn capture_join(
        &self,
        stream: &HostStream,
        origin: &HostStream,
        _event: &HostEvent,
    ) -> DeviceResult<()> {
        stream.shared.join_capture(&origin.shared)
    }

    fn capture_leave(&self, stream: &HostStream, _graph: Option<&HostGraph>) -> DeviceResult<()> {
        stream.shared.leave_capture();
        Ok(())
    }

    unsafe fn write_async(&self, stream: &HostStream, dst: usize, src: &[u8]) -> DeviceResult<()> {
        let bytes: Arc<[u8]> = src.into();
        stream.shared.launch(Arc::new(move || {
            // SAFETY: the caller of write_async owns `dst .. dst + len` of host memory until
            // this task has run (the runtime never writes on a capturing stream, so the task
            // runs once, in stream order); `bytes` is our own copy of the source.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst as *mut u8, bytes.len()) }
        }))
    }

    fn memory_provider(&self, device: u32) -> DeviceResult<Arc<dyn MemoryProvider>> {
        Ok(self.memory(device).clone())
    }

    /// Host devices share the process's address space: each reaches every other.
    fn can_access_peer(&self, _device: u32, _peer: u32) -> DeviceResult<bool> {
        Ok(true)
    }

    fn enable_peer_access(&self, _device: u32, _peer: u32) -> DeviceResult<()> {
        Ok(())
    }

    unsafe fn copy_async(
        &self,
        stream: &HostStream,
        dst: usize,
        src: usize,
        bytes: usize,
    ) -> DeviceResult<()> {
        stream.shared.launch(Arc::new(move || {
            // SAFETY: the caller of copy_async keeps both ranges allocated, and unwritten by
            // other work, until this task has run in stream order; `copy` allows overlap.
            unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) }
        }))
    }

    fn pinned_memory_provider(&self) -> DeviceResult<Arc<dyn MemoryProvider>> {
        Ok(self
            .pinned
            .get_or_init(|| Arc::new(HostMemory::with_default_capacity()))
            .clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_parse() {
        for (text, want) in [
            ("1024K", Some(1 << 20)),
            ("32M", Some(32 << 20)),
            ("512", Some(512)),
            ("x", None),
            ("", None),
        ] {
            assert_eq!(parse_cache_size(text), want, "{text:?}");
        }
    }

    #[test]
    fn device_count_from_env_value() {
        use std::ffi::OsStr;
        assert_eq!(HostDriver::parse_device_count(None), Ok(1));
        assert_eq!(
            HostDriver::parse_device_count(Some(OsStr::new(" 3 "))),
            Ok(3)
        );
        for bad in ["0", "-1", "two", "", "257"] {
            let err = HostDriver::parse_device_count(Some(OsStr::new(bad))).unwrap_err();
            assert!(err.contains(HOST_DEVICES_ENV), "{bad:?}: {err}");
        }
    }
}
