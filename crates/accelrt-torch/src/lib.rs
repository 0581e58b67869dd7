//! accelrt as PyTorch's CUDA allocator.
//!
//! `libaccelrt_torch.so` is a library PyTorch loads with
//! `torch.cuda.memory.CUDAPluggableAllocator(path, "accelrt_torch_alloc", "accelrt_torch_free")`:
//! allocations go through accelrt's caching allocator for the device (configured by
//! `ACCELRT_ALLOC_CONF`), on PyTorch's own streams (wrapped, never owned). Besides the two
//! functions PyTorch requires, the library has the optional hooks its pluggable allocator
//! accepts (init, empty cache, memory fraction, record_stream, and the private-pool trio that
//! graph capture and `torch.cuda.MemPool` use), and what a pluggable allocator normally loses:
//! PyTorch's `memory_stats()` keys, snapshots in PyTorch's pickle layout, memory history, and
//! out-of-memory figures. The `accelrt_torch` package in `python/` (its C++ shim implements
//! PyTorch's whole `CUDAAllocator` over this ABI, see [`full`]) wires all of it into PyTorch.
//!
//! The C declarations, with the contract of each function, are in
//! `crates/accelrt-torch/include/accelrt_torch.h`. No call unwinds or crashes on bad input:
//! every body runs under `catch_unwind`, and failures return NULL / -1 with the message in
//! [`accelrt_torch_last_error`] (per thread).
//!
//! Rust callers (tests) can call the `extern "C"` functions directly, and choose the backend
//! with [`use_backend`] before the first call (C callers: `ACCELRT_TORCH_BACKEND=host`).

mod capture;
pub mod checkpoint;
mod errors;
pub mod full;
mod history;
pub mod ipc;
mod pools;
pub mod record;
mod state;
mod stats;
mod trackers;

use std::ffi::{c_char, c_int, c_void};
use std::ptr::null_mut;

use accelrt::AllocError;

use capture::RelaxedCapture;
use errors::{guard, Failure, Report};
pub use errors::{last_error, last_oom, OomFigures};
use state::{state, State};
pub use state::{use_backend, BACKEND_ENV};

pub use history::{accelrt_torch_record_history, accelrt_torch_snapshot_pickle, snapshot};
pub(crate) use pools::pool_id;
pub use pools::{
    accelrt_torch_begin_allocate_to_pool, accelrt_torch_create_or_incref_pool,
    accelrt_torch_end_allocate_to_pool, accelrt_torch_pool_use_count, accelrt_torch_release_pool,
};
pub use stats::{
    accelrt_torch_cache_info, accelrt_torch_memory_stats_json, accelrt_torch_peak_breakdown_json,
    accelrt_torch_record_peak_breakdown, accelrt_torch_reset_accumulated_stats,
    accelrt_torch_reset_peak_stats, accelrt_torch_stats_array, stats_values,
};

/// Values [`accelrt_torch_stats_array`] writes (`ACCELRT_TORCH_STATS_LEN` in the header).
pub const STATS_LEN: usize = 113;

/// A stream filter: non-zero to accept `stream` (a native stream handle).
pub type FilterFn = Option<unsafe extern "C" fn(ctx: *mut c_void, stream: *mut c_void) -> c_int>;
/// Frees a filter's context.
pub type DropFn = Option<unsafe extern "C" fn(ctx: *mut c_void)>;

pub(crate) fn status(name: &str, body: impl FnOnce() -> Result<(), Failure>) -> c_int {
    guard(name, -1, Report::Status, || body().map(|()| 0))
}

/// Run `f` in relaxed capture mode when a route to a private pool is in force (a graph may
/// be capturing; see `capture.rs`).
#[inline]
pub(crate) fn maybe_relaxed<R>(st: &State, f: impl FnOnce() -> R) -> R {
    if st.routes_active() {
        let _relaxed = RelaxedCapture::enter();
        f()
    } else {
        f()
    }
}

pub(crate) fn device_name(st: &State, device: c_int) -> String {
    format!("{}:{device}", st.kind)
}

