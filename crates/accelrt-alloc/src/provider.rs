//! What the caching allocator needs from a backend: raw segments of device memory
//! ([`MemoryProvider`]) and positions in streams ([`StreamEvents`]).
//!
//! Both are called on the slow path only (new segments, releases, cross-stream frees).

use crate::error::Result;
use crate::stream::Stream;

/// Why a provider could not hand out a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderError {
    /// The device has no room; the allocator may release its cache and retry.
    OutOfMemory,
    /// Anything else: not retried.
    Failed(String),
    /// A driver call failed with this result code (CUDA's `CUresult`): not retried. The
    /// message names the call and the code; the allocator's error keeps the code.
    Driver { code: i32, message: String },
}

impl ProviderError {
    /// The words and, for a driver failure, its result code.
    pub fn into_parts(self) -> (String, Option<i32>) {
        match self {
            ProviderError::OutOfMemory => ("out of memory".into(), None),
            ProviderError::Failed(message) => (message, None),
            ProviderError::Driver { code, message } => (message, Some(code)),
        }
    }
}

/// A provider's refusal as words, for messages (never its debug form).
impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProviderError::OutOfMemory => f.write_str("out of memory"),
            ProviderError::Failed(message) | ProviderError::Driver { message, .. } => {
                f.write_str(message)
            }
        }
    }
}

impl std::error::Error for ProviderError {}

/// Raw device memory: a backend hands out and takes back whole segments.
pub trait MemoryProvider: Send + Sync {
    /// Allocate a segment of exactly `size` bytes (a multiple of 512), aligned to at least 512.
    fn allocate(&self, size: usize) -> Result<usize, ProviderError>;
    /// Give a segment back.
    ///
    /// # Safety
    /// `ptr` and `size` must come from one earlier successful `allocate` of this provider,
    /// not yet freed, and no live reference into the segment may remain.
    unsafe fn free(&self, ptr: usize, size: usize);
    /// (free, total) bytes of the device as the provider sees it.
    fn memory_info(&self) -> (u64, u64);
    /// The working set the device recommends; the high watermark is a ratio of this.
    fn recommended_max(&self) -> u64 {
        self.memory_info().1
    }
    /// Whether the host can read and write this memory directly.
    fn host_visible(&self) -> bool;
    /// Bytes currently held from the device through this provider.
    fn driver_allocated(&self) -> u64;
    /// Virtual-memory operations, for expandable segments; `None` when unsupported.
    fn virtual_memory(&self) -> Option<&dyn VirtualMemory> {
        None
    }
}

/// A handle to one physical allocation of device memory, a *chunk* (CUDA: a
/// `CUmemGenericAllocationHandle`; host: a range of a memory file). A chunk is a whole number
/// of granules and is always mapped whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkHandle(pub u64);

