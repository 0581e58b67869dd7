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
pub mod ipc;
pub mod record;
mod state;

use std::ffi::{c_char, c_int, c_void};
use std::ptr::null_mut;
use std::sync::Arc;

use accelrt::alloc::{HistoryConfig, MemoryStats, StreamFilter};
use accelrt::snapshot::Snapshot;
use accelrt::{AllocError, Device, MempoolId, Stream};
use parking_lot::Mutex;

use capture::RelaxedCapture;
use errors::{guard, Failure, Report};
pub use errors::{last_error, last_oom, OomFigures};
use state::{state, State};
pub use state::{use_backend, BACKEND_ENV};

/// Values [`accelrt_torch_stats_array`] writes (`ACCELRT_TORCH_STATS_LEN` in the header).
pub const STATS_LEN: usize = 113;

/// A stream filter: non-zero to accept `stream` (a native stream handle).
pub type FilterFn = Option<unsafe extern "C" fn(ctx: *mut c_void, stream: *mut c_void) -> c_int>;
/// Frees a filter's context.
pub type DropFn = Option<unsafe extern "C" fn(ctx: *mut c_void)>;

/// Serialises the check-then-act steps of the pool functions (create or add a use, begin).
static POOLS: Mutex<()> = Mutex::new(());

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

// ---- private pools ---------------------------------------------------------------------------

/// A stream filter from C: the function, its context, and who frees the context.
struct ForeignFilter {
    accept: FilterFn,
    ctx: *mut c_void,
    drop_ctx: DropFn,
}

// SAFETY: the header's contract for begin_allocate_to_pool: `filter(ctx, ..)` is callable from
// any thread, concurrently, until `drop_ctx(ctx)`, which this type calls once, in `Drop`.
unsafe impl Send for ForeignFilter {}
// SAFETY: as above.
unsafe impl Sync for ForeignFilter {}

impl ForeignFilter {
    fn accepts(&self, handle: u64) -> bool {
        match self.accept {
            // SAFETY: the header's contract (see the Send impl); the function must not unwind.
            Some(f) => unsafe { f(self.ctx, handle as usize as *mut c_void) != 0 },
            None => true,
        }
    }
}

impl Drop for ForeignFilter {
    fn drop(&mut self) {
        if let Some(drop_ctx) = self.drop_ctx {
            // SAFETY: the library owns `ctx` (header contract) and this is its only drop.
            unsafe { drop_ctx(self.ctx) }
        }
    }
}

pub(crate) fn pool_id(id0: u64, id1: u64) -> Result<MempoolId, Failure> {
    let id = MempoolId(id0, id1);
    if id.is_none() {
        return Err(
            "pool id (0, 0) is not a pool: PyTorch's MempoolId_t of a graph or a \
                    MemPool is never (0, 0)"
                .into(),
        );
    }
    Ok(id)
}

/// Route allocations on the streams `filter` accepts to private pool `(id0, id1)` of
/// `device`, adding a use of the pool (created with one use), until
/// [`accelrt_torch_end_allocate_to_pool`]. `filter` NULL accepts every stream.
///
/// # Safety
/// `filter(ctx, stream)` must be callable from any thread until `drop_ctx(ctx)` and must not
/// unwind. The library owns `ctx` from the call on, also when the call fails, and calls
/// `drop_ctx` (when not NULL) exactly once.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_begin_allocate_to_pool(
    device: c_int,
    id0: u64,
    id1: u64,
    filter: FilterFn,
    ctx: *mut c_void,
    drop_ctx: DropFn,
) -> c_int {
    // Owned before anything can fail, so every path drops the context exactly once.
    let filter = ForeignFilter {
        accept: filter,
        ctx,
        drop_ctx,
    };
    status("accelrt_torch_begin_allocate_to_pool", || {
        let id = pool_id(id0, id1)?;
        let st = state()?;
        let a = st.allocator(device)?;
        let d = device as u32;
        let _pools = POOLS.lock();
        if st.route_open(d, id) {
            return Err(format!(
                "already allocating to pool ({id0}, {id1}) on {}: end_allocate_to_pool first",
                device_name(st, device)
            )
            .into());
        }
        let stream_filter = match filter.accept {
            None => StreamFilter::All,
            Some(_) => {
                let filter = Arc::new(filter);
                let backend = st.backend;
                StreamFilter::Custom(Arc::new(move |s: Stream| {
                    backend
                        .stream_native_handle(s)
                        .is_ok_and(|h| filter.accepts(h))
                }))
            }
        };
        let existed = a.pool_use_count(id).is_some();
        if existed {
            a.retain_pool(id).map_err(|e| e.to_string())?;
        }
        if let Err(e) = a.begin_allocate_to_pool(id, stream_filter) {
            if existed {
                let _ = a.release_pool(id);
            }
            return Err(format!("{}: {e}", device_name(st, device)).into());
        }
        st.set_route(d, id, true);
        Ok(())
    })
}