/// Copy `bytes` (and a NUL when `nul`) into a `malloc`ed buffer for
/// [`accelrt_torch_free_buffer`].
pub(crate) fn malloc_copy(bytes: &[u8], nul: bool) -> Result<*mut u8, Failure> {
    let n = bytes.len() + usize::from(nul);
    // SAFETY: plain malloc of at least one byte; the result is checked for NULL below.
    let p = unsafe { libc::malloc(n.max(1)) }.cast::<u8>();
    if p.is_null() {
        return Err(format!("out of host memory for a {n}-byte result").into());
    }
    // SAFETY: `p` holds `n >= bytes.len()` bytes and is a fresh allocation, distinct from
    // `bytes`; the NUL goes at index `bytes.len() < n` when `nul`.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        if nul {
            *p.add(bytes.len()) = 0;
        }
    }
    Ok(p)
}

// ---- allocation ------------------------------------------------------------------------

/// PyTorch's allocation function: `size` bytes on `device` for use on `stream`.
///
/// Returns NULL for a size of 0 (nothing to allocate; not an error) and on failure, with
/// the reason in [`accelrt_torch_last_error`] (an out-of-memory also in
/// [`accelrt_torch_last_oom`]).
///
/// # Safety
/// `stream` must be NULL (the legacy default stream) or a live stream of `device` (CUDA: of
/// its primary context) that stays alive while memory allocated on it is in use.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_alloc(
    size: isize,
    device: c_int,
    stream: *mut c_void,
) -> *mut c_void {
    guard("accelrt_torch_alloc", null_mut(), Report::Alloc, || {
        // SAFETY: forwarded from this function's contract.
        unsafe { alloc(size, device, stream) }.map(|p| p as *mut c_void)
    })
}

/// # Safety
/// As [`accelrt_torch_alloc`].
#[inline]
unsafe fn alloc(size: isize, device: c_int, stream: *mut c_void) -> Result<usize, Failure> {
    if size <= 0 {
        return match size {
            0 => Ok(0),
            _ => Err(format!(
                "cannot allocate {size} bytes on device {device}: the size is negative"
            )
            .into()),
        };
    }
    let st = state().map_err(|f| cannot_alloc(size, device, None, f))?;
    let allocator = st
        .allocator(device)
        .map_err(|f| cannot_alloc(size, device, Some(st), f))?;
    let handle = stream;
    // SAFETY: forwarded from this function's contract (`device` was checked above).
    let stream = unsafe { st.stream(device as u32, stream as usize) }
        .map_err(|f| cannot_alloc(size, device, Some(st), f))?;
    let ptr = maybe_relaxed(st, || allocator.raw_alloc(size as usize, stream))
        .map_err(|e| alloc_error(st, size, device, e))?;
    if record::active() {
        record::on_alloc(
            st,
            ptr,
            size as usize,
            device as u32,
            handle as usize,
            stream,
        );
    }
    Ok(ptr)
}

#[cold]
fn cannot_alloc(size: isize, device: c_int, st: Option<&State>, f: Failure) -> Failure {
    let on = st.map_or(format!("device {device}"), |st| device_name(st, device));
    format!("cannot allocate {size} bytes on {on}: {}", f.message).into()
}

#[cold]
fn alloc_error(st: &State, size: isize, device: c_int, e: AllocError) -> Failure {
    match &e {
        AllocError::OutOfMemory(report) => Failure {
            oom: Some(OomFigures {
                requested: report.requested,
                device_total: report.device_total,
                device_free: report.device_free,
                allocated: report.allocated,
            }),
            message: e.to_string(),
        },
        // The allocator's own refusals already say what was asked and where ("cannot
        // allocate N bytes on host:0: ..."): passed on as they are, not prefixed again.
        AllocError::InvalidArgument(m)
            if m.starts_with(&format!("cannot allocate {size} bytes")) =>
        {
            m.clone().into()
        }
        _ => cannot_alloc(size, device, Some(st), e.to_string().into()),
    }
}

/// PyTorch's free function: give back what [`accelrt_torch_alloc`] returned. `size`,
/// `device` and `stream` are PyTorch's record of the allocation; the block returns to the
/// pool that owns it. NULL is ignored. A pointer accelrt did not hand out is refused
/// (logged to stderr, kept in [`accelrt_torch_last_error`]) and nothing changes.
///
/// # Safety
/// The memory must no longer be used by work the caller has not ordered after the free
/// (PyTorch's own contract for its allocator).
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_free(
    ptr: *mut c_void,
    size: isize,
    device: c_int,
    _stream: *mut c_void,
) {
    guard("accelrt_torch_free", (), Report::Log, || {
        free(ptr, size, device)
    })
}

