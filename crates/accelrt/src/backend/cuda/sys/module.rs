//! PTX modules and kernel launches.

use std::ffi::{c_uint, c_void, CStr};

use cudarc::driver::sys;

use super::{check, CuError, CuResult};
use super::{CUfunction, CUmodule, CUstream};

/// Load a PTX module into the current context; a JIT failure carries the compiler's log.
pub(crate) fn module_load_ptx(ptx: &CStr) -> std::result::Result<CUmodule, (CuError, String)> {
    let mut module: CUmodule = std::ptr::null_mut();
    let mut log = vec![0u8; 8192];
    let mut options = [
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
    ];
    let mut values: [*mut c_void; 2] = [log.as_mut_ptr().cast(), log.len() as *mut c_void];
    // SAFETY: `ptx` is NUL-terminated text; the option arrays have the same length (2); the
    // log buffer outlives the call and its size is passed by value, as the API specifies.
    let rc = unsafe {
        sys::cuModuleLoadDataEx(
            &mut module,
            ptx.as_ptr().cast(),
            options.len() as c_uint,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    match check(rc, "cuModuleLoadDataEx") {
        Ok(()) => Ok(module),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err((e, String::from_utf8_lossy(&log[..end]).trim().to_string()))
        }
    }
}

/// # Safety
/// `m` must be a live module.
pub(crate) unsafe fn module_get_function(m: CUmodule, name: &CStr) -> CuResult<CUfunction> {
    let mut f: CUfunction = std::ptr::null_mut();
    check(
        // SAFETY: the caller guarantees `m`; `name` is NUL-terminated; writes one handle.
        unsafe { sys::cuModuleGetFunction(&mut f, m, name.as_ptr()) },
        "cuModuleGetFunction",
    )?;
    Ok(f)
}

/// # Safety
/// `m` must be owned by the caller, with no kernel of it in flight or launched afterwards.
pub(crate) unsafe fn module_unload(m: CUmodule) -> CuResult<()> {
    // SAFETY: the caller owns `m` and gives it up.
    check(unsafe { sys::cuModuleUnload(m) }, "cuModuleUnload")
}

/// Launch `f` on a 1-D grid.
///
/// # Safety
/// `f` live; `s` live or null; `params` holds one pointer per kernel parameter, each to a
/// value of exactly that parameter's type; every address the kernel touches through those
/// values must be memory the caller owns for the kernel's duration.
pub(crate) unsafe fn launch_kernel(
    f: CUfunction,
    grid: u32,
    block: u32,
    s: CUstream,
    params: &mut [*mut c_void],
) -> CuResult<()> {
    // SAFETY: forwarded from the caller's guarantees; no shared memory, no `extra` array.
    check(
        unsafe {
            sys::cuLaunchKernel(
                f,
                grid,
                1,
                1,
                block,
                1,
                1,
                0,
                s,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        },
        "cuLaunchKernel",
    )
}
