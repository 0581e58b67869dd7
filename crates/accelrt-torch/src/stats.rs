//! Statistics: PyTorch's `memory_stats()` as JSON and as the header's array, resetting
//! peaks and totals, and the cache estimate cuDNN sizes its workspace by.

use std::ffi::{c_char, c_int};
use std::ptr::null_mut;

use accelrt::alloc::MemoryStats;

use crate::errors::{guard, Failure, Report};
use crate::state::state;
use crate::{malloc_copy, status, STATS_LEN};

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

/// PyTorch's `memory_stats()` of `device` as a JSON object with its flat keys
/// (`allocated_bytes.all.current`, `num_ooms`, ...), NUL-terminated; free it with
/// [`accelrt_torch_free_buffer`](crate::accelrt_torch_free_buffer). NULL on failure.
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

/// Record, on every device from now on (`on` != 0) or no longer (`on` == 0), where reserved
/// memory is each time it reaches a new peak (`accelrt::alloc::PeakBreakdown`: a walk over
/// the blocks on the slow path that raised the peak). 0, or -1.
#[no_mangle]
pub extern "C" fn accelrt_torch_record_peak_breakdown(on: c_int) -> c_int {
    status("accelrt_torch_record_peak_breakdown", || {
        state()?.set_peak_breakdown_all(on != 0);
        Ok(())
    })
}

/// Where `device`'s reserved memory was at its last new peak, as a JSON object (`reserved`,
/// `allocated`, `free_in_shared_pages`, `free_in_used_chunks`, `idle_chunks`,
/// `spare_chunks`, `free_in_segments`, `other`: bytes), or `null` when none was recorded
/// (recording off, or no peak since it was turned on), NUL-terminated; free it with
/// [`accelrt_torch_free_buffer`](crate::accelrt_torch_free_buffer). NULL on failure.
#[no_mangle]
pub extern "C" fn accelrt_torch_peak_breakdown_json(device: c_int) -> *mut c_char {
    guard(
        "accelrt_torch_peak_breakdown_json",
        null_mut(),
        Report::Status,
        || {
            let st = state()?;
            let d = st.check_device(device)?;
            let breakdown = st.existing_allocator(d).and_then(|a| a.peak_breakdown());
            let json = serde_json::to_string(&breakdown)
                .map_err(|e| format!("cannot encode the peak breakdown: {e}"))?;
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