fn free(ptr: *mut c_void, size: isize, device: c_int) -> Result<(), Failure> {
    if ptr.is_null() {
        return Ok(());
    }
    let addr = ptr as usize;
    let st = state().map_err(|f| {
        format!(
            "cannot free {addr:#x} ({size} bytes on device {device}): {}",
            f.message
        )
    })?;
    let first = match st.allocator(device) {
        Ok(a) => match maybe_relaxed(st, || a.raw_free(addr)) {
            Ok(()) => {
                if record::active() {
                    record::on_free(st, addr);
                }
                return Ok(());
            }
            Err(e) => e.to_string(),
        },
        Err(f) => f.message,
    };
    // PyTorch's record names the device; memory of another device's allocator is freed there.
    if let Some((_, a)) = st
        .existing_allocators()
        .find(|&(d, a)| d as c_int != device && a.contains(addr))
    {
        maybe_relaxed(st, || a.raw_free(addr)).map_err(|e| e.to_string())?;
        if record::active() {
            record::on_free(st, addr);
        }
        return Ok(());
    }
    Err(format!(
        "cannot free {addr:#x} ({size} bytes on {} by PyTorch's record): {first}",
        device_name(st, device)
    )
    .into())
}

// ---- optional hooks ----------------------------------------------------------------------

/// PyTorch's CUDA initialisation hook: checks that accelrt sees `device_count` devices too
/// (both read `CUDA_VISIBLE_DEVICES`). 0, or -1 with the reason in the last error.
#[no_mangle]
pub extern "C" fn accelrt_torch_init(device_count: c_int) -> c_int {
    status("accelrt_torch_init", || {
        let st = state()?;
        if u32::try_from(device_count).ok() != Some(st.device_count) {
            return Err(format!(
                "PyTorch sees {device_count} device(s) but accelrt's {} backend sees {}: both \
                 read CUDA_VISIBLE_DEVICES, so set it before the process starts",
                st.kind, st.device_count
            )
            .into());
        }
        Ok(())
    })
}

/// `torch.cuda.empty_cache()`: every cached segment of every device goes back (after the
/// streams that used it have passed). 0, or -1 with the first error in the last error.
#[no_mangle]
pub extern "C" fn accelrt_torch_empty_cache() -> c_int {
    status("accelrt_torch_empty_cache", || {
        let st = state()?;
        let mut first = None;
        for (d, a) in st.existing_allocators() {
            if let Err(e) = maybe_relaxed(st, || a.empty_cache()) {
                first.get_or_insert_with(|| format!("{}:{d}: {e}", st.kind));
            }
        }
        first.map_or(Ok(()), |m| Err(m.into()))
    })
}

/// `torch.cuda.set_per_process_memory_fraction(fraction, device)`: cap what accelrt
/// reserves on `device` at `fraction` of its memory, in [0, 1] (0 allows nothing, as in PyTorch).
#[no_mangle]
pub extern "C" fn accelrt_torch_set_memory_fraction(fraction: f64, device: c_int) -> c_int {
    status("accelrt_torch_set_memory_fraction", || {
        let st = state()?;
        st.allocator(device)?
            .set_memory_fraction(fraction)
            .map_err(|e| format!("{}: {e}", device_name(st, device)).into())
    })
}

/// `torch.cuda.memory._set_allocator_settings(..)`'s rounding knobs, for every device, now
/// and for devices first used later: `divisions` holds `len` entries, the
/// `roundup_power2_divisions` of the size intervals from 1 MiB upwards (interval `i` holds
/// requests of `2^i` MiB up to twice that; the first also everything smaller, the last also
/// everything larger; missing intervals take the last entry given), each 0 or a power of two;
/// `garbage_collection_threshold` in (0, 1), or 0 for none. Nothing changes on an error.
///
/// # Safety
/// `divisions` points at `len` readable `u32`s (it may be null when `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_set_rounding(
    divisions: *const u32,
    len: usize,
    garbage_collection_threshold: f64,
) -> c_int {
    status("accelrt_torch_set_rounding", || {
        let given: &[u32] = if len == 0 {
            &[]
        } else if divisions.is_null() {
            return Err(format!(
                "divisions is null with a length of {len}: pass the table's address"
            )
            .into());
        } else {
            // SAFETY: the caller promises `len` readable entries at `divisions`.
            unsafe { std::slice::from_raw_parts(divisions, len) }
        };
        if len > 1 << 16 {
            return Err(format!(
                "{len} division entries: accelrt has {} size intervals; pass at most that many",
                accelrt::alloc::ROUNDUP_INTERVALS
            )
            .into());
        }
        let last = given.last().copied().unwrap_or(0);
        let table: [u32; accelrt::alloc::ROUNDUP_INTERVALS] =
            std::array::from_fn(|i| given.get(i).copied().unwrap_or(last));
        let gc = (garbage_collection_threshold != 0.0).then_some(garbage_collection_threshold);
        state()?.set_rounding_all(table, gc)
    })
}

