//! Memory providers: device memory through `cuMemAlloc` (with the virtual-memory operations
//! expandable segments use), and page-locked host memory through `cuMemHostAlloc`.

use std::ffi::c_int;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::context::Context;
use super::sys::{self, CuError};
use crate::alloc::{ChunkHandle, MemoryProvider, ProviderError, VirtualMemory};
use crate::error::DeviceResult;

/// Minimum alignment the allocator needs from a segment.
const SEGMENT_ALIGN: usize = 512;

fn provider_error(e: CuError) -> ProviderError {
    if e.is_out_of_memory() {
        ProviderError::OutOfMemory
    } else {
        ProviderError::Driver {
            code: e.code as i32,
            message: e.into_error().to_string(),
        }
    }
}

/// Device memory of one GPU for its caching allocator.
pub struct CudaMemory {
    ctx: Arc<Context>,
    total: u64,
    allocated: AtomicU64,
    /// Granularity of the virtual-memory API (0: unsupported on this device).
    page_size: usize,
    /// Devices that get read-write access to mapped pages (this one, then peers).
    access: RwLock<Vec<c_int>>,
    /// Whether chunks are created exportable to other processes (see [`Sharing`]).
    sharing: Mutex<Sharing>,
}

/// Chunks are created exportable as POSIX file descriptors (so `torch.multiprocessing` can
/// share expandable memory) unless `ACCELRT_VMM_SHAREABLE=0`, or the driver refused it once:
/// then plain chunks, and exports say why.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sharing {
    Untried,
    On,
    Off(String),
}

/// The variable that turns shareable chunks off (`0`).
pub const VMM_SHAREABLE_ENV: &str = "ACCELRT_VMM_SHAREABLE";

impl std::fmt::Debug for CudaMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaMemory")
            .field("device", &self.ctx.ordinal)
            .field("total", &self.total)
            .field("allocated", &self.allocated.load(Ordering::Relaxed))
            .field("page_size", &self.page_size)
            .finish()
    }
}

impl CudaMemory {
    pub(crate) fn new(ctx: Arc<Context>) -> DeviceResult<CudaMemory> {
        let total = sys::device_total_mem(ctx.dev)? as u64;
        let vmm = sys::device_attribute(
            ctx.dev,
            sys::Attr::CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED,
        )? != 0;
        let page_size = if vmm {
            sys::mem_granularity(ctx.ordinal as c_int)?
        } else {
            0
        };
        Ok(CudaMemory {
            access: RwLock::new(vec![ctx.ordinal as c_int]),
            sharing: Mutex::new(
                if std::env::var(VMM_SHAREABLE_ENV).is_ok_and(|v| v == "0") {
                    Sharing::Off(format!(
                        "{VMM_SHAREABLE_ENV}=0 turned shareable chunks off in this process"
                    ))
                } else {
                    Sharing::Untried
                },
            ),
            ctx,
            total,
            allocated: AtomicU64::new(0),
            page_size,
        })
    }

    /// The device this memory belongs to.
    pub fn device(&self) -> u32 {
        self.ctx.ordinal
    }

    /// Let `peer` read and write pages mapped from now on (after `enable_peer_access`).
    pub(crate) fn grant_peer(&self, peer: u32) {
        let mut access = self.access.write();
        if !access.contains(&(peer as c_int)) {
            access.push(peer as c_int);
        }
    }

    fn bind(&self) -> Result<super::context::CurrentGuard, ProviderError> {
        self.ctx
            .bind()
            .map_err(|e| ProviderError::Failed(e.to_string()))
    }
}

impl MemoryProvider for CudaMemory {
    fn allocate(&self, size: usize) -> Result<usize, ProviderError> {
        if size == 0 {
            return Err(ProviderError::Failed(
                "a segment of 0 bytes was requested".into(),
            ));
        }
        let _current = self.bind()?;
        let ptr = sys::mem_alloc(size).map_err(provider_error)? as usize;
        if ptr % SEGMENT_ALIGN != 0 {
            // SAFETY: `ptr` is the allocation just made, unused by anyone.
            if let Err(e) = unsafe { sys::mem_free(ptr as sys::CUdeviceptr) } {
                self.ctx.deferred.keep(e.into_error());
            }
            return Err(ProviderError::Failed(format!(
                "cuMemAlloc returned {ptr:#x} for {size} bytes, not {SEGMENT_ALIGN}-byte aligned"
            )));
        }
        self.allocated.fetch_add(size as u64, Ordering::Relaxed);
        Ok(ptr)
    }

