//! Every call into the CUDA driver, one thin wrapper each (the only file that touches
//! `cudarc::driver::sys`, like cudarc's own `result` layer over `sys`).
//!
//! Wrappers turn a `CUresult` into [`CuResult`] and nothing more: no caching, no retries, no
//! context switching. Wrappers whose arguments are plain values are safe functions; those
//! that take a driver handle or a device address are `unsafe fn`, and their `# Safety`
//! section says what the caller must guarantee. Inside, each FFI call has a `// SAFETY:`
//! comment naming why the call is sound.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use cudarc::driver::sys;
pub(crate) use sys::{
    CUcontext, CUdevice, CUdeviceptr, CUevent, CUfunction, CUgraph, CUgraphExec,
    CUmemGenericAllocationHandle, CUmodule, CUresult, CUstream,
};

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

// ---- loading ---------------------------------------------------------------------------

/// Whether a CUDA driver library (`libcuda.so`) can be opened. Must be true before any
/// other function here is called: cudarc panics when the library is missing.
pub(crate) fn library_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the driver library under its usual names
    // and closes it again; it touches no memory of ours.
    unsafe { sys::is_culib_present() }
}

/// The names in `symbols` that the driver library does not export (cudarc would panic on
/// the first call of a missing one). Only call after [`library_present`] returned true.
pub(crate) fn missing_symbols(symbols: &[&'static str]) -> Vec<&'static str> {
    // SAFETY: library_present() was true, so culib() opens the library instead of panicking.
    let lib = unsafe { sys::culib() };
    symbols
        .iter()
        .copied()
        .filter(|name| {
            // SAFETY: we only test that the symbol exists; the pointer is never called or
            // dereferenced through this (wrong but unused) function type.
            unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err()
        })
        .collect()
}

// ---- initialisation and devices --------------------------------------------------------

pub(crate) fn init() -> CuResult<()> {
    // SAFETY: cuInit takes a flags value (must be 0) and no pointers.
    check(unsafe { sys::cuInit(0) }, "cuInit")
}

pub(crate) fn driver_version() -> CuResult<i32> {
    let mut v: c_int = 0;
    check(
        // SAFETY: writes one int into a local.
        unsafe { sys::cuDriverGetVersion(&mut v) },
        "cuDriverGetVersion",
    )?;
    Ok(v)
}

pub(crate) fn device_count() -> CuResult<i32> {
    let mut n: c_int = 0;
    // SAFETY: writes one int into a local.
    check(unsafe { sys::cuDeviceGetCount(&mut n) }, "cuDeviceGetCount")?;
    Ok(n)
}

pub(crate) fn device_get(ordinal: i32) -> CuResult<CUdevice> {
    let mut d: CUdevice = 0;
    // SAFETY: writes one device id into a local; a bad ordinal is reported as an error.
    check(unsafe { sys::cuDeviceGet(&mut d, ordinal) }, "cuDeviceGet")?;
    Ok(d)
}

pub(crate) fn device_name(dev: CUdevice) -> CuResult<String> {
    let mut buf = [0 as c_char; 256];
    check(
        // SAFETY: the driver writes at most `len` bytes, NUL-terminated, into our buffer.
        unsafe { sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as c_int, dev) },
        "cuDeviceGetName",
    )?;
    // Never read past the buffer, even if the driver forgot the terminator.
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

pub(crate) fn device_total_mem(dev: CUdevice) -> CuResult<usize> {
    let mut bytes = 0usize;
    check(
        // SAFETY: writes one size into a local.
        unsafe { sys::cuDeviceTotalMem_v2(&mut bytes, dev) },
        "cuDeviceTotalMem",
    )?;
    Ok(bytes)
}

pub(crate) fn device_attribute(dev: CUdevice, attr: sys::CUdevice_attribute) -> CuResult<i32> {
    let mut v: c_int = 0;
    check(
        // SAFETY: writes one int into a local.
        unsafe { sys::cuDeviceGetAttribute(&mut v, attr, dev) },
        "cuDeviceGetAttribute",
    )?;
    Ok(v)
}

pub(crate) use sys::CUdevice_attribute as Attr;

pub(crate) fn can_access_peer(dev: CUdevice, peer: CUdevice) -> CuResult<bool> {
    let mut v: c_int = 0;
    check(
        // SAFETY: writes one int into a local.
        unsafe { sys::cuDeviceCanAccessPeer(&mut v, dev, peer) },
        "cuDeviceCanAccessPeer",
    )?;
    Ok(v != 0)
}

// ---- contexts --------------------------------------------------------------------------

pub(crate) fn primary_ctx_retain(dev: CUdevice) -> CuResult<CUcontext> {
    let mut ctx: CUcontext = std::ptr::null_mut();
    check(
        // SAFETY: writes one context handle into a local; takes a reference the caller releases
        // with primary_ctx_release.
        unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
        "cuDevicePrimaryCtxRetain",
    )?;
    Ok(ctx)
}

/// # Safety
/// Balances one successful [`primary_ctx_retain`] of `dev`; nothing of ours may use the
/// context afterwards unless another reference is held.
pub(crate) unsafe fn primary_ctx_release(dev: CUdevice) -> CuResult<()> {
    // SAFETY: the caller owns one reference to the primary context of `dev`.
    check(
        unsafe { sys::cuDevicePrimaryCtxRelease_v2(dev) },
        "cuDevicePrimaryCtxRelease",
    )
}

pub(crate) fn ctx_get_current() -> CuResult<CUcontext> {
    let mut ctx: CUcontext = std::ptr::null_mut();
    // SAFETY: writes one handle (possibly null) into a local.
    check(unsafe { sys::cuCtxGetCurrent(&mut ctx) }, "cuCtxGetCurrent")?;
    Ok(ctx)
}

/// # Safety
/// `ctx` must be null or a live context (one we hold a reference to).
pub(crate) unsafe fn ctx_set_current(ctx: CUcontext) -> CuResult<()> {
    // SAFETY: the caller guarantees `ctx` is null or live.
    check(unsafe { sys::cuCtxSetCurrent(ctx) }, "cuCtxSetCurrent")
}

/// Block until all work of the current context has completed.
pub(crate) fn ctx_synchronize() -> CuResult<()> {
    // SAFETY: no arguments; acts on the calling thread's current context.
    check(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize")
}

/// (least, greatest) stream priority of the current context (e.g. (0, -5)).
pub(crate) fn ctx_stream_priority_range() -> CuResult<(i32, i32)> {
    let (mut least, mut greatest): (c_int, c_int) = (0, 0);
    check(
        // SAFETY: writes two ints into locals.
        unsafe { sys::cuCtxGetStreamPriorityRange(&mut least, &mut greatest) },
        "cuCtxGetStreamPriorityRange",
    )?;
    Ok((least, greatest))
}

/// # Safety
/// `peer` must be a live context, and a context must be current on this thread.
pub(crate) unsafe fn ctx_enable_peer_access(peer: CUcontext) -> CuResult<()> {
    // SAFETY: the caller guarantees `peer` is live; flags must be 0.
    let rc = unsafe { sys::cuCtxEnablePeerAccess(peer, 0) };
    if rc == CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
        return Ok(());
    }
    check(rc, "cuCtxEnablePeerAccess")
}

// ---- streams ---------------------------------------------------------------------------

/// A non-blocking stream of the current context.
pub(crate) fn stream_create(priority: i32) -> CuResult<CUstream> {
    let mut s: CUstream = std::ptr::null_mut();
    check(
        // SAFETY: writes one handle into a local; the caller owns the new stream.
        unsafe {
            sys::cuStreamCreateWithPriority(
                &mut s,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as c_uint,
                priority,
            )
        },
        "cuStreamCreateWithPriority",
    )?;
    Ok(s)
}

/// # Safety
/// `s` must be a stream we created and still own, used by nothing afterwards.
pub(crate) unsafe fn stream_destroy(s: CUstream) -> CuResult<()> {
    // SAFETY: the caller owns `s` and gives it up.
    check(unsafe { sys::cuStreamDestroy_v2(s) }, "cuStreamDestroy")
}

/// # Safety
/// `s` must be a live stream, or null (the legacy default stream of the current context).
pub(crate) unsafe fn stream_synchronize(s: CUstream) -> CuResult<()> {
    // SAFETY: the caller guarantees `s` is live or null.
    check(
        unsafe { sys::cuStreamSynchronize(s) },
        "cuStreamSynchronize",
    )
}

/// # Safety
/// As [`stream_synchronize`].
pub(crate) unsafe fn stream_query(s: CUstream) -> CuResult<bool> {
    // SAFETY: the caller guarantees `s` is live or null.
    check_ready(unsafe { sys::cuStreamQuery(s) }, "cuStreamQuery")
}

/// # Safety
/// `s` live or null; `e` a live event.
pub(crate) unsafe fn stream_wait_event(s: CUstream, e: CUevent) -> CuResult<()> {
    // SAFETY: the caller guarantees both handles are live; flags must be 0.
    check(
        unsafe { sys::cuStreamWaitEvent(s, e, 0) },
        "cuStreamWaitEvent",
    )
}

/// The context a stream belongs to.
///
/// # Safety
/// `s` must be a live stream handle.
pub(crate) unsafe fn stream_get_ctx(s: CUstream) -> CuResult<CUcontext> {
    let mut ctx: CUcontext = std::ptr::null_mut();
    check(
        // SAFETY: the caller guarantees `s` is live; writes one handle into a local.
        unsafe { sys::cuStreamGetCtx(s, &mut ctx) },
        "cuStreamGetCtx",
    )?;
    Ok(ctx)
}

/// Whether the stream is capturing a graph now.
///
/// # Safety
/// As [`stream_synchronize`].
pub(crate) unsafe fn stream_is_capturing(s: CUstream) -> CuResult<bool> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    check(
        // SAFETY: the caller guarantees `s`; writes one status into a local.
        unsafe { sys::cuStreamIsCapturing(s, &mut status) },
        "cuStreamIsCapturing",
    )?;
    Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// Start capturing in relaxed mode (other threads' unsafe calls stay legal: the caching
/// allocator may query events or take a segment while a graph is being captured).
///
/// # Safety
/// `s` must be a live, non-default stream.
pub(crate) unsafe fn stream_begin_capture(s: CUstream) -> CuResult<()> {
    // SAFETY: the caller guarantees `s` is live.
    check(
        unsafe {
            sys::cuStreamBeginCapture_v2(
                s,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
        },
        "cuStreamBeginCapture",
    )
}

/// # Safety
/// `s` must be a live stream that is capturing.
pub(crate) unsafe fn stream_end_capture(s: CUstream) -> CuResult<CUgraph> {
    let mut g: CUgraph = std::ptr::null_mut();
    check(
        // SAFETY: the caller guarantees `s`; writes one graph handle (owned by the caller).
        unsafe { sys::cuStreamEndCapture(s, &mut g) },
        "cuStreamEndCapture",
    )?;
    Ok(g)
}

/// The host-function signature the driver calls.
pub(crate) type HostFn = unsafe extern "C" fn(*mut c_void);

/// # Safety
/// `s` live or null; `data` must stay valid until `f` has run (every time it runs, for a
/// launch that is captured into a graph), and `f(data)` must be sound from the driver's
/// callback thread.
pub(crate) unsafe fn launch_host_func(s: CUstream, f: HostFn, data: *mut c_void) -> CuResult<()> {
    // SAFETY: forwarded from the caller's guarantees.
    check(
        unsafe { sys::cuLaunchHostFunc(s, Some(f), data) },
        "cuLaunchHostFunc",
    )
}

// ---- events ----------------------------------------------------------------------------

/// An event of the current context; `timing: false` creates it with
/// `CU_EVENT_DISABLE_TIMING` (cheaper to record and query).
pub(crate) fn event_create(timing: bool) -> CuResult<CUevent> {
    let flags = if timing {
        sys::CUevent_flags::CU_EVENT_DEFAULT
    } else {
        sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
    };
    let mut e: CUevent = std::ptr::null_mut();
    check(
        // SAFETY: writes one handle into a local; the caller owns the new event.
        unsafe { sys::cuEventCreate(&mut e, flags as c_uint) },
        "cuEventCreate",
    )?;
    Ok(e)
}

/// # Safety
/// `e` live; `s` live or null (then the current context must be `e`'s).
#[inline]
pub(crate) unsafe fn event_record(e: CUevent, s: CUstream) -> CuResult<()> {
    // SAFETY: the caller guarantees both handles.
    check(unsafe { sys::cuEventRecord(e, s) }, "cuEventRecord")
}

/// # Safety
/// `e` must be a live event.
#[inline]
pub(crate) unsafe fn event_query(e: CUevent) -> CuResult<bool> {
    // SAFETY: the caller guarantees `e`.
    check_ready(unsafe { sys::cuEventQuery(e) }, "cuEventQuery")
}

/// # Safety
/// `e` must be a live event.
pub(crate) unsafe fn event_synchronize(e: CUevent) -> CuResult<()> {
    // SAFETY: the caller guarantees `e`.
    check(unsafe { sys::cuEventSynchronize(e) }, "cuEventSynchronize")
}

/// Milliseconds between two completed timing events.
///
/// # Safety
/// Both must be live events.
pub(crate) unsafe fn event_elapsed_ms(start: CUevent, end: CUevent) -> CuResult<f32> {
    let mut ms = 0f32;
    check(
        // SAFETY: the caller guarantees both handles; writes one float into a local.
        unsafe { sys::cuEventElapsedTime_v2(&mut ms, start, end) },
        "cuEventElapsedTime",
    )?;
    Ok(ms)
}

/// # Safety
/// `e` must be an event we own, used by nothing afterwards.
pub(crate) unsafe fn event_destroy(e: CUevent) -> CuResult<()> {
    // SAFETY: the caller owns `e` and gives it up.
    check(unsafe { sys::cuEventDestroy_v2(e) }, "cuEventDestroy")
}

// ---- graphs ----------------------------------------------------------------------------

/// # Safety
/// `g` must be a live graph.
pub(crate) unsafe fn graph_instantiate(g: CUgraph) -> CuResult<CUgraphExec> {
    let mut exec: CUgraphExec = std::ptr::null_mut();
    check(
        // SAFETY: the caller guarantees `g`; writes one handle (owned by the caller).
        unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, g, 0) },
        "cuGraphInstantiate",
    )?;
    Ok(exec)
}

/// # Safety
/// `exec` live; `s` live or null.
pub(crate) unsafe fn graph_launch(exec: CUgraphExec, s: CUstream) -> CuResult<()> {
    // SAFETY: the caller guarantees both handles.
    check(unsafe { sys::cuGraphLaunch(exec, s) }, "cuGraphLaunch")
}

/// # Safety
/// `exec` must be owned by the caller and used by nothing afterwards.
pub(crate) unsafe fn graph_exec_destroy(exec: CUgraphExec) -> CuResult<()> {
    // SAFETY: the caller owns `exec` and gives it up.
    check(
        unsafe { sys::cuGraphExecDestroy(exec) },
        "cuGraphExecDestroy",
    )
}

/// # Safety
/// `g` must be owned by the caller and used by nothing afterwards.
pub(crate) unsafe fn graph_destroy(g: CUgraph) -> CuResult<()> {
    // SAFETY: the caller owns `g` and gives it up.
    check(unsafe { sys::cuGraphDestroy(g) }, "cuGraphDestroy")
}

// ---- device memory ---------------------------------------------------------------------

/// `size` bytes of device memory in the current context.
pub(crate) fn mem_alloc(size: usize) -> CuResult<CUdeviceptr> {
    let mut p: CUdeviceptr = 0;
    // SAFETY: writes one address into a local; the caller owns the allocation.
    check(unsafe { sys::cuMemAlloc_v2(&mut p, size) }, "cuMemAlloc")?;
    Ok(p)
}

/// # Safety
/// `p` must come from [`mem_alloc`], not yet freed, and be used by nothing afterwards.
pub(crate) unsafe fn mem_free(p: CUdeviceptr) -> CuResult<()> {
    // SAFETY: the caller owns the allocation and gives it up.
    check(unsafe { sys::cuMemFree_v2(p) }, "cuMemFree")
}

/// (free, total) bytes of the current context's device.
pub(crate) fn mem_get_info() -> CuResult<(usize, usize)> {
    let (mut free, mut total) = (0usize, 0usize);
    check(
        // SAFETY: writes two sizes into locals.
        unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) },
        "cuMemGetInfo",
    )?;
    Ok((free, total))
}