/// Stop routing allocations to pool `(id0, id1)` of `device` (its memory stays reserved).
#[no_mangle]
pub extern "C" fn accelrt_torch_end_allocate_to_pool(device: c_int, id0: u64, id1: u64) -> c_int {
    status("accelrt_torch_end_allocate_to_pool", || {
        let id = pool_id(id0, id1)?;
        let st = state()?;
        let a = st.allocator(device)?;
        let _pools = POOLS.lock();
        a.end_allocate_to_pool(id)
            .map_err(|e| format!("{}: {e}", device_name(st, device)))?;
        st.set_route(device as u32, id, false);
        Ok(())
    })
}

/// Drop a use of pool `(id0, id1)` of `device`; at zero its cached memory goes back now and
/// the rest as its blocks are freed.
#[no_mangle]
pub extern "C" fn accelrt_torch_release_pool(device: c_int, id0: u64, id1: u64) -> c_int {
    status("accelrt_torch_release_pool", || {
        let id = pool_id(id0, id1)?;
        let st = state()?;
        let a = st.allocator(device)?;
        let _pools = POOLS.lock();
        maybe_relaxed(st, || a.release_pool(id))
            .map_err(|e| format!("{}: {e}", device_name(st, device)))?;
        if a.pool_use_count(id).is_none_or(|uses| uses == 0) {
            // At zero the allocator dropped the pool's routes.
            st.set_route(device as u32, id, false);
        }
        Ok(())
    })
}

/// Add a use of pool `(id0, id1)` of `device`, creating it with one use
/// (`torch.cuda.MemPool`'s constructor).
#[no_mangle]
pub extern "C" fn accelrt_torch_create_or_incref_pool(device: c_int, id0: u64, id1: u64) -> c_int {
    status("accelrt_torch_create_or_incref_pool", || {
        let id = pool_id(id0, id1)?;
        let st = state()?;
        let a = st.allocator(device)?;
        let _pools = POOLS.lock();
        let r = if a.pool_use_count(id).is_some() {
            a.retain_pool(id)
        } else {
            // A pool is created by beginning to allocate to it; a filter that accepts no
            // stream routes nothing, and the route ends at once.
            a.begin_allocate_to_pool(id, StreamFilter::Custom(Arc::new(|_| false)))
                .and_then(|()| a.end_allocate_to_pool(id))
        };
        r.map_err(|e| format!("{}: {e}", device_name(st, device)).into())
    })
}

/// Uses of pool `(id0, id1)` of `device` (0 when there is no such pool), or -1 on failure.
#[no_mangle]
pub extern "C" fn accelrt_torch_pool_use_count(device: c_int, id0: u64, id1: u64) -> c_int {
    guard("accelrt_torch_pool_use_count", -1, Report::Status, || {
        let id = pool_id(id0, id1)?;
        let uses = state()?.allocator(device)?.pool_use_count(id).unwrap_or(0);
        Ok(c_int::try_from(uses).unwrap_or(c_int::MAX))
    })
}

// ---- statistics, snapshots, history ----------------------------------------------------------

/// The statistics of `device` (zeros for a device accelrt has not allocated on yet).
fn stats_of(device: c_int) -> Result<MemoryStats, Failure> {
    let st = state()?;
    let d = st.check_device(device)?;
    Ok(st
        .existing_allocator(d)
        .map(|a| a.stats())
        .unwrap_or_default())
}

