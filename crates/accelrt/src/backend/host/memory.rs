//! Host "device memory": anonymous private mappings.
//!
//! Segments are `mmap`ed with `MAP_NORESERVE`, so pages cost nothing until touched: a
//! replay of a 15 GB training trace reserves 15 GB of address space, not of RAM. A
//! capacity makes the host device as small as asked, so out-of-memory is real and testable.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::alloc::{MemoryProvider, ProviderError};

/// Host memory provider with a byte capacity.
#[derive(Debug)]
pub struct HostMemory {
    capacity: u64,
    used: AtomicU64,
}

impl HostMemory {
    /// A provider that refuses to hold more than `capacity` bytes at once.
    pub fn new(capacity: u64) -> Self {
        HostMemory {
            capacity,
            used: AtomicU64::new(0),
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
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let next = cur
                .checked_add(size64)
                .filter(|&n| n <= self.capacity)
                .ok_or(ProviderError::OutOfMemory)?;
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
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
}