/// Synchronous copy from host memory to device memory.
///
/// # Safety
/// `dst .. dst + src.len()` must be device (or pinned) memory we own and nothing else uses.
pub(crate) unsafe fn memcpy_htod(dst: CUdeviceptr, src: &[u8]) -> CuResult<()> {
    // SAFETY: `src` is a valid host slice; the caller guarantees the destination range.
    check(
        unsafe { sys::cuMemcpyHtoD_v2(dst, src.as_ptr().cast(), src.len()) },
        "cuMemcpyHtoD",
    )
}

/// Synchronous copy from device memory to host memory.
///
/// # Safety
/// `src .. src + dst.len()` must be readable device (or pinned) memory.
pub(crate) unsafe fn memcpy_dtoh(dst: &mut [u8], src: CUdeviceptr) -> CuResult<()> {
    // SAFETY: `dst` is a valid, exclusively borrowed host slice; the caller guarantees the
    // source range.
    check(
        unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, dst.len()) },
        "cuMemcpyDtoH",
    )
}

/// Set `count` 32-bit words from `dst` to `value`, in stream order on `s`.
///
/// # Safety
/// `dst .. dst + 4 * count` must be device memory we own; `s` live or null.
pub(crate) unsafe fn memset_d32_async(
    dst: CUdeviceptr,
    value: u32,
    count: usize,
    s: CUstream,
) -> CuResult<()> {
    // SAFETY: forwarded from the caller's guarantees.
    check(
        unsafe { sys::cuMemsetD32Async(dst, value, count, s) },
        "cuMemsetD32Async",
    )
}