/// The values of [`accelrt_torch_stats_array`], in the header's order.
pub fn stats_values(s: &MemoryStats) -> [i64; STATS_LEN] {
    let mut out = [0i64; STATS_LEN];
    let mut n = 0;
    for v in stats_in_order(s) {
        if let Some(o) = out.get_mut(n) {
            *o = i64::try_from(v).unwrap_or(i64::MAX);
        }
        n += 1;
    }
    // The layout and STATS_LEN (and the header, Python and C++ copies of it, checked by the
    // test `stats_len_is_the_same_everywhere`) change together.
    debug_assert_eq!(n, STATS_LEN, "STATS_LEN is out of date");
    out
}

/// Every statistic in the header's order.
fn stats_in_order(s: &MemoryStats) -> impl Iterator<Item = u64> {
    let pools = [s.all().named(), s.small_pool.named(), s.large_pool.named()];
    let c = s.counters;
    let counters = [
        c.num_alloc_retries,
        c.num_ooms,
        c.num_sync_all_streams,
        c.num_device_alloc,
        c.num_device_free,
    ];
    let stats = (0..pools[0].len()).flat_map(move |i| {
        pools.into_iter().flat_map(move |p| {
            let s = p[i].1;
            [s.current, s.peak, s.allocated, s.freed]
        })
    });
    stats.chain(counters)
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

/// PyTorch's `memory_stats()` of `device` as a JSON object with its flat keys
/// (`allocated_bytes.all.current`, `num_ooms`, ...), NUL-terminated; free it with
/// [`accelrt_torch_free_buffer`]. NULL on failure.
#[no_mangle]
pub extern "C" fn accelrt_torch_memory_stats_json(device: c_int) -> *mut c_char {
    guard(
        "accelrt_torch_memory_stats_json",
        null_mut(),
        Report::Status,
        || {
            let json = serde_json::to_string(&stats_of(device)?.to_flat_map())
                .map_err(|e| format!("cannot encode the statistics: {e}"))?;
            Ok(malloc_copy(json.as_bytes(), true)?.cast())
        },
    )
}

/// Write [`STATS_LEN`] values (the header describes their order) to `out[0..len)`; returns
/// the count written, or -1.
///
/// # Safety
/// `out` must be NULL or valid for writing `len` `int64_t`s.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_stats_array(
    device: c_int,
    out: *mut i64,
    len: usize,
) -> c_int {
    guard("accelrt_torch_stats_array", -1, Report::Status, || {
        if out.is_null() {
            return Err("out is NULL: pass an array of ACCELRT_TORCH_STATS_LEN int64_t".into());
        }
        if len < STATS_LEN {
            return Err(format!(
                "out holds {len} values; accelrt_torch_stats_array writes {STATS_LEN} \
                 (ACCELRT_TORCH_STATS_LEN)"
            )
            .into());
        }
        let values = stats_values(&stats_of(device)?);
        // SAFETY: the caller guarantees `out` has room for `len >= STATS_LEN` values.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), out, STATS_LEN) };
        Ok(STATS_LEN as c_int)
    })
}

/// Set every peak statistic of `device` to its current value.
#[no_mangle]
pub extern "C" fn accelrt_torch_reset_peak_stats(device: c_int) -> c_int {
    status("accelrt_torch_reset_peak_stats", || {
        let st = state()?;
        if let Some(a) = st.existing_allocator(st.check_device(device)?) {
            a.reset_peak_stats();
        }
        Ok(())
    })
}

/// Zero the allocated/freed totals and event counters of `device`.
#[no_mangle]
pub extern "C" fn accelrt_torch_reset_accumulated_stats(device: c_int) -> c_int {
    status("accelrt_torch_reset_accumulated_stats", || {
        let st = state()?;
        if let Some(a) = st.existing_allocator(st.check_device(device)?) {
            a.reset_accumulated_stats();
        }
        Ok(())
    })
}