    unsafe fn free(&self, ptr: usize, size: usize) {
        let freed = self.ctx.bind().and_then(|_current| {
            // SAFETY: the caller guarantees (ptr, size) is one live allocation of ours that
            // nothing uses any more.
            Ok(unsafe { sys::mem_free(ptr as sys::CUdeviceptr) }?)
        });
        match freed {
            Ok(()) => {
                self.allocated.fetch_sub(size as u64, Ordering::Relaxed);
            }
            Err(e) => self.ctx.deferred.keep(e),
        }
    }

    fn memory_info(&self) -> (u64, u64) {
        let info = self
            .ctx
            .bind()
            .and_then(|_current| Ok(sys::mem_get_info()?));
        match info {
            Ok((free, total)) => (free as u64, total as u64),
            Err(_) => (0, self.total),
        }
    }

    fn recommended_max(&self) -> u64 {
        // The working set the device could hold when accelrt opened it (the hooks report the
        // same figure), so watermark ratios leave room for other users of the device.
        self.ctx.free_at_open
    }

    fn host_visible(&self) -> bool {
        false
    }

    fn driver_allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    fn virtual_memory(&self) -> Option<&dyn VirtualMemory> {
        (self.page_size > 0).then_some(self as &dyn VirtualMemory)
    }
}

impl VirtualMemory for CudaMemory {
    fn granularity(&self) -> usize {
        self.page_size
    }

    fn export_chunk(&self, chunk: ChunkHandle) -> Result<OwnedFd, ProviderError> {
        if let Sharing::Off(why) = &*self.sharing.lock() {
            return Err(ProviderError::Failed(format!(
                "cannot export memory of cuda:{}: {why}",
                self.ctx.ordinal
            )));
        }
        if let Some(why) = sys::ipc_symbols_missing() {
            return Err(ProviderError::Failed(why));
        }
        let _current = self.bind()?;
        let fd = sys::mem_export_fd(chunk.0).map_err(provider_error)?;
        if fd < 0 {
            return Err(ProviderError::Failed(format!(
                "cuMemExportToShareableHandle returned descriptor {fd}"
            )));
        }
        // SAFETY: the driver just created this descriptor for us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn import_chunk(&self, fd: OwnedFd, size: usize) -> Result<ChunkHandle, ProviderError> {
        if size == 0 || size % self.page_size != 0 {
            return Err(ProviderError::Failed(format!(
                "an imported chunk of {size} bytes is not a positive multiple of the device's \
                 {} byte granularity",
                self.page_size
            )));
        }
        if let Some(why) = sys::ipc_symbols_missing() {
            return Err(ProviderError::Failed(why));
        }
        let _current = self.bind()?;
        // The driver keeps its own reference: the descriptor closes when `fd` drops.
        let h = sys::mem_import_fd(fd.as_raw_fd()).map_err(provider_error)?;
        // Counted while imported, as `release` subtracts it.
        self.allocated.fetch_add(size as u64, Ordering::Relaxed);
        Ok(ChunkHandle(h))
    }

    fn reserve(&self, size: usize) -> Result<usize, ProviderError> {
        if size == 0 || size % self.page_size != 0 {
            return Err(ProviderError::Failed(format!(
                "cannot reserve {size} bytes of address space: not a positive multiple of the \
                 granularity ({} bytes)",
                self.page_size
            )));
        }
        let _current = self.bind()?;
        sys::mem_address_reserve(size, self.page_size)
            .map(|p| p as usize)
            .map_err(provider_error)
    }

    unsafe fn unreserve(&self, base: usize, size: usize) {
        // SAFETY: the caller guarantees (base, size) is one reservation of ours with nothing
        // mapped in it.
        if let Err(e) = unsafe { sys::mem_address_free(base as sys::CUdeviceptr, size) } {
            self.ctx.deferred.keep(e.into_error());
        }
    }

    fn create(&self, size: usize) -> Result<ChunkHandle, ProviderError> {
        if size == 0 || size % self.page_size != 0 {
            return Err(ProviderError::Failed(format!(
                "a chunk of {size} bytes is not a positive multiple of the device's {} byte \
                 granularity",
                self.page_size
            )));
        }
        let _current = self.bind()?;
        let ordinal = self.ctx.ordinal as c_int;
        let share = !matches!(*self.sharing.lock(), Sharing::Off(_));
        let h = if share {
            match sys::mem_create_shareable(size, ordinal) {
                Ok(h) => {
                    *self.sharing.lock() = Sharing::On;
                    h
                }
                Err(e) if e.is_out_of_memory() => return Err(provider_error(e)),
                Err(e) => {
                    // Some drivers and containers refuse POSIX-descriptor handles: fall back
                    // to plain chunks for good, and say why when an export is asked for.
                    *self.sharing.lock() = Sharing::Off(format!(
                        "the driver refused to create shareable chunks ({}); memory is not \
                         exportable in this process",
                        e.into_error()
                    ));
                    sys::mem_create(size, ordinal).map_err(provider_error)?
                }
            }
        } else {
            sys::mem_create(size, ordinal).map_err(provider_error)?
        };
        self.allocated.fetch_add(size as u64, Ordering::Relaxed);
        Ok(ChunkHandle(h))
    }

