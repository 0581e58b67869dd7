//! accelrt-wgpu: an accelrt backend over [wgpu](https://wgpu.rs): Vulkan on Linux and
//! Windows (NVIDIA, AMD, Intel drivers, or Mesa's lavapipe on the CPU), Metal on macOS (the
//! family PyTorch's MPS backend serves), DX12 on Windows.
//!
//! Like `accelrt-fault`, it lives outside `accelrt` and reaches accelrt's users through the
//! registry: [`WgpuDriver`] implements [`accelrt::driver::Driver`] with
//! `KIND = DeviceType::custom("wgpu")`, accelrt's [`accelrt::runtime::Runtime`] makes it a
//! full [`accelrt::Backend`] (validation, stream and event pools, graphs, the caching
//! allocator), and [`register`] adds it to accelrt's registry, after which
//! `backend_by_name("wgpu")`, `accelrt info`, `accelrt replay --backend wgpu` and
//! `accelrt bench --backend wgpu` find it.
//!
//! How the driver calls map onto wgpu:
//! - **devices** are adapters, best first (discrete, integrated, virtual, CPU); `WGPU_BACKEND`
//!   and `WGPU_ADAPTER_NAME` (wgpu's own variables) choose them. Properties come from the
//!   adapter's info and limits, memory from the driver where it reports it (Vulkan heaps and
//!   `VK_EXT_memory_budget`; see [`MemoryFigures`]). Without any adapter the backend is
//!   unavailable and says why.
//! - **streams** are ordered sequences of submissions on the device's one queue, with host
//!   tasks and waits held back in stream order by a worker thread (see `stream.rs`).
//! - **events** are submission numbers, completed through `Queue::on_submitted_work_done`
//!   and `Device::poll`. Record, query, synchronize, wait and notify are real; elapsed and
//!   completion times use timestamp queries where the adapter has
//!   `Features::TIMESTAMP_QUERY`, and are refused (naming the call and the feature) where not.
//! - **graphs** capture host tasks and GPU operations and encode them again at each replay.
//! - **memory**: segments are `wgpu::Buffer`s at accelrt's own addresses ([`WgpuMemory`]);
//!   there is no virtual memory in wgpu, so the allocator uses plain segments. Buffers are
//!   not host-visible (wgpu forbids using a mapped buffer on the GPU): `shared_host_ptr` is
//!   refused as on CUDA, scalar buffers are written in stream order, and the host reads and
//!   writes device memory through a stream ([`WgpuDriver::read`], [`WgpuDriver::write`]).
//!
//! ```no_run
//! use accelrt::{Backend, StreamPriority};
//!
//! let wgpu = accelrt_wgpu::register().unwrap();
//! let stream = wgpu.new_stream(0, StreamPriority::Normal).unwrap();
//! let a = wgpu.allocator(0).unwrap();
//! let p = a.raw_alloc(4096, stream).unwrap();
//! let bytes = wgpu
//!     .with_stream(stream, |driver, s| {
//!         driver.fill(s, p, 4096, 0xdead_beef)?;
//!         driver.read(s, p, 8)
//!     })
//!     .unwrap();
//! assert_eq!(bytes, [0xef, 0xbe, 0xad, 0xde, 0xef, 0xbe, 0xad, 0xde]);
//! a.raw_free(p).unwrap();
//! ```

mod adapter;
mod device;
mod driver;
mod event;
mod kernels;
mod memory;
mod stream;

use std::sync::OnceLock;

use accelrt::runtime::Runtime;
use accelrt::{DeviceType, Result};

pub use adapter::MemoryFigures;
pub use device::pipelines::pattern_word;
pub use driver::{WgpuDriver, WgpuGraph, ENV_VARS, WGPU_VERSION};
pub use event::WgpuEvent;
pub use memory::{WgpuMemory, ADDRESS_GRANULARITY};
pub use stream::WgpuStream;
/// The wgpu this crate is built with, for work of your own on its devices.
pub use wgpu;

/// The name the backend registers under.
pub const NAME: &str = "wgpu";

/// Its device type.
pub const KIND: DeviceType = DeviceType::custom(NAME);

/// The registered backend.
pub type WgpuBackend = Runtime<WgpuDriver>;

/// Register the wgpu backend with accelrt (idempotent: later calls return the same one).
/// Adapters are looked for and opened on first use.
pub fn register() -> Result<&'static WgpuBackend> {
    static RUNTIME: OnceLock<&'static WgpuBackend> = OnceLock::new();
    let runtime = *RUNTIME.get_or_init(|| Box::leak(Box::new(Runtime::new())));
    accelrt::registry::register(runtime)?;
    Ok(runtime)
}