/// An estimate of the largest allocation `device` could satisfy now (PyTorch's
/// `cacheInfo`, which cuDNN uses to size its workspace): the bytes accelrt has cached plus
/// what the device has free, within the memory fraction when one is set.
///
/// # Safety
/// `largest` must be NULL or valid for writing one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_cache_info(device: c_int, largest: *mut usize) -> c_int {
    status("accelrt_torch_cache_info", || {
        if largest.is_null() {
            return Err("largest is NULL: pass a pointer to a size_t".into());
        }
        let st = state()?;
        let a = st.allocator(device)?;
        let all = a.stats().all();
        let cached = all
            .reserved_bytes
            .current
            .saturating_sub(all.allocated_bytes.current);
        let (free, total) = st
            .backend
            .memory_provider(device as u32)
            .map(|p| p.memory_info())
            .map_err(|e| e.to_string())?;
        let mut room = free;
        if let Some(fraction) = a.memory_fraction() {
            let cap = (total as f64 * fraction) as u64;
            room = room.min(cap.saturating_sub(all.reserved_bytes.current));
        }
        let estimate = usize::try_from(cached.saturating_add(room)).unwrap_or(usize::MAX);
        // SAFETY: checked non-NULL above; the caller guarantees it is writable.
        unsafe { *largest = estimate };
        Ok(())
    })
}

/// The snapshot of `device` (-1: every device accelrt has allocated on).
pub fn snapshot(device: c_int) -> Result<Snapshot, Failure> {
    let st = state()?;
    let devices: Vec<u32> = if device == -1 {
        st.existing_allocators().map(|(d, _)| d).collect()
    } else {
        vec![st.check_device(device)?]
    };
    let mut snaps = Vec::new();
    let mut settings = serde_json::Value::Null;
    for &d in &devices {
        if let Some(a) = st.existing_allocator(d) {
            snaps.push(a.memory_snapshot());
            settings = accelrt::snapshot::settings_json(a.config());
        }
    }
    let mut snap = Snapshot::from_memory_snapshots(&snaps, settings);
    // PyTorch's snapshots name streams by their handles: stream index i of device d is
    // handle stream_handles[d][i] (the runtime's streams are numbered 0..n).
    snap.stream_handles = vec![Vec::new(); snap.device_traces.len()];
    for &d in &devices {
        if let Some(handles) = snap.stream_handles.get_mut(d as usize) {
            *handles = (0..accelrt::alloc::MAX_STREAM_POOLS as u32)
                .map_while(|index| {
                    st.native_handle(Stream {
                        device: Device {
                            kind: st.kind,
                            index: d,
                        },
                        index,
                    })
                })
                .collect();
        }
    }
    Ok(snap)
}

/// A snapshot of `device` (-1: every device in use) in PyTorch's pickle layout
/// (`torch.cuda.memory._snapshot()`; <https://pytorch.org/memory_viz> reads it). Its size
/// goes to `*len`; free it with [`accelrt_torch_free_buffer`]. NULL on failure.
///
/// # Safety
/// `len` must be NULL or valid for writing one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_snapshot_pickle(device: c_int, len: *mut usize) -> *mut u8 {
    guard(
        "accelrt_torch_snapshot_pickle",
        null_mut(),
        Report::Status,
        || {
            if len.is_null() {
                return Err("len is NULL: pass a pointer to a size_t for the size".into());
            }
            let bytes = snapshot(device)?.to_pickle();
            let p = malloc_copy(&bytes, false)?;
            // SAFETY: checked non-NULL above; the caller guarantees it is writable.
            unsafe { *len = bytes.len() };
            Ok(p)
        },
    )
}

/// Start (`enabled` != 0, keeping at most `max_entries` events) or stop recording the
/// allocator's history on `device` (-1: every device, including devices used later).
#[no_mangle]
pub extern "C" fn accelrt_torch_record_history(
    device: c_int,
    enabled: c_int,
    max_entries: usize,
) -> c_int {
    status("accelrt_torch_record_history", || {
        let config = if enabled != 0 {
            if max_entries == 0 {
                return Err("max_entries is 0: pass how many events to keep (PyTorch's \
                            default is 100000)"
                    .into());
            }
            Some(HistoryConfig {
                max_entries,
                context: false,
            })
        } else {
            None
        };
        let st = state()?;
        if device == -1 {
            st.set_history_all(config);
        } else {
            st.allocator(device)?.record_memory_history(config);
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