/// The memory fraction set on `device` (1.0 when none is set), or -1.0 on failure.
#[no_mangle]
pub extern "C" fn accelrt_torch_get_memory_fraction(device: c_int) -> f64 {
    guard(
        "accelrt_torch_get_memory_fraction",
        -1.0,
        Report::Status,
        || Ok(state()?.allocator(device)?.memory_fraction().unwrap_or(1.0)),
    )
}

/// `Tensor.record_stream(stream)`: the block at `ptr` is not reused until the work queued
/// on `stream` up to its free has completed.
///
/// # Safety
/// `stream` as in [`accelrt_torch_alloc`], for the device that owns `ptr`.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_record_stream(
    ptr: *mut c_void,
    stream: *mut c_void,
) -> c_int {
    status("accelrt_torch_record_stream", || {
        if ptr.is_null() {
            return Err(
                "record_stream of a NULL pointer: pass a pointer from accelrt_torch_alloc".into(),
            );
        }
        let addr = ptr as usize;
        let st = state()?;
        let (d, a) = st
            .existing_allocators()
            .find(|(_, a)| a.contains(addr))
            .ok_or_else(|| {
                format!(
                    "record_stream: {addr:#x} is not memory accelrt allocated (no {} device's \
                     allocator holds it)",
                    st.kind
                )
            })?;
        // SAFETY: forwarded from this function's contract.
        let s = unsafe { st.stream(d, stream as usize) }?;
        maybe_relaxed(st, || a.record_stream(addr, s)).map_err(|e| e.to_string())?;
        if record::active() {
            record::on_record_stream(st, addr, d, stream as usize, s);
        }
        Ok(())
    })
}

// ---- errors, buffers, identity ------------------------------------------------------------

/// The calling thread's last error message ("" when there has been none). Valid until the
/// next failing call on this thread.
#[no_mangle]
pub extern "C" fn accelrt_torch_last_error() -> *const c_char {
    errors::last_ptr()
}

/// 1 when the calling thread's last failure was an out-of-memory, with `out[0..4)` = bytes
/// requested, device total, device free, bytes allocated by accelrt; else 0 (-1 when `out`
/// is NULL).
///
/// # Safety
/// `out` must be NULL or valid for writing four `int64_t`s.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_last_oom(out: *mut i64) -> c_int {
    if out.is_null() {
        return -1;
    }
    let Some(o) = last_oom() else { return 0 };
    let values = [o.requested, o.device_total, o.device_free, o.allocated]
        .map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    // SAFETY: checked non-NULL; the caller guarantees room for four values.
    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), out, 4) };
    1
}

/// Whether failed allocations are logged to stderr too (default on). A caller that raises
/// them as exceptions turns it off.
#[no_mangle]
pub extern "C" fn accelrt_torch_set_log_alloc_failures(enabled: c_int) {
    errors::LOG_ALLOC_FAILURES.store(enabled != 0, std::sync::atomic::Ordering::Relaxed);
}

/// Free a buffer returned by [`accelrt_torch_memory_stats_json`] or
/// [`accelrt_torch_snapshot_pickle`]. NULL is ignored.
///
/// # Safety
/// `buffer` must be NULL or a buffer from one of those functions, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_free_buffer(buffer: *mut c_void) {
    // SAFETY: the caller guarantees it came from `malloc_copy` (libc::malloc) or is NULL.
    unsafe { libc::free(buffer) }
}

/// The library's version, e.g. `0.1.0`.
#[no_mangle]
pub extern "C" fn accelrt_torch_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The number of devices accelrt sees, or -1 when its backend is unavailable (the last
/// error says why).
#[no_mangle]
pub extern "C" fn accelrt_torch_device_count() -> c_int {
    guard("accelrt_torch_device_count", -1, Report::Status, || {
        Ok(c_int::try_from(state()?.device_count).unwrap_or(c_int::MAX))
    })
}
