//! [`FaultMemory`]: another backend's device memory, with [`Fault::Allocation`] injected.

use std::sync::Arc;

use accelrt::alloc::{ChunkHandle, MemoryProvider, ProviderError, VirtualMemory};

use crate::faults::{Fault, Faults};

/// A memory provider that hands out its inner provider's memory, except that a pending
/// [`Fault::Allocation`] makes the next segment or page request answer "out of memory".
pub struct FaultMemory {
    inner: Arc<dyn MemoryProvider>,
    faults: Arc<Faults>,
}

impl FaultMemory {
    /// `inner`'s memory, with `faults` injected.
    pub fn new(inner: Arc<dyn MemoryProvider>, faults: Arc<Faults>) -> Self {
        FaultMemory { inner, faults }
    }

    fn vm(&self) -> &dyn VirtualMemory {
        self.inner
            .virtual_memory()
            .expect("FaultMemory offers virtual memory only when its inner provider does")
    }
}

impl std::fmt::Debug for FaultMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultMemory")
            .field(
                "pending_allocation_faults",
                &self.faults.pending(Fault::Allocation),
            )
            .finish()
    }
}

impl MemoryProvider for FaultMemory {
    fn allocate(&self, size: usize) -> Result<usize, ProviderError> {
        if self.faults.take(Fault::Allocation) {
            return Err(ProviderError::OutOfMemory);
        }
        self.inner.allocate(size)
    }

    unsafe fn free(&self, ptr: usize, size: usize) {
        // SAFETY: forwarded from this method's contract: the segment came from our
        // `allocate`, which is the inner provider's.
        unsafe { self.inner.free(ptr, size) }
    }

    fn memory_info(&self) -> (u64, u64) {
        self.inner.memory_info()
    }

    fn recommended_max(&self) -> u64 {
        self.inner.recommended_max()
    }

    fn host_visible(&self) -> bool {
        self.inner.host_visible()
    }

    fn driver_allocated(&self) -> u64 {
        self.inner.driver_allocated()
    }

    fn virtual_memory(&self) -> Option<&dyn VirtualMemory> {
        self.inner
            .virtual_memory()
            .map(|_| self as &dyn VirtualMemory)
    }
}

impl VirtualMemory for FaultMemory {
    fn granularity(&self) -> usize {
        self.vm().granularity()
    }

    fn reserve(&self, size: usize) -> Result<usize, ProviderError> {
        self.vm().reserve(size)
    }

    unsafe fn unreserve(&self, base: usize, size: usize) {
        // SAFETY: forwarded from this method's contract (the range is one of our, that is
        // the inner provider's, reservations).
        unsafe { self.vm().unreserve(base, size) }
    }

    fn create(&self, size: usize) -> Result<ChunkHandle, ProviderError> {
        if self.faults.take(Fault::Allocation) {
            return Err(ProviderError::OutOfMemory);
        }
        self.vm().create(size)
    }

    unsafe fn release(&self, chunk: ChunkHandle, size: usize) {
        // SAFETY: forwarded from this method's contract.
        unsafe { self.vm().release(chunk, size) }
    }

    unsafe fn map(
        &self,
        addr: usize,
        chunks: &[(ChunkHandle, usize)],
    ) -> Result<(), ProviderError> {
        // SAFETY: forwarded from this method's contract.
        unsafe { self.vm().map(addr, chunks) }
    }

    unsafe fn unmap(&self, addr: usize, len: usize) {
        // SAFETY: forwarded from this method's contract.
        unsafe { self.vm().unmap(addr, len) }
    }
}