// ---- virtual memory --------------------------------------------------------------------

fn device_location(ordinal: c_int) -> sys::CUmemLocation {
    sys::CUmemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
        id: ordinal,
    }
}

fn pinned_device_prop(ordinal: c_int) -> sys::CUmemAllocationProp {
    // SAFETY: CUmemAllocationProp is a plain C struct (integers, a pointer, a byte array) for
    // which all-zero bytes are valid: no handle types, no flags, a null win32 pointer.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
    prop.location = device_location(ordinal);
    prop
}

/// The size and alignment of physical pages on device `ordinal` (2 MiB on current GPUs).
pub(crate) fn mem_granularity(ordinal: c_int) -> CuResult<usize> {
    let prop = pinned_device_prop(ordinal);
    let mut g = 0usize;
    check(
        // SAFETY: `prop` is a valid, initialised struct; writes one size into a local.
        unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut g,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        },
        "cuMemGetAllocationGranularity",
    )?;
    Ok(g)
}

/// Reserve `size` bytes of device address space aligned to `align`.
pub(crate) fn mem_address_reserve(size: usize, align: usize) -> CuResult<CUdeviceptr> {
    let mut p: CUdeviceptr = 0;
    check(
        // SAFETY: writes one address into a local; the caller owns the reservation.
        unsafe { sys::cuMemAddressReserve(&mut p, size, align, 0, 0) },
        "cuMemAddressReserve",
    )?;
    Ok(p)
}

