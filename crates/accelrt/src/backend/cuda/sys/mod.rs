//! Every call into the CUDA driver, one thin wrapper each (the only module that touches
//! `cudarc::driver::sys`, like cudarc's own `result` layer over `sys`).
//!
//! Wrappers turn a `CUresult` into [`CuResult`] and nothing more: no caching, no retries, no
//! context switching. Wrappers whose arguments are plain values are safe functions; those
//! that take a driver handle or a device address are `unsafe fn`, and their `# Safety`
//! section says what the caller must guarantee. Inside, each FFI call has a `// SAFETY:`
//! comment naming why the call is sound.
//!
//! Layout: this file holds the types and the error (`CuError`, the `check` helpers);
//! `load.rs` opens the library and lists the symbols the probe checks; the wrappers, by
//! area: `device.rs` (initialisation, devices, contexts), `stream.rs` (streams, events,
//! graphs), `memory.rs` (device, virtual and pinned memory, copies), `module.rs` (PTX
//! modules and kernel launches).

mod device;
mod load;
mod memory;
#[cfg(feature = "test-kernels")]
mod module;
mod stream;

pub(crate) use device::*;
pub(crate) use load::*;
pub(crate) use memory::*;
#[cfg(feature = "test-kernels")]
pub(crate) use module::*;
pub(crate) use stream::*;

use std::ffi::{c_char, CStr};

use cudarc::driver::sys;
pub(crate) use sys::{
    CUcontext, CUdevice, CUdeviceptr, CUevent, CUgraph, CUgraphExec, CUmemGenericAllocationHandle,
    CUresult, CUstream,
};
#[cfg(feature = "test-kernels")]
pub(crate) use sys::{CUfunction, CUmodule};

use crate::error::DeviceError;

/// A failed driver call: which call, and the code it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CuError {
    pub(crate) call: &'static str,
    pub(crate) code: CUresult,
}

pub(crate) type CuResult<T> = std::result::Result<T, CuError>;

impl CuError {
    /// `CUDA_ERROR_OUT_OF_MEMORY`.
    pub(crate) fn is_out_of_memory(&self) -> bool {
        self.code == CUresult::CUDA_ERROR_OUT_OF_MEMORY
    }

    /// The code's name, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
    pub(crate) fn name(&self) -> String {
        format!("{:?}", self.code)
    }

    /// The driver's one-line description of the code.
    pub(crate) fn description(&self) -> String {
        let mut text: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorString only writes a pointer to a static NUL-terminated string
        // (or leaves it untouched and fails) into the out-pointer we own.
        let rc = unsafe { sys::cuGetErrorString(self.code, &mut text) };
        if rc != CUresult::CUDA_SUCCESS || text.is_null() {
            return "no description from the driver".to_string();
        }
        // SAFETY: on success `text` points to a static NUL-terminated string of the driver.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }

    /// What to try, for the codes where there is something to say.
    fn hint(&self) -> &'static str {
        use CUresult as R;
        match self.code {
            R::CUDA_ERROR_OUT_OF_MEMORY => {
                " (the device has no room: free tensors, call empty_cache, lower the batch size, \
                 or try expandable_segments:true against fragmentation)"
            }
            R::CUDA_ERROR_NOT_PERMITTED => {
                " (CUDA calls are not permitted inside a host function: a task given to \
                 launch_host runs on the driver's callback thread and must not call CUDA; use \
                 event_notify, whose callbacks run on an ordinary thread)"
            }
            R::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
            | R::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
            | R::CUDA_ERROR_STREAM_CAPTURE_MERGE
            | R::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT
            | R::CUDA_ERROR_STREAM_CAPTURE_UNMATCHED
            | R::CUDA_ERROR_STREAM_CAPTURE_UNJOINED
            | R::CUDA_ERROR_STREAM_CAPTURE_ISOLATION
            | R::CUDA_ERROR_CAPTURED_EVENT
            | R::CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD => {
                " (an operation that cannot be captured ran during graph capture: capture on a \
                 non-default stream and keep synchronizations, event queries and the legacy \
                 default stream out of the captured region)"
            }
            R::CUDA_ERROR_ILLEGAL_ADDRESS
            | R::CUDA_ERROR_LAUNCH_FAILED
            | R::CUDA_ERROR_ILLEGAL_INSTRUCTION
            | R::CUDA_ERROR_MISALIGNED_ADDRESS => {
                " (a kernel faulted; the CUDA context is now unusable and the process must be \
                 restarted: run it under compute-sanitizer to find the faulting access)"
            }
            R::CUDA_ERROR_NO_DEVICE => {
                " (no CUDA device is visible: check nvidia-smi and CUDA_VISIBLE_DEVICES)"
            }
            R::CUDA_ERROR_CALL_REQUIRES_NEWER_DRIVER
            | R::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
            | R::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => {
                " (the NVIDIA driver is older than this program needs, or its parts do not \
                 match: update or reinstall the driver)"
            }
            R::CUDA_ERROR_INVALID_PTX
            | R::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
            | R::CUDA_ERROR_NO_BINARY_FOR_GPU => {
                " (the driver could not compile accelrt's PTX for this GPU: update the driver)"
            }
            _ => "",
        }
    }

    /// The crate's error for this failure.
    pub(crate) fn into_error(self) -> DeviceError {
        DeviceError::Driver {
            call: self.call,
            code: Some(self.code as i32),
            message: format!("{}: {}{}", self.name(), self.description(), self.hint()),
        }
    }
}

impl From<CuError> for DeviceError {
    fn from(e: CuError) -> DeviceError {
        e.into_error()
    }
}

#[inline]
fn check(code: CUresult, call: &'static str) -> CuResult<()> {
    if code == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CuError { call, code })
    }
}

/// `CUDA_SUCCESS` → true, `CUDA_ERROR_NOT_READY` → false, anything else an error.
#[inline]
fn check_ready(code: CUresult, call: &'static str) -> CuResult<bool> {
    match code {
        CUresult::CUDA_SUCCESS => Ok(true),
        CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        code => Err(CuError { call, code }),
    }
}
