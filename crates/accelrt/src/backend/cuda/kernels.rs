//! The PTX kernels shipped with the backend (`kernels.ptx`), for tests and benchmarks that
//! need real device work: fills, increments, timed spins, a late writer and a checker.

use std::ffi::{c_void, CStr};
use std::time::Duration;

use super::sys::{self, CUfunction, CUmodule, CUstream, CuResult};
use crate::error::{DeviceError, DeviceResult};

/// The module text, NUL-terminated for the driver.
const PTX: &str = concat!(include_str!("kernels.ptx"), "\0");

/// Threads per block of every launch.
const BLOCK: u32 = 256;
/// Most blocks per launch (the loops are grid-stride).
const MAX_GRID: u32 = 4096;

/// The loaded module of one context and its functions.
pub(crate) struct Kernels {
    module: CUmodule,
    fill: CUfunction,
    add: CUfunction,
    spin: CUfunction,
    spin_fill: CUfunction,
    count_ne: CUfunction,
}

// SAFETY: CUmodule and CUfunction are opaque driver handles usable from any thread (the
// driver API is thread-safe; launching one function from several threads is allowed).
unsafe impl Send for Kernels {}
// SAFETY: as above; the handles are never mutated.
unsafe impl Sync for Kernels {}

impl Kernels {
    /// Load the module into the current context (the caller binds it).
    pub(crate) fn load(ordinal: u32) -> DeviceResult<Kernels> {
        let text = CStr::from_bytes_with_nul(PTX.as_bytes()).map_err(|e| DeviceError::Driver {
            call: "cuModuleLoadDataEx",
            code: None,
            message: format!("kernels.ptx is not valid C text: {e}"),
        })?;
        let module = sys::module_load_ptx(text).map_err(|(e, log)| DeviceError::Driver {
            call: e.call,
            code: None,
            message: format!(
                "loading accelrt's PTX kernels on cuda:{ordinal}: {}{}",
                e.into_error(),
                if log.is_empty() {
                    String::new()
                } else {
                    format!("; compiler log: {log}")
                }
            ),
        })?;
        let get = |name: &CStr| {
            // SAFETY: `module` was loaded just above and is live.
            unsafe { sys::module_get_function(module, name) }
        };
        let functions = (|| {
            Ok::<_, sys::CuError>((
                get(c"fill_u32")?,
                get(c"add_u32")?,
                get(c"spin_ns")?,
                get(c"spin_then_fill")?,
                get(c"count_mismatches")?,
            ))
        })();
        match functions {
            Ok((fill, add, spin, spin_fill, count_ne)) => Ok(Kernels {
                module,
                fill,
                add,
                spin,
                spin_fill,
                count_ne,
            }),
            Err(e) => {
                // SAFETY: we own the module and launched nothing from it.
                let _ = unsafe { sys::module_unload(module) };
                Err(e.into_error())
            }
        }
    }

    fn grid(count: usize) -> u32 {
        count.div_ceil(BLOCK as usize).clamp(1, MAX_GRID as usize) as u32
    }

    /// # Safety
    /// As [`sys::launch_kernel`]: `params` must match `f`'s parameters, and `stream` is a
    /// live stream of the context that owns this module (or null with that context current).
    unsafe fn launch(
        &self,
        f: CUfunction,
        grid: u32,
        block: u32,
        stream: CUstream,
        params: &mut [*mut c_void],
    ) -> CuResult<()> {
        // SAFETY: forwarded from the caller.
        unsafe { sys::launch_kernel(f, grid, block, stream, params) }
    }

    /// # Safety
    /// `stream` is a live stream of the context that owns this module (or null with that
    /// context current); `ptr .. ptr + 4 * count` must be device memory of the stream's
    /// device that the caller owns until the kernel has run.
    pub(crate) unsafe fn fill_u32(
        &self,
        stream: CUstream,
        ptr: usize,
        count: usize,
        value: u32,
    ) -> CuResult<()> {
        if count == 0 {
            return Ok(());
        }
        let (mut p, mut n, mut v) = (ptr as u64, count as u64, value);
        let mut params = [
            (&mut p as *mut u64).cast::<c_void>(),
            (&mut n as *mut u64).cast::<c_void>(),
            (&mut v as *mut u32).cast::<c_void>(),
        ];
        // SAFETY: params match fill_u32(u64, u64, u32); the caller owns the range.
        unsafe { self.launch(self.fill, Self::grid(count), BLOCK, stream, &mut params) }
    }