/// # Safety
/// `(p, size)` must be one reservation we own with nothing mapped in it.
pub(crate) unsafe fn mem_address_free(p: CUdeviceptr, size: usize) -> CuResult<()> {
    // SAFETY: the caller owns the reservation and gives it up.
    check(
        unsafe { sys::cuMemAddressFree(p, size) },
        "cuMemAddressFree",
    )
}

/// One physical allocation of `size` bytes (a multiple of the granularity) on device
/// `ordinal`.
pub(crate) fn mem_create(size: usize, ordinal: c_int) -> CuResult<CUmemGenericAllocationHandle> {
    let prop = pinned_device_prop(ordinal);
    let mut h: CUmemGenericAllocationHandle = 0;
    check(
        // SAFETY: `prop` is valid; writes one handle into a local (owned by the caller).
        unsafe { sys::cuMemCreate(&mut h, size, &prop, 0) },
        "cuMemCreate",
    )?;
    Ok(h)
}

/// One physical allocation like [`mem_create`], created exportable as a POSIX file
/// descriptor (`CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`), so another process can map it.
pub(crate) fn mem_create_shareable(
    size: usize,
    ordinal: c_int,
) -> CuResult<CUmemGenericAllocationHandle> {
    let mut prop = pinned_device_prop(ordinal);
    prop.requestedHandleTypes =
        sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    let mut h: CUmemGenericAllocationHandle = 0;
    check(
        // SAFETY: `prop` is valid; writes one handle into a local (owned by the caller).
        unsafe { sys::cuMemCreate(&mut h, size, &prop, 0) },
        "cuMemCreate (shareable)",
    )?;
    Ok(h)
}