    unsafe fn release(&self, chunk: ChunkHandle, size: usize) {
        // SAFETY: the caller guarantees the chunk is ours and mapped nowhere.
        match unsafe { sys::mem_release(chunk.0) } {
            Ok(()) => {
                self.allocated.fetch_sub(size as u64, Ordering::Relaxed);
            }
            Err(e) => self.ctx.deferred.keep(e.into_error()),
        }
    }

    unsafe fn map(
        &self,
        addr: usize,
        chunks: &[(ChunkHandle, usize)],
    ) -> Result<(), ProviderError> {
        let _current = self.bind()?;
        let mut at = addr;
        for &(chunk, len) in chunks {
            // SAFETY: the caller guarantees the range is reserved, aligned and unmapped, and
            // that the chunk is live; a handle is mapped whole (offset 0, its full size).
            if let Err(e) = unsafe { sys::mem_map(at as sys::CUdeviceptr, len, chunk.0) } {
                if at > addr {
                    // SAFETY: `[addr, at)` was mapped just now, by us, and is unused yet.
                    unsafe { self.unmap(addr, at - addr) };
                }
                return Err(provider_error(e));
            }
            at += len;
        }
        let access = self.access.read().clone();
        // One call for the whole range.
        // SAFETY: the whole range was mapped above, by us.
        let set = unsafe { sys::mem_set_access(addr as sys::CUdeviceptr, at - addr, &access) };
        if let Err(e) = set {
            // SAFETY: all chunks were mapped just now, by us, and are unused yet.
            unsafe { self.unmap(addr, at - addr) };
            return Err(provider_error(e));
        }
        Ok(())
    }

    unsafe fn unmap(&self, addr: usize, len: usize) {
        let unmapped = self.ctx.bind().and_then(|_current| {
            // SAFETY: the caller guarantees the range is covered by whole mappings of ours
            // that no work in flight uses; one call unmaps them all.
            Ok(unsafe { sys::mem_unmap(addr as sys::CUdeviceptr, len) }?)
        });
        if let Err(e) = unmapped {
            self.ctx.deferred.keep(e);
        }
    }
}

/// Page-locked (pinned) host memory, for the pinned-memory allocator: fast, asynchronous
/// copies to and from every device.
pub struct PinnedMemory {
    ctx: Arc<Context>,
    allocated: AtomicU64,
}

impl std::fmt::Debug for PinnedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedMemory")
            .field("allocated", &self.allocated.load(Ordering::Relaxed))
            .finish()
    }
}

impl PinnedMemory {
    pub(crate) fn new(ctx: Arc<Context>) -> PinnedMemory {
        PinnedMemory {
            ctx,
            allocated: AtomicU64::new(0),
        }
    }
}

/// (available, total) bytes of host RAM.
fn host_memory() -> (u64, u64) {
    // SAFETY: sysconf only reads system configuration values.
    let (avail, total, page) = unsafe {
        (
            libc::sysconf(libc::_SC_AVPHYS_PAGES),
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if avail < 0 || total <= 0 || page <= 0 {
        return (0, 8 << 30);
    }
    (avail as u64 * page as u64, total as u64 * page as u64)
}

impl MemoryProvider for PinnedMemory {
    fn allocate(&self, size: usize) -> Result<usize, ProviderError> {
        if size == 0 {
            return Err(ProviderError::Failed(
                "a segment of 0 bytes was requested".into(),
            ));
        }
        let _current = self
            .ctx
            .bind()
            .map_err(|e| ProviderError::Failed(e.to_string()))?;
        let ptr = sys::mem_host_alloc(size).map_err(provider_error)? as usize;
        self.allocated.fetch_add(size as u64, Ordering::Relaxed);
        Ok(ptr)
    }

    unsafe fn free(&self, ptr: usize, size: usize) {
        // SAFETY: the caller guarantees `ptr` is one live allocation of ours, unused now.
        match unsafe { sys::mem_free_host(ptr as *mut std::ffi::c_void) } {
            Ok(()) => {
                self.allocated.fetch_sub(size as u64, Ordering::Relaxed);
            }
            Err(e) => self.ctx.deferred.keep(e.into_error()),
        }
    }

    fn memory_info(&self) -> (u64, u64) {
        host_memory()
    }

    fn host_visible(&self) -> bool {
        true
    }

    fn driver_allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }
}
