//! Host "device memory": anonymous private mappings for plain segments, and a faithful
//! analogue of CUDA's virtual memory management for expandable segments.
//!
//! Segments are `mmap`ed with `MAP_NORESERVE`, so pages cost nothing until touched: a
//! replay of a 15 GB training trace reserves 15 GB of address space, not of RAM. A
//! capacity makes the host device as small as asked, so out-of-memory is real and testable.
//!
//! Virtual memory (Linux): a chunk is a range of a memory file (`memfd_create`), as a CUDA
//! physical allocation is a piece of device memory. `reserve` makes a `PROT_NONE` range;
//! `map` maps a chunk's file range there (`MAP_SHARED | MAP_FIXED`), so the same chunk mapped
//! at two places shows the same bytes, exactly as on CUDA; `unmap` puts the reservation back
//! over the range; `release` punches the range out of the file, which returns its memory.
//! A kernel still touching an unmapped range faults, as a GPU kernel would: tests catch an
//! allocator that unmaps too early. Elsewhere than Linux, the host has no virtual memory and
//! the allocator uses plain segments.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use parking_lot::Mutex;

use crate::{ChunkHandle, MemoryProvider, ProviderError, VirtualMemory};

/// Default granularity of expandable segments: CUDA's.
pub const HOST_PAGE_SIZE: usize = 2 << 20;

/// Host memory provider with a byte capacity.
#[derive(Debug)]
pub struct HostMemory {
    capacity: u64,
    used: AtomicU64,
    granularity: usize,
    /// The memory file behind chunks, made on first use; `Err` says why there is none.
    file: OnceLock<std::result::Result<MemFile, String>>,
}

/// A memory file and which of its ranges hold chunks.
#[derive(Debug)]
struct MemFile {
    fd: std::os::fd::OwnedFd,
    space: Mutex<FileSpace>,
}

/// Free ranges of the file (offset -> length) and its end; the file is sparse, so ranges
/// cost nothing until written.
#[derive(Debug, Default)]
struct FileSpace {
    free: BTreeMap<u64, u64>,
    end: u64,
}

impl FileSpace {
    /// A range of `len` bytes: first fit among freed ranges, else at the end.
    fn take(&mut self, len: u64) -> (u64, bool) {
        let fit = self
            .free
            .iter()
            .find(|(_, &l)| l >= len)
            .map(|(&o, &l)| (o, l));
        if let Some((off, l)) = fit {
            self.free.remove(&off);
            if l > len {
                self.free.insert(off + len, l - len);
            }
            return (off, false);
        }
        let off = self.end;
        self.end += len;
        (off, true)
    }

    /// Give a range back, joining it with free neighbours.
    fn give(&mut self, mut off: u64, mut len: u64) {
        if let Some((&prev, &plen)) = self.free.range(..off).next_back() {
            if prev + plen == off {
                self.free.remove(&prev);
                off = prev;
                len += plen;
            }
        }
        if let Some(&nlen) = self.free.get(&(off + len)) {
            self.free.remove(&(off + len));
            len += nlen;
        }
        if off + len == self.end {
            self.end = off;
        } else {
            self.free.insert(off, len);
        }
    }
}

impl HostMemory {
    /// A provider that refuses to hold more than `capacity` bytes at once.
    pub fn new(capacity: u64) -> Self {
        Self::with_page_size(capacity, HOST_PAGE_SIZE)
    }

    /// Like [`HostMemory::new`], with virtual-memory granularity `page_size` (a power of
    /// two, at least the OS page size).
    pub fn with_page_size(capacity: u64, page_size: usize) -> Self {
        assert!(
            page_size.is_power_of_two() && page_size >= 4096,
            "page size {page_size} must be a power of two >= 4096"
        );
        HostMemory {
            capacity,
            used: AtomicU64::new(0),
            granularity: page_size,
            file: OnceLock::new(),
        }
    }

    fn take_capacity(&self, bytes: u64) -> Result<(), ProviderError> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let next = cur
                .checked_add(bytes)
                .filter(|&n| n <= self.capacity)
                .ok_or(ProviderError::OutOfMemory)?;
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }

    /// A provider as large as the machine's physical memory.
    pub fn with_default_capacity() -> Self {
        Self::new(physical_memory())
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn file(&self) -> std::result::Result<&MemFile, &str> {
        self.file
            .get_or_init(MemFile::create)
            .as_ref()
            .map_err(|e| e.as_str())
    }
}

