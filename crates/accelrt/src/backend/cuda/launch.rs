//! The [`CudaDriver`] methods that launch the test kernels of `kernels.rs` on a stream
//! (feature `test-kernels`): the stream's context loads the module, the kernels launch on
//! the stream's raw handle.

use std::time::Duration;

use super::{CudaDriver, CudaStream};
use crate::error::DeviceResult;

/// Device work for tests and benchmarks, on a stream of the driver.
impl CudaDriver {
    /// Set `count` 32-bit words from `ptr` to `value`, in stream order.
    ///
    /// # Safety
    /// `ptr .. ptr + 4 * count` must be memory of the stream's device (or pinned memory) that
    /// the caller owns until the work has run.
    pub unsafe fn fill_u32(
        &self,
        stream: &CudaStream,
        ptr: usize,
        count: usize,
        value: u32,
    ) -> DeviceResult<()> {
        let kernels = stream.ctx.kernels()?;
        stream.ctx.deferred.take()?;
        // SAFETY: forwarded from this function's contract; `call` passes the stream's live
        // handle (or null, with its context, which owns the module, made current).
        stream.call(|s| unsafe { kernels.fill_u32(s, ptr, count, value) })
    }

    /// Add `delta` to `count` 32-bit words from `ptr` (wrapping), in stream order.
    ///
    /// # Safety
    /// As [`CudaDriver::fill_u32`].
    pub unsafe fn add_u32(
        &self,
        stream: &CudaStream,
        ptr: usize,
        count: usize,
        delta: u32,
    ) -> DeviceResult<()> {
        let kernels = stream.ctx.kernels()?;
        stream.ctx.deferred.take()?;
        // SAFETY: forwarded from this function's contract; the handle as in `fill_u32`.
        stream.call(|s| unsafe { kernels.add_u32(s, ptr, count, delta) })
    }

    /// Keep the stream busy for `duration` (a kernel busy-waiting on the GPU's global timer).
    pub fn spin(&self, stream: &CudaStream, duration: Duration) -> DeviceResult<()> {
        let kernels = stream.ctx.kernels()?;
        stream.ctx.deferred.take()?;
        // SAFETY: the handle as in `fill_u32`; the kernel touches no memory.
        stream.call(|s| unsafe { kernels.spin(s, duration) })
    }

    /// Wait `delay` on the device, then set `count` words from `ptr` to `value`.
    ///
    /// # Safety
    /// As [`CudaDriver::fill_u32`], for the whole time until the kernel has run.
    pub unsafe fn spin_then_fill(
        &self,
        stream: &CudaStream,
        ptr: usize,
        count: usize,
        value: u32,
        delay: Duration,
    ) -> DeviceResult<()> {
        let kernels = stream.ctx.kernels()?;
        stream.ctx.deferred.take()?;
        // SAFETY: forwarded from this function's contract; the handle as in `fill_u32`.
        stream.call(|s| unsafe { kernels.spin_then_fill(s, ptr, count, value, delay) })
    }

    /// Add to the 64-bit device word at `counter` the number of the `count` words from `ptr`
    /// that differ from `expected`.
    ///
    /// # Safety
    /// `ptr .. ptr + 4 * count` readable, and `counter` an 8-byte-aligned writable word, of
    /// the stream's device, owned by the caller until the kernel has run.
    pub unsafe fn count_mismatches(
        &self,
        stream: &CudaStream,
        ptr: usize,
        count: usize,
        expected: u32,
        counter: usize,
    ) -> DeviceResult<()> {
        let kernels = stream.ctx.kernels()?;
        stream.ctx.deferred.take()?;
        // SAFETY: forwarded from this function's contract; the handle as in `fill_u32`.
        stream.call(|s| unsafe { kernels.count_mismatches(s, ptr, count, expected, counter) })
    }
}