/// Virtual-memory operations: reserve address ranges, create physical chunks, and map them.
///
/// The costs that shape the allocator (H200, driver 580; `ANCHORS.md`): creating a chunk is
/// 15 us for 2 MiB and 40 us for 128 MiB; mapping is about 4 us per chunk; granting access is
/// about 34 us per chunk in the range; unmapping about 22 us per chunk. So the allocator
/// creates few, large chunks and keeps them mapped where they are used.
///
/// One chunk may be mapped at several address ranges at once (the allocator maps a chunk at
/// its new place before the old place is unmapped, so work still queued on the old addresses
/// finishes undisturbed); every mapping of a chunk shows the same bytes.
pub trait VirtualMemory: Send + Sync {
    /// The granularity of chunks and mappings (2 MiB on CUDA): sizes and mapping addresses
    /// are multiples of it.
    fn granularity(&self) -> usize;
    /// Reserve `size` bytes of address space (a multiple of the granularity); no memory.
    fn reserve(&self, size: usize) -> Result<usize, ProviderError>;
    /// Give back an address range from `reserve`.
    ///
    /// # Safety
    /// `(base, size)` must be one earlier `reserve`, with nothing mapped in it any more.
    unsafe fn unreserve(&self, base: usize, size: usize);
    /// Create one chunk of `size` bytes (a multiple of the granularity). Counts against the
    /// device's memory. One driver call.
    fn create(&self, size: usize) -> Result<ChunkHandle, ProviderError>;
    /// Destroy a chunk of `size` bytes. One driver call.
    ///
    /// # Safety
    /// The chunk must come from `create(size)` or `import_chunk(_, size)` of this provider
    /// and be mapped nowhere.
    unsafe fn release(&self, chunk: ChunkHandle, size: usize);
    /// Map `chunks` (handle, size) one after another from `addr`, then make the whole range
    /// readable and writable by the device. One driver map per chunk and one access grant for
    /// the range. On failure nothing stays mapped.
    ///
    /// # Safety
    /// `addr` must be aligned to the granularity inside a reserved range, the range the chunks
    /// cover must not be mapped, and every chunk must be live.
    unsafe fn map(&self, addr: usize, chunks: &[(ChunkHandle, usize)])
        -> Result<(), ProviderError>;
    /// Unmap `[addr, addr + len)`, a range covering whole mappings made by `map`: one driver
    /// call. The chunks stay alive.
    ///
    /// # Safety
    /// The range must be exactly covered by mappings from `map`, and nothing may use it any
    /// more (the device included: callers make sure the work queued on it has completed).
    unsafe fn unmap(&self, addr: usize, len: usize);
    /// Export a chunk as a POSIX file descriptor another process can import (sharing memory
    /// between processes; CUDA: `cuMemExportToShareableHandle`). The descriptor is the
    /// caller's; the chunk stays ours. Providers that cannot share memory refuse (the
    /// default), saying so.
    fn export_chunk(&self, chunk: ChunkHandle) -> Result<std::os::fd::OwnedFd, ProviderError> {
        let _ = chunk;
        Err(ProviderError::Failed(
            "this memory provider cannot export memory to other processes (sharing expandable \
             memory between processes needs the CUDA backend)"
                .into(),
        ))
    }
    /// Import a chunk of `size` bytes another process exported with `export_chunk` (the
    /// descriptor valid in this process, consumed). The handle maps like a created one and
    /// is given back with `release(handle, size)`. Providers that cannot share memory refuse
    /// (the default).
    fn import_chunk(
        &self,
        fd: std::os::fd::OwnedFd,
        size: usize,
    ) -> Result<ChunkHandle, ProviderError> {
        let _ = (fd, size);
        Err(ProviderError::Failed(
            "this memory provider cannot import memory from other processes (sharing \
             expandable memory between processes needs the CUDA backend)"
                .into(),
        ))
    }
}

/// Positions in streams, for blocks used on several streams (`record_stream`) and for
/// `record_events` / `wait_for_events`. The runtime implements it over its event pool.
pub trait StreamEvents: Send + Sync {
    /// Record a pooled event at the current end of `stream`; returns a ticket.
    fn record(&self, stream: Stream) -> Result<u64>;
    /// True once the stream has passed the recorded point.
    fn query(&self, ticket: u64) -> Result<bool>;
    /// Block the calling thread until the stream has passed the recorded point.
    fn synchronize(&self, ticket: u64) -> Result<()>;
    /// Make `stream` wait on the device until the recorded point has been passed: work
    /// queued on `stream` afterwards runs after it. The calling thread does not wait.
    fn wait(&self, stream: Stream, ticket: u64) -> Result<()>;
    /// Return the event to its pool.
    fn release(&self, ticket: u64);
    /// Block until every stream of `device` has passed all work queued so far. Used instead of
    /// an event on one stream where that stream may no longer exist (a wrapped external
    /// stream its owner destroyed): it names no stream.
    fn synchronize_device(&self, device: u32) -> Result<()>;
}

/// Copy host bytes into host-visible device memory (the default for providers whose memory
/// the host can address).
///
/// # Safety
/// `dst .. dst + src.len()` must lie inside a live segment of a host-visible provider and
/// must not be accessed concurrently.
pub(crate) unsafe fn copy_into_host_visible(dst: usize, src: &[u8]) {
    // SAFETY: the caller guarantees the destination range is valid, writable and unshared;
    // `src` is a distinct host slice, so the ranges cannot overlap.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) }
}