impl MemFile {
    #[cfg(target_os = "linux")]
    fn create() -> std::result::Result<MemFile, String> {
        use std::os::fd::FromRawFd;
        // SAFETY: the name is a NUL-terminated literal; the result is checked below.
        let fd =
            unsafe { libc::memfd_create(c"accelrt-device-memory".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!(
                "memfd_create failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(MemFile {
            // SAFETY: `fd` was just created and is owned by nobody else.
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
            space: Mutex::new(FileSpace::default()),
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn create() -> std::result::Result<MemFile, String> {
        Err("the host backend's virtual memory needs Linux's memfd_create".into())
    }

    fn raw(&self) -> libc::c_int {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }
}

/// Physical memory of this machine in bytes (8 GiB if the OS will not say).
pub fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads system configuration values; no pointers are involved.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && page_size > 0 {
        pages as u64 * page_size as u64
    } else {
        8 << 30
    }
}

impl MemoryProvider for HostMemory {
    fn allocate(&self, size: usize) -> Result<usize, ProviderError> {
        if size == 0 {
            return Err(ProviderError::Failed(
                "a segment of 0 bytes was requested".into(),
            ));
        }
        let size64 = size as u64;
        self.take_capacity(size64)?;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches
        // no existing memory; the result is checked against MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            self.used.fetch_sub(size64, Ordering::Relaxed);
            let err = std::io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::ENOMEM) {
                ProviderError::OutOfMemory
            } else {
                ProviderError::Failed(format!("mmap of {size} bytes: {err}"))
            });
        }
        Ok(ptr as usize)
    }

    unsafe fn free(&self, ptr: usize, size: usize) {
        // SAFETY: the caller guarantees (ptr, size) is one live mapping from `allocate`.
        let rc = unsafe { libc::munmap(ptr as *mut libc::c_void, size) };
        debug_assert_eq!(
            rc,
            0,
            "munmap({ptr:#x}, {size}) failed: {}",
            std::io::Error::last_os_error()
        );
        self.used.fetch_sub(size as u64, Ordering::Relaxed);
    }

    fn memory_info(&self) -> (u64, u64) {
        let used = self.used.load(Ordering::Relaxed);
        (self.capacity.saturating_sub(used), self.capacity)
    }

    fn host_visible(&self) -> bool {
        true
    }

    fn driver_allocated(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn virtual_memory(&self) -> Option<&dyn VirtualMemory> {
        self.file().is_ok().then_some(self as &dyn VirtualMemory)
    }
}

fn os_error(what: &str) -> ProviderError {
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOMEM) {
        return ProviderError::OutOfMemory;
    }
    ProviderError::Failed(format!("{what}: {err}"))
}

/// Put a `PROT_NONE` reservation over `[addr, addr + len)`, replacing whatever was mapped.
///
/// # Safety
/// The range must lie in a reservation of this provider and nothing may use it any more.
unsafe fn reserve_over(addr: usize, len: usize) -> bool {
    // SAFETY: MAP_FIXED over a range of our own reservation (the caller's promise) replaces
    // only our mappings there.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    p != libc::MAP_FAILED
}

impl VirtualMemory for HostMemory {
    fn granularity(&self) -> usize {
        self.granularity
    }

    fn reserve(&self, size: usize) -> Result<usize, ProviderError> {
        let align = self.granularity;
        let span = size.checked_add(align).ok_or(ProviderError::OutOfMemory)?;
        // SAFETY: a fresh PROT_NONE private mapping at an address of the kernel's choosing;
        // checked against MAP_FAILED.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(os_error("reserving address space"));
        }
        // Trim to an aligned range of exactly `size` bytes.
        let start = raw as usize;
        let base = (start + align - 1) & !(align - 1);
        let (head, tail) = (base - start, span - (base - start) - size);
        // SAFETY: both trims lie inside the mapping just made and nothing uses them.
        unsafe {
            if head > 0 {
                libc::munmap(start as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((base + size) as *mut libc::c_void, tail);
            }
        }
        Ok(base)
    }

    unsafe fn unreserve(&self, base: usize, size: usize) {
        // SAFETY: the caller passes one range from `reserve`, with nothing mapped in it.
        unsafe { libc::munmap(base as *mut libc::c_void, size) };
    }

    fn create(&self, size: usize) -> Result<ChunkHandle, ProviderError> {
        if size == 0 || size % self.granularity != 0 {
            return Err(ProviderError::Failed(format!(
                "a chunk of {size} bytes is not a positive multiple of the {} byte granularity",
                self.granularity
            )));
        }
        let file = self
            .file()
            .map_err(|e| ProviderError::Failed(e.to_string()))?;
        self.take_capacity(size as u64)?;
        let mut space = file.space.lock();
        let (off, grew) = space.take(size as u64);
        if grew {
            // SAFETY: growing our own memory file; the file stays sparse.
            let rc = unsafe { libc::ftruncate(file.raw(), space.end as libc::off_t) };
            if rc != 0 {
                let e = os_error("growing the memory file");
                space.give(off, size as u64);
                self.used.fetch_sub(size as u64, Ordering::Relaxed);
                return Err(e);
            }
        }
        Ok(ChunkHandle(off))
    }