/// The driver calls sharing memory between processes needs, as a reason when one is missing
/// (a driver older than CUDA 10.2).
pub(crate) fn ipc_symbols_missing() -> Option<String> {
    let missing = missing_symbols(&[
        "cuMemExportToShareableHandle",
        "cuMemImportFromShareableHandle",
    ]);
    (!missing.is_empty()).then(|| {
        format!(
            "the CUDA driver does not export {} (CUDA 10.2 or newer is needed to share \
             memory between processes)",
            missing.join(", ")
        )
    })
}

/// Export `h` (created shareable, see [`mem_create_shareable`]) as a POSIX file descriptor,
/// owned by the caller. Call only when [`ipc_symbols_missing`] returned `None`.
pub(crate) fn mem_export_fd(h: CUmemGenericAllocationHandle) -> CuResult<c_int> {
    let mut fd: c_int = -1;
    check(
        // SAFETY: for a POSIX descriptor the driver writes one int to the pointer, which
        // points to a local; `h` is a live handle of ours; flags must be 0.
        unsafe {
            sys::cuMemExportToShareableHandle(
                (&mut fd as *mut c_int).cast::<c_void>(),
                h,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        },
        "cuMemExportToShareableHandle",
    )?;
    Ok(fd)
}

/// Import the allocation another process exported as descriptor `fd` (valid here; the
/// caller still owns it and closes it). The handle is the caller's, given back with
/// [`mem_release`]. Call only when [`ipc_symbols_missing`] returned `None`.
pub(crate) fn mem_import_fd(fd: c_int) -> CuResult<CUmemGenericAllocationHandle> {
    let mut h: CUmemGenericAllocationHandle = 0;
    check(
        // SAFETY: for a POSIX descriptor the driver takes the descriptor's value in the
        // pointer argument (it is not dereferenced); writes one handle into a local.
        unsafe {
            sys::cuMemImportFromShareableHandle(
                &mut h,
                fd as isize as *mut c_void,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            )
        },
        "cuMemImportFromShareableHandle",
    )?;
    Ok(h)
}

/// # Safety
/// `h` must be owned by the caller and mapped nowhere.
pub(crate) unsafe fn mem_release(h: CUmemGenericAllocationHandle) -> CuResult<()> {
    // SAFETY: the caller owns `h` and gives it up.
    check(unsafe { sys::cuMemRelease(h) }, "cuMemRelease")
}

/// Map all `size` bytes of `h` at `p`.
///
/// # Safety
/// `p .. p + size` must lie in a reservation we own and be unmapped; `h` must be live.
pub(crate) unsafe fn mem_map(
    p: CUdeviceptr,
    size: usize,
    h: CUmemGenericAllocationHandle,
) -> CuResult<()> {
    // SAFETY: forwarded from the caller's guarantees; offset and flags must be 0.
    check(unsafe { sys::cuMemMap(p, size, 0, h, 0) }, "cuMemMap")
}

/// Make `p .. p + size` readable and writable from each device in `ordinals`, in one call.
///
/// # Safety
/// The whole range must be mapped, by mappings we own.
pub(crate) unsafe fn mem_set_access(
    p: CUdeviceptr,
    size: usize,
    ordinals: &[c_int],
) -> CuResult<()> {
    let descs: Vec<sys::CUmemAccessDesc> = ordinals
        .iter()
        .map(|&o| sys::CUmemAccessDesc {
            location: device_location(o),
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        })
        .collect();
    // SAFETY: `descs` is a valid array of `descs.len()` descriptors; the caller guarantees
    // the range.
    check(
        unsafe { sys::cuMemSetAccess(p, size, descs.as_ptr(), descs.len()) },
        "cuMemSetAccess",
    )
}

/// # Safety
/// `p .. p + size` must cover whole mappings we own, unused by any work in flight.
pub(crate) unsafe fn mem_unmap(p: CUdeviceptr, size: usize) -> CuResult<()> {
    // SAFETY: forwarded from the caller's guarantees.
    check(unsafe { sys::cuMemUnmap(p, size) }, "cuMemUnmap")
}

// ---- pinned host memory ----------------------------------------------------------------

/// `size` bytes of page-locked host memory, usable from every context (`PORTABLE`).
pub(crate) fn mem_host_alloc(size: usize) -> CuResult<*mut c_void> {
    let mut p: *mut c_void = std::ptr::null_mut();
    check(
        // SAFETY: writes one pointer into a local; the caller owns the allocation.
        unsafe { sys::cuMemHostAlloc(&mut p, size, sys::CU_MEMHOSTALLOC_PORTABLE) },
        "cuMemHostAlloc",
    )?;
    Ok(p)
}

/// # Safety
/// `p` must come from [`mem_host_alloc`], not yet freed, and be used by nothing afterwards.
pub(crate) unsafe fn mem_free_host(p: *mut c_void) -> CuResult<()> {
    // SAFETY: the caller owns the allocation and gives it up.
    check(unsafe { sys::cuMemFreeHost(p) }, "cuMemFreeHost")
}

/// Whether `ptr` lies in page-locked host memory known to the driver (ours or anyone's).
pub(crate) fn pointer_is_host_memory(ptr: usize) -> bool {
    let mut kind: c_uint = 0;
    // SAFETY: the driver only looks the address up in its tables (it never dereferences it)
    // and writes one unsigned int into a local; unknown addresses are an error.
    let rc = unsafe {
        sys::cuPointerGetAttribute(
            (&mut kind as *mut c_uint).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr as CUdeviceptr,
        )
    };
    rc == CUresult::CUDA_SUCCESS && kind == sys::CUmemorytype::CU_MEMORYTYPE_HOST as c_uint
}

// ---- modules and kernels ---------------------------------------------------------------

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

/// Every driver symbol this backend calls (checked once at probe time, so a driver that
/// lacks one makes the backend unavailable instead of panicking later).
pub(crate) const SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDeviceCanAccessPeer",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuCtxGetStreamPriorityRange",
    "cuCtxEnablePeerAccess",
    "cuStreamCreateWithPriority",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamQuery",
    "cuStreamWaitEvent",
    "cuStreamGetCtx",
    "cuStreamIsCapturing",
    "cuStreamBeginCapture_v2",
    "cuStreamEndCapture",
    "cuLaunchHostFunc",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventElapsedTime_v2",
    "cuEventDestroy_v2",
    "cuGraphInstantiateWithFlags",
    "cuGraphLaunch",
    "cuGraphExecDestroy",
    "cuGraphDestroy",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemGetInfo_v2",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuMemsetD32Async",
    "cuMemGetAllocationGranularity",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemMap",
    "cuMemSetAccess",
    "cuMemUnmap",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuPointerGetAttribute",
    "cuModuleLoadDataEx",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuLaunchKernel",
    "cuGetErrorString",
];

