//! The backend's own private streams (the notify and clock streams of a context): an owned,
//! non-blocking handle and nothing else.

use super::sys::{self, CUstream};
use crate::error::DeviceResult;

/// An owned, non-blocking stream handle (destroyed on drop). Used for the backend's private
/// streams.
pub(crate) struct RawStream {
    pub(crate) raw: CUstream,
}

// SAFETY: a CUstream is an opaque driver handle usable from any thread (the driver API is
// thread-safe); we never dereference it.
unsafe impl Send for RawStream {}
// SAFETY: as above; the handle is never mutated.
unsafe impl Sync for RawStream {}

impl RawStream {
    /// A new non-blocking stream in the current context.
    pub(crate) fn create(priority: i32) -> DeviceResult<RawStream> {
        Ok(RawStream {
            raw: sys::stream_create(priority)?,
        })
    }
}

impl Drop for RawStream {
    fn drop(&mut self) {
        // SAFETY: we created the stream and own it; nothing uses it after its owner drops.
        if let Err(e) = unsafe { sys::stream_destroy(self.raw) } {
            eprintln!(
                "accelrt: destroying a private CUDA stream: {}",
                e.into_error()
            );
        }
    }
}
