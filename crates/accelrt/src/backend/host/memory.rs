//! Host "device memory": anonymous private mappings, and a real analogue of CUDA's virtual
//! memory management for expandable segments.
//!
//! Segments are `mmap`ed with `MAP_NORESERVE`, so pages cost nothing until touched: a
//! replay of a 15 GB training trace reserves 15 GB of address space, not of RAM. A
//! capacity makes the host device as small as asked, so out-of-memory is real and testable.
//!
//! Virtual memory (expandable segments) is commit and decommit over reserved address space:
//! `reserve` makes a `PROT_NONE` range; a page handle is a page's worth of the capacity (as a
//! CUDA physical allocation is a piece of device memory); `map` commits a run of slots
//! (`mprotect` read-write: adjacent runs merge into one kernel mapping, so heavy remapping does
//! not pile up mappings); `unmap` decommits (`MADV_DONTNEED`, which returns the memory, then
//! `PROT_NONE`). Unlike CUDA, contents do not travel with a handle; the allocator never reads
//! memory it has unmapped, so nothing depends on that.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::alloc::{MemoryProvider, PageHandle, ProviderError, VirtualMemory};

/// Default physical page size for expandable segments: CUDA's granularity.
pub const HOST_PAGE_SIZE: usize = 2 << 20;

/// Host memory provider with a byte capacity.
#[derive(Debug)]
pub struct HostMemory {
    capacity: u64,
    used: AtomicU64,
    page_size: usize,
    next_page: AtomicU64,
}

impl HostMemory {
    /// A provider that refuses to hold more than `capacity` bytes at once.
    pub fn new(capacity: u64) -> Self {
        Self::with_page_size(capacity, HOST_PAGE_SIZE)
    }

    /// Like [`HostMemory::new`], with virtual-memory pages of `page_size` bytes (a power of
    /// two, at least the OS page size).
    pub fn with_page_size(capacity: u64, page_size: usize) -> Self {
        assert!(
            page_size.is_power_of_two() && page_size >= 4096,
            "page size {page_size} must be a power of two >= 4096"
        );
        HostMemory {
            capacity,
            used: AtomicU64::new(0),
            page_size,
            next_page: AtomicU64::new(0),
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
        Some(self)
    }
}

fn os_error(what: &str) -> ProviderError {
    ProviderError::Failed(format!("{what}: {}", std::io::Error::last_os_error()))
}

impl VirtualMemory for HostMemory {
    fn page_size(&self) -> usize {
        self.page_size
    }

    fn reserve(&self, size: usize) -> Result<usize, ProviderError> {
        let align = self.page_size;
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
        // Trim to a page-aligned range of exactly `size` bytes.
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

    fn create_page(&self, size: usize) -> Result<PageHandle, ProviderError> {
        if size == 0 || size % self.page_size != 0 {
            return Err(ProviderError::Failed(format!(
                "a page of {size} bytes is not a multiple of the {} byte granularity",
                self.page_size
            )));
        }
        self.take_capacity(size as u64)?;
        Ok(PageHandle(self.next_page.fetch_add(1, Ordering::Relaxed)))
    }

    unsafe fn destroy_page(&self, _page: PageHandle, size: usize) {
        self.used.fetch_sub(size as u64, Ordering::Relaxed);
    }

    unsafe fn map(
        &self,
        addr: usize,
        pages: &[PageHandle],
        page_size: usize,
    ) -> Result<(), ProviderError> {
        // SAFETY: the range is page-aligned inside a reservation of this provider and not
        // mapped (the caller's promise): committing it touches no live memory.
        let rc = unsafe {
            libc::mprotect(
                addr as *mut libc::c_void,
                pages.len() * page_size,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if rc != 0 {
            return Err(os_error("committing pages"));
        }
        Ok(())
    }

    unsafe fn unmap(&self, addr: usize, count: usize, page_size: usize) {
        if count == 0 {
            return;
        }
        let len = count * page_size;
        // SAFETY: the range is mapped by `map` and idle (the caller's promise): dropping its
        // contents and access frees its memory and affects nothing else.
        unsafe {
            libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED);
            libc::mprotect(addr as *mut libc::c_void, len, libc::PROT_NONE);
        }
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
    fn committed_pages_are_usable_and_counted() {
        let m = HostMemory::new(8 << 20);
        let vm = m.virtual_memory().unwrap();
        let p = vm.page_size();
        let base = vm.reserve(4 * p).unwrap();
        assert_eq!(base % p, 0);
        let a = vm.create_page(p).unwrap();
        let b = vm.create_page(p).unwrap();
        assert_ne!(a, b);
        assert_eq!(m.driver_allocated(), 2 * p as u64);
        // SAFETY: the slots are in our reservation, unmapped, and used only by this test.
        unsafe {
            vm.map(base + 2 * p, &[a, b], p).unwrap();
            std::ptr::write_bytes((base + 2 * p) as *mut u8, 0x5A, 2 * p);
            assert_eq!(*((base + 3 * p + 7) as *const u8), 0x5A);
            vm.unmap(base + 2 * p, 2, p);
            // Remapped elsewhere, the page is fresh memory.
            vm.map(base, &[b], p).unwrap();
            assert_eq!(*((base + 7) as *const u8), 0);
            vm.unmap(base, 1, p);
            vm.destroy_page(a, p);
            vm.destroy_page(b, p);
            vm.unreserve(base, 4 * p);
        }
        assert_eq!(m.driver_allocated(), 0);
        // Capacity counts pages: 8 MiB holds four 2 MiB pages, not five.
        let pages: Vec<_> = (0..4).map(|_| vm.create_page(p).unwrap()).collect();
        assert_eq!(vm.create_page(p), Err(ProviderError::OutOfMemory));
        for pg in pages {
            // SAFETY: never mapped.
            unsafe { vm.destroy_page(pg, p) };
        }
    }
}