// ---- hooks: primary-context state, pointer devices, stream-ordered writes, graph size ----
// (appended for the hooks work; every symbol here is also in HOOKS_SYMBOLS below)

/// Whether the primary context of `dev` is active (retained by anyone in the process: a
/// context PyTorch created counts). Creates nothing.
pub(crate) fn primary_ctx_is_active(dev: CUdevice) -> CuResult<bool> {
    let (mut flags, mut active): (c_uint, c_int) = (0, 0);
    check(
        // SAFETY: writes one unsigned and one int into locals; a bad device is an error.
        unsafe { sys::cuDevicePrimaryCtxGetState(dev, &mut flags, &mut active) },
        "cuDevicePrimaryCtxGetState",
    )?;
    Ok(active != 0)
}

/// The ordinal of the device whose memory `ptr` is, or `None` when the driver does not know
/// it as device memory (host memory, pinned memory, an unknown address).
pub(crate) fn pointer_device_ordinal(ptr: usize) -> Option<i32> {
    let mut kind: c_uint = 0;
    // SAFETY: the driver only looks the address up in its tables (never dereferencing it)
    // and writes one unsigned int into a local; an unknown address is an error.
    let rc = unsafe {
        sys::cuPointerGetAttribute(
            (&mut kind as *mut c_uint).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr as CUdeviceptr,
        )
    };
    if rc != CUresult::CUDA_SUCCESS || kind != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as c_uint {
        return None;
    }
    let mut ordinal: c_int = -1;
    // SAFETY: as above; writes one int into a local.
    let rc = unsafe {
        sys::cuPointerGetAttribute(
            (&mut ordinal as *mut c_int).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr as CUdeviceptr,
        )
    };
    (rc == CUresult::CUDA_SUCCESS && ordinal >= 0).then_some(ordinal)
}

