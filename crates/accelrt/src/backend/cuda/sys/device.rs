//! Initialisation, devices and contexts.

use std::ffi::{c_char, c_int, c_uint};

use cudarc::driver::sys;

use super::{check, CuResult};
use super::{CUcontext, CUdevice, CUresult};

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