    unsafe fn release(&self, chunk: ChunkHandle, size: usize) {
        if let Ok(file) = self.file() {
            // SAFETY: the range is this chunk's, mapped nowhere (the caller's promise):
            // punching it out of the file frees its memory and touches nothing else.
            unsafe {
                libc::fallocate(
                    file.raw(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    chunk.0 as libc::off_t,
                    size as libc::off_t,
                );
            }
            file.space.lock().give(chunk.0, size as u64);
        }
        self.used.fetch_sub(size as u64, Ordering::Relaxed);
    }

    unsafe fn map(
        &self,
        addr: usize,
        chunks: &[(ChunkHandle, usize)],
    ) -> Result<(), ProviderError> {
        let file = self
            .file()
            .map_err(|e| ProviderError::Failed(e.to_string()))?;
        let mut at = addr;
        for &(chunk, len) in chunks {
            // SAFETY: `[at, at + len)` is an unmapped part of our reservation (the caller's
            // promise); mapping the chunk's file range there replaces only the reservation.
            let p = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    file.raw(),
                    chunk.0 as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                let e = os_error("mapping a chunk");
                // SAFETY: what was mapped above is ours and unused yet.
                unsafe { reserve_over(addr, at - addr) };
                return Err(e);
            }
            at += len;
        }
        Ok(())
    }

    unsafe fn unmap(&self, addr: usize, len: usize) {
        // SAFETY: the range is ours and idle (the caller's promise).
        let ok = unsafe { reserve_over(addr, len) };
        debug_assert!(
            ok,
            "unmapping {len} bytes at {addr:#x} failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_enforced_and_memory_is_usable() {
        let m = HostMemory::new(4 << 20);
        let a = m.allocate(2 << 20).unwrap();
        let b = m.allocate(2 << 20).unwrap();
        assert_eq!(m.allocate(512), Err(ProviderError::OutOfMemory));
        assert_eq!(m.memory_info(), (0, 4 << 20));
        // SAFETY: `a` is a fresh 2 MiB read-write mapping owned by this test.
        unsafe {
            std::ptr::write_bytes(a as *mut u8, 0xAB, 2 << 20);
            assert_eq!(*((a + 12345) as *const u8), 0xAB);
            m.free(a, 2 << 20);
            m.free(b, 2 << 20);
        }
        assert_eq!(m.driver_allocated(), 0);
        assert!(matches!(m.allocate(0), Err(ProviderError::Failed(_))));
    }

    #[test]
    fn chunks_alias_across_mappings_and_are_counted() {
        let m = HostMemory::new(8 << 20);
        let vm = m.virtual_memory().expect("Linux has memfd");
        let p = vm.granularity();
        let base = vm.reserve(4 * p).unwrap();
        assert_eq!(base % p, 0);
        let a = vm.create(p).unwrap();
        let b = vm.create(p).unwrap();
        assert_ne!(a, b);
        assert_eq!(m.driver_allocated(), 2 * p as u64);
        // SAFETY: the slots are in our reservation, unmapped, and used only by this test.
        unsafe {
            vm.map(base + 2 * p, &[(a, p), (b, p)]).unwrap();
            std::ptr::write_bytes((base + 2 * p) as *mut u8, 0x5A, 2 * p);
            // The same chunk at a second place shows the same bytes.
            vm.map(base, &[(b, p)]).unwrap();
            assert_eq!(*((base + 7) as *const u8), 0x5A);
            *(base as *mut u8) = 0x11;
            assert_eq!(*((base + 3 * p) as *const u8), 0x11);
            vm.unmap(base + 2 * p, 2 * p);
            vm.unmap(base, p);
            vm.release(a, p);
            vm.release(b, p);
            vm.unreserve(base, 4 * p);
        }
        assert_eq!(m.driver_allocated(), 0);
        // Capacity counts chunks: 8 MiB holds four 2 MiB chunks, not five.
        let chunks: Vec<_> = (0..4).map(|_| vm.create(p).unwrap()).collect();
        assert_eq!(vm.create(p), Err(ProviderError::OutOfMemory));
        for c in chunks {
            // SAFETY: never mapped.
            unsafe { vm.release(c, p) };
        }
        // Released file space is reused.
        let again = vm.create(4 * p).unwrap();
        assert_eq!(again, ChunkHandle(0));
        // SAFETY: never mapped.
        unsafe { vm.release(again, 4 * p) };
    }

    #[test]
    fn file_space_reuses_and_joins_ranges() {
        let mut s = FileSpace::default();
        assert_eq!(s.take(10), (0, true));
        assert_eq!(s.take(20), (10, true));
        assert_eq!(s.take(5), (30, true));
        s.give(0, 10);
        assert_eq!(s.take(4), (0, false), "first fit in a freed range");
        s.give(10, 20);
        s.give(0, 4);
        assert_eq!(s.free.get(&0), Some(&30), "neighbours join");
        s.give(30, 5);
        assert_eq!(s.end, 0, "everything free: the end moves back");
        assert!(s.free.is_empty());
    }
}
