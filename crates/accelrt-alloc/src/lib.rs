//! The caching device allocator.
//!
//! See `ARCHITECTURE.md` ("alloc") for the design; `caching.rs` and `caching/` hold the caching
//! allocator itself ([`CachingAllocator`]).
//! Also here: the plain device, stream and graph id types the allocator names, and
//! [`HostMemory`], the host memory provider (the host backend's device memory, and the
//! simulated device replays run on). No backend, no runtime: `accelrt` builds those on top.

mod bytes;
mod caching;
pub mod callbacks;
mod check;
mod chunks;
mod clock;
mod config;
pub mod deferred;
pub mod device;
mod device_type;
pub mod error;
mod free_node;
pub mod graph;
mod history;
pub mod host;
mod interface;
#[cfg(all(test, accelrt_loom))]
mod models;
mod pagemap;
mod pinned;
mod pool;
mod pool_lock;
mod provider;
mod size;
#[doc(hidden)]
pub mod splitmix;
mod stats;
pub mod stream;
mod tlsf;

pub use device::{BackendName, Device, DeviceProperties, DeviceType};
pub use error::{AllocError, BackendError, OomReport, Result};
pub use graph::{GraphId, MempoolId};
pub use host::HostMemory;
pub use stream::{Stream, StreamPriority};

pub use bytes::format_size;
pub use caching::{
    Buffer, CachingAllocator, CheckpointBlock, CheckpointSegment, ExportedChunk, ExportedRange,
    ImportedRange, OomInfo, OomObserver, PoolCheckpoint, RestoreReport, StreamFilter,
    MAX_PRIVATE_POOLS, MAX_STREAM_POOLS,
};
pub use callbacks::{AllocatorCallback, AllocatorEvent, CallbackId};
pub use clock::Clock;
pub use config::{
    AllocatorConfig, ALLOC_CONF_ENV, DEFAULT_CHUNK_DIV, MAX_CONF_LEN, ROUNDUP_INTERVALS,
};
pub use deferred::{Deferred, KeptError};
pub use history::{
    set_thread_context, thread_context, BlockInfo, BlockStatus, Frame, Frames, HistoryConfig,
    MemorySnapshot, SegmentInfo, TraceAction, TraceEntry,
};
pub use interface::DeviceAllocator;
pub use pinned::{PinnedAllocator, PinnedStats};
pub use pool::QUIET_TICKS;
pub use provider::{ChunkHandle, MemoryProvider, ProviderError, StreamEvents, VirtualMemory};
pub use size::{round_size, segment_size, MAX_REQUEST, MIN_BLOCK};
pub use stats::{
    DriverCalls, EventCounters, MemoryStats, PeakBreakdown, PoolKind, PoolStats, Stat,
};