    /// # Safety
    /// As [`Kernels::fill_u32`].
    pub(crate) unsafe fn add_u32(
        &self,
        stream: CUstream,
        ptr: usize,
        count: usize,
        delta: u32,
    ) -> CuResult<()> {
        if count == 0 {
            return Ok(());
        }
        let (mut p, mut n, mut d) = (ptr as u64, count as u64, delta);
        let mut params = [
            (&mut p as *mut u64).cast::<c_void>(),
            (&mut n as *mut u64).cast::<c_void>(),
            (&mut d as *mut u32).cast::<c_void>(),
        ];
        // SAFETY: params match add_u32(u64, u64, u32); the caller owns the range.
        unsafe { self.launch(self.add, Self::grid(count), BLOCK, stream, &mut params) }
    }

    /// Occupy the stream for `duration` (one thread busy-waiting on the GPU's global timer).
    ///
    /// # Safety
    /// `stream` as in [`Kernels::fill_u32`].
    pub(crate) unsafe fn spin(&self, stream: CUstream, duration: Duration) -> CuResult<()> {
        let mut ns = duration.as_nanos().min(u64::MAX as u128) as u64;
        let mut params = [(&mut ns as *mut u64).cast::<c_void>()];
        // SAFETY: params match spin_ns(u64); the kernel touches no memory.
        unsafe { self.launch(self.spin, 1, 1, stream, &mut params) }
    }

    /// # Safety
    /// As [`Kernels::fill_u32`], for the whole time until the kernel has run (it waits
    /// `delay` before writing).
    pub(crate) unsafe fn spin_then_fill(
        &self,
        stream: CUstream,
        ptr: usize,
        count: usize,
        value: u32,
        delay: Duration,
    ) -> CuResult<()> {
        let (mut p, mut n, mut v) = (ptr as u64, count as u64, value);
        let mut ns = delay.as_nanos().min(u64::MAX as u128) as u64;
        let mut params = [
            (&mut p as *mut u64).cast::<c_void>(),
            (&mut n as *mut u64).cast::<c_void>(),
            (&mut v as *mut u32).cast::<c_void>(),
            (&mut ns as *mut u64).cast::<c_void>(),
        ];
        // SAFETY: params match spin_then_fill(u64, u64, u32, u64); the caller owns the range.
        unsafe {
            self.launch(
                self.spin_fill,
                Self::grid(count),
                BLOCK,
                stream,
                &mut params,
            )
        }
    }

    /// # Safety
    /// `stream` as in [`Kernels::fill_u32`]; `ptr .. ptr + 4 * count` readable device memory
    /// and `counter` an 8-byte-aligned device word the caller owns, until the kernel has run.
    pub(crate) unsafe fn count_mismatches(
        &self,
        stream: CUstream,
        ptr: usize,
        count: usize,
        expected: u32,
        counter: usize,
    ) -> CuResult<()> {
        if count == 0 {
            return Ok(());
        }
        let (mut p, mut n, mut e, mut c) = (ptr as u64, count as u64, expected, counter as u64);
        let mut params = [
            (&mut p as *mut u64).cast::<c_void>(),
            (&mut n as *mut u64).cast::<c_void>(),
            (&mut e as *mut u32).cast::<c_void>(),
            (&mut c as *mut u64).cast::<c_void>(),
        ];
        // SAFETY: params match count_mismatches(u64, u64, u32, u64); the caller owns both.
        unsafe { self.launch(self.count_ne, Self::grid(count), BLOCK, stream, &mut params) }
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        // SAFETY: we own the module; the context drops it last, after every stream that could
        // still launch from it.
        let _ = unsafe { sys::module_unload(self.module) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_declares_every_kernel_we_look_up() {
        for name in [
            "fill_u32",
            "add_u32",
            "spin_ns",
            "spin_then_fill",
            "count_mismatches",
        ] {
            assert!(
                PTX.contains(&format!(".visible .entry {name}(")),
                "kernels.ptx lacks {name}"
            );
        }
        assert!(PTX.ends_with('\0') && !PTX[..PTX.len() - 1].contains('\0'));
        assert_eq!(Kernels::grid(0), 1);
        assert_eq!(Kernels::grid(257), 2);
        assert_eq!(Kernels::grid(usize::MAX / 2), MAX_GRID);
    }
}