/// Copy host bytes to device memory in stream order on `s`. From pageable host memory the
/// driver stages the bytes before returning, so `src` may be dropped afterwards.
///
/// # Safety
/// `dst .. dst + src.len()` must be device memory the caller owns until the copy has run;
/// `s` live or null.
pub(crate) unsafe fn memcpy_htod_async(dst: CUdeviceptr, src: &[u8], s: CUstream) -> CuResult<()> {
    // SAFETY: `src` is a valid host slice for the call (staged by the driver before it
    // returns); the caller guarantees the destination range and the stream.
    check(
        unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), src.len(), s) },
        "cuMemcpyHtoDAsync",
    )
}

/// Copy `bytes` between device addresses in stream order (unified addressing: the two may be
/// on different devices, with or without peer access).
///
/// # Safety
/// Both ranges must be device memory the caller keeps allocated until the copy has run;
/// `s` live or null.
pub(crate) unsafe fn memcpy_async(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
    s: CUstream,
) -> CuResult<()> {
    // SAFETY: the caller guarantees both ranges and the stream; the driver reads and writes
    // only those.
    check(
        unsafe { sys::cuMemcpyAsync(dst, src, bytes, s) },
        "cuMemcpyAsync",
    )
}

/// Number of nodes of a captured graph.
///
/// # Safety
/// `g` must be a live graph.
pub(crate) unsafe fn graph_node_count(g: CUgraph) -> CuResult<usize> {
    let mut count = 0usize;
    check(
        // SAFETY: the caller guarantees `g`; with a null node array the driver only writes
        // the count into our local.
        unsafe { sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut count) },
        "cuGraphGetNodes",
    )?;
    Ok(count)
}

/// The driver symbols the wrappers above call (checked at probe time with [`SYMBOLS`]).
pub(crate) const HOOKS_SYMBOLS: &[&str] = &[
    "cuDevicePrimaryCtxGetState",
    "cuMemcpyHtoDAsync_v2",
    "cuGraphGetNodes",
    "cuMemcpyAsync",
];
