//! Relaxed stream-capture mode around allocator calls made while a graph is being captured.
//!
//! PyTorch captures graphs in `cudaStreamCaptureModeGlobal` by default: while any thread
//! captures, "potentially unsafe" driver calls (`cuMemAlloc`, `cuMemMap`, event queries)
//! fail and invalidate the capture. PyTorch's own allocator switches the calling thread to
//! relaxed mode around its `cudaMalloc` for that reason (a captured `cudaMalloc` is not
//! replayed: it only gives the graph new addresses). This does the same for accelrt's
//! allocator, with `cuThreadExchangeStreamCaptureMode` from the CUDA driver library that is
//! already loaded in the process.

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

/// `CUresult cuThreadExchangeStreamCaptureMode(CUstreamCaptureMode *mode)`.
type ExchangeFn = unsafe extern "C" fn(mode: *mut c_int) -> c_int;

/// `CU_STREAM_CAPTURE_MODE_RELAXED`.
const RELAXED: c_int = 2;

/// The driver's exchange function, if the driver library is loaded and has it.
fn exchange_fn() -> Option<ExchangeFn> {
    static EXCHANGE: OnceLock<Option<ExchangeFn>> = OnceLock::new();
    *EXCHANGE.get_or_init(|| {
        // SAFETY: RTLD_NOLOAD only returns a handle to a library the process has already
        // loaded (nothing is loaded, no initialiser runs); the name is a NUL-terminated
        // literal. The handle is never closed, so the symbol stays valid for the process.
        let handle = unsafe {
            libc::dlopen(
                c"libcuda.so.1".as_ptr(),
                libc::RTLD_LAZY | libc::RTLD_NOLOAD,
            )
        };
        if handle.is_null() {
            return None;
        }
        // SAFETY: `handle` is a live handle from dlopen and the name is NUL-terminated.
        let sym = unsafe { libc::dlsym(handle, c"cuThreadExchangeStreamCaptureMode".as_ptr()) };
        if sym.is_null() {
            return None;
        }
        // SAFETY: the CUDA driver API declares cuThreadExchangeStreamCaptureMode as
        // `CUresult (CUstreamCaptureMode *)`: an int-sized enum result and a pointer to an
        // int-sized enum, which is `ExchangeFn`.
        Some(unsafe { std::mem::transmute::<*mut c_void, ExchangeFn>(sym) })
    })
}

/// The calling thread in relaxed capture mode until dropped (the previous mode is restored).
pub(crate) struct RelaxedCapture {
    previous: c_int,
    exchange: ExchangeFn,
}

impl RelaxedCapture {
    /// Switch the calling thread to relaxed mode; `None` (and nothing changed) when the
    /// driver library is not loaded or refuses.
    pub(crate) fn enter() -> Option<RelaxedCapture> {
        let exchange = exchange_fn()?;
        let mut mode = RELAXED;
        // SAFETY: `exchange` is the driver's function (see `exchange_fn`); it reads and
        // writes one mode through a pointer to a local.
        let status = unsafe { exchange(&mut mode) };
        (status == 0).then_some(RelaxedCapture {
            previous: mode,
            exchange,
        })
    }
}

impl Drop for RelaxedCapture {
    fn drop(&mut self) {
        let mut mode = self.previous;
        // SAFETY: as in `enter`; this puts back the mode `enter` replaced.
        unsafe { (self.exchange)(&mut mode) };
    }
}
