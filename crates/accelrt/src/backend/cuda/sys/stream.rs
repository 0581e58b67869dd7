//! Streams, events and graphs.

use std::ffi::{c_uint, c_void};

use cudarc::driver::sys;

use super::{check, check_ready, CuResult};
use super::{CUcontext, CUevent, CUgraph, CUgraphExec, CUstream};

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
