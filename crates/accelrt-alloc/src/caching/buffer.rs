//! [`Buffer`]: a device allocation that returns to the cache when dropped
//! ([`CachingAllocator::allocate`]).

use super::CachingAllocator;
use crate::stream::Stream;

/// A device allocation that returns to the cache when dropped.
#[must_use = "dropping a Buffer frees it"]
pub struct Buffer<'a> {
    pub(super) alloc: &'a CachingAllocator,
    pub(super) ptr: usize,
    pub(super) size: usize,
    pub(super) stream: Stream,
}

impl Buffer<'_> {
    /// Device address (0 for a zero-sized buffer).
    pub fn ptr(&self) -> usize {
        self.ptr
    }
    /// Bytes requested.
    pub fn size(&self) -> usize {
        self.size
    }
    /// The stream the buffer was allocated on.
    pub fn stream(&self) -> Stream {
        self.stream
    }
    /// Give up ownership: the caller must later call [`CachingAllocator::raw_free`].
    pub fn into_raw(self) -> usize {
        let ptr = self.ptr;
        std::mem::forget(self);
        ptr
    }
}

impl std::fmt::Debug for Buffer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Buffer({:#x}, {} bytes, {})",
            self.ptr, self.size, self.stream
        )
    }
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.alloc.raw_free(self.ptr) {
            // Drop cannot return it: keep it for the next call (cudarc's rule).
            self.alloc.defer_error(e);
        }
    }
}
