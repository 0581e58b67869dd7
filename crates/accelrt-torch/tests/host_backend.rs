//! The whole C ABI on accelrt's host backend (what `ACCELRT_TORCH_BACKEND=host` selects):
//! allocations on PyTorch-style stream handles, statistics in both forms, snapshots and
//! history, private pools with foreign filters, record_stream, memory fraction and
//! out-of-memory figures. The tests share device 0, so they run one at a time.

use std::collections::BTreeMap;
use std::ffi::{c_int, c_void, CStr};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use accelrt::alloc::{BlockStatus, TraceAction};
use accelrt::{Backend, DeviceType, StreamPriority};
use accelrt_torch::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn setup() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use_backend(DeviceType::Host).expect("these tests use the host backend");
    guard
}

fn host() -> &'static dyn Backend {
    accelrt::backend(DeviceType::Host)
}

fn last() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next error.
    unsafe { CStr::from_ptr(accelrt_torch_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A pooled host stream's native handle, as PyTorch would pass a side stream.
fn side_stream() -> *mut c_void {
    let s = host().stream_from_pool(0, StreamPriority::Normal).unwrap();
    host().stream_native_handle(s).unwrap() as usize as *mut c_void
}

fn alloc(size: isize, stream: *mut c_void) -> usize {
    // SAFETY: `stream` is NULL (the default stream) or a live host stream's handle.
    let p = unsafe { accelrt_torch_alloc(size, 0, stream) } as usize;
    assert_ne!(p, 0, "alloc({size}) failed: {}", last());
    p
}

fn free(p: usize) {
    // SAFETY: freeing is checked; nothing uses the memory.
    unsafe { accelrt_torch_free(p as *mut c_void, 0, 0, null_mut()) }
}

fn stats() -> BTreeMap<String, u64> {
    let p = accelrt_torch_memory_stats_json(0);
    assert!(!p.is_null(), "{}", last());
    // SAFETY: a NUL-terminated buffer from the library, freed right after.
    let json = unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned();
    // SAFETY: from accelrt_torch_memory_stats_json, not yet freed.
    unsafe { accelrt_torch_free_buffer(p.cast()) };
    serde_json::from_str(&json).expect("the statistics are a JSON object of numbers")
}

fn snapshot() -> accelrt::snapshot::Snapshot {
    let mut len = 0usize;
    // SAFETY: `len` is a live local.
    let p = unsafe { accelrt_torch_snapshot_pickle(-1, &mut len) };
    assert!(!p.is_null(), "{}", last());
    // SAFETY: `len` bytes from the library, freed right after the copy.
    let bytes = unsafe { std::slice::from_raw_parts(p, len) }.to_vec();
    // SAFETY: from accelrt_torch_snapshot_pickle, not yet freed.
    unsafe { accelrt_torch_free_buffer(p.cast()) };
    accelrt::snapshot::parse_bytes("accelrt_torch_snapshot_pickle", &bytes)
        .expect("the pickle reads back as a PyTorch snapshot")
}

fn pool_of(snap: &accelrt::snapshot::Snapshot, ptr: usize) -> Option<(u64, u64)> {
    snap.segments
        .iter()
        .find(|s| {
            s.blocks
                .iter()
                .any(|b| b.address == ptr as u64 && b.state == BlockStatus::ActiveAllocated)
        })
        .map(|s| s.segment_pool_id)
}

#[test]
fn allocations_follow_pytorchs_streams_and_show_in_both_statistics() {
    let _g = setup();
    let before = stats();
    let p = alloc(3 << 20, null_mut());
    let q = alloc(4096, side_stream());
    let s = stats();
    assert_eq!(
        s["allocation.all.current"],
        before["allocation.all.current"] + 2
    );
    assert_eq!(
        s["requested_bytes.all.current"],
        before["requested_bytes.all.current"] + (3 << 20) + 4096
    );
    assert!(
        s["allocated_bytes.all.current"]
            >= before["allocated_bytes.all.current"] + (3 << 20) + 4096
    );

    let mut values = [0i64; STATS_LEN];
    // SAFETY: room for STATS_LEN values.
    let n = unsafe { accelrt_torch_stats_array(0, values.as_mut_ptr(), STATS_LEN) };
    assert_eq!(n, STATS_LEN as c_int);
    // (stat, pool, field): allocated_bytes = 4, reserved_bytes = 5; all = 0; current, peak.
    let at = |stat: usize, pool: usize, field: usize| values[(stat * 3 + pool) * 4 + field] as u64;
    assert_eq!(at(4, 0, 0), s["allocated_bytes.all.current"]);
    assert_eq!(at(4, 1, 0), s["allocated_bytes.small_pool.current"]);
    assert_eq!(at(4, 2, 0), s["allocated_bytes.large_pool.current"]);
    assert_eq!(at(5, 0, 1), s["reserved_bytes.all.peak"]);
    assert_eq!(values[109] as u64, s["num_ooms"]);
    assert_eq!(values[111] as u64, s["num_device_alloc"]);

    free(p);
    free(q);
    assert_eq!(
        stats()["allocation.all.current"],
        before["allocation.all.current"]
    );

    free(p);
    assert!(last().contains("double free"), "{}", last());
    free(0x10);
    assert!(last().starts_with("cannot free 0x10"), "{}", last());
    // SAFETY: refused before the stream is used.
    assert!(unsafe { accelrt_torch_alloc(16, 7, null_mut()) }.is_null());
    assert!(
        last().contains("invalid device index 7 for the host backend"),
        "{}",
        last()
    );
    // SAFETY: the host backend refuses a handle it does not know without using it.
    assert!(unsafe { accelrt_torch_alloc(16, 0, 0xdead as *mut c_void) }.is_null());
    assert!(last().contains("stream 0xdead"), "{}", last());
    assert_eq!(accelrt_torch_memory_stats_json(-1), null_mut());
    assert!(last().contains("invalid device index -1"), "{}", last());
}

#[test]
fn snapshots_carry_segments_history_and_stream_handles() {
    let _g = setup();
    assert_eq!(accelrt_torch_record_history(-1, 1, 1000), 0, "{}", last());
    let side = side_stream();
    let p = alloc(5 << 20, side);
    let snap = snapshot();
    assert_eq!(
        pool_of(&snap, p),
        Some((0, 0)),
        "the live block is in the snapshot"
    );
    let entry = snap.device_traces[0]
        .iter()
        .find(|e| e.action == TraceAction::Alloc && e.addr == p as u64)
        .expect("the allocation is in the history");
    assert_eq!(entry.size, 5 << 20);
    // PyTorch's snapshots name streams by handle: the side stream's comes back.
    assert_eq!(
        snap.stream_handles[0].get(entry.stream as usize).copied(),
        Some(side as usize as u64),
        "handles: {:?}",
        snap.stream_handles
    );
    free(p);
    assert_eq!(accelrt_torch_record_history(-1, 0, 0), 0);
    let n = snapshot().device_traces[0].len();
    let q = alloc(4096, null_mut());
    free(q);
    assert_eq!(
        snapshot().device_traces[0].len(),
        n,
        "stopped: nothing more is recorded"
    );
}

static DROPS: AtomicUsize = AtomicUsize::new(0);

/// Accepts exactly the stream whose handle is `ctx`.
unsafe extern "C" fn only(ctx: *mut c_void, stream: *mut c_void) -> c_int {
    c_int::from(ctx == stream)
}

unsafe extern "C" fn count_drop(_ctx: *mut c_void) {
    DROPS.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn private_pools_route_the_filtered_streams_and_count_their_uses() {
    let _g = setup();
    let side = side_stream();
    let drops = DROPS.load(Ordering::SeqCst);
    // A graph capture on `side`: only its allocations go to pool (7, 0).
    // SAFETY: the filter and drop functions are thread-safe and never unwind.
    let rc = unsafe {
        accelrt_torch_begin_allocate_to_pool(0, 7, 0, Some(only), side, Some(count_drop))
    };
    assert_eq!(rc, 0, "{}", last());
    let inside = alloc(1 << 20, side);
    let outside = alloc(1 << 20, null_mut());
    let snap = snapshot();
    assert_eq!(pool_of(&snap, inside), Some((7, 0)));
    assert_eq!(pool_of(&snap, outside), Some((0, 0)));
    assert_eq!(accelrt_torch_pool_use_count(0, 7, 0), 1);
    // SAFETY: as above.
    let again = unsafe {
        accelrt_torch_begin_allocate_to_pool(0, 7, 0, Some(only), side, Some(count_drop))
    };
    assert_eq!(again, -1);
    assert!(
        last().contains("already allocating to pool (7, 0)"),
        "{}",
        last()
    );
    assert_eq!(
        DROPS.load(Ordering::SeqCst),
        drops + 1,
        "the refused context is dropped"
    );
    assert_eq!(accelrt_torch_end_allocate_to_pool(0, 7, 0), 0, "{}", last());
    assert_eq!(
        DROPS.load(Ordering::SeqCst),
        drops + 2,
        "the ended route's context too"
    );
    let after = alloc(1 << 20, side);
    assert_eq!(pool_of(&snapshot(), after), Some((0, 0)), "routing ended");
    // The graph is destroyed: its last use goes; its memory once freed.
    assert_eq!(accelrt_torch_release_pool(0, 7, 0), 0, "{}", last());
    free(inside);
    assert_eq!(accelrt_torch_pool_use_count(0, 7, 0), 0);
    assert!(snapshot()
        .segments
        .iter()
        .all(|s| s.segment_pool_id != (7, 0)));
    assert_eq!(accelrt_torch_release_pool(0, 7, 0), -1);
    assert!(last().contains("no private pool"), "{}", last());
    free(outside);
    free(after);

    // torch.cuda.MemPool: created (1 use), use_mem_pool adds one and drops it, the pool's
    // destructor drops the last.
    assert_eq!(
        accelrt_torch_create_or_incref_pool(0, 0, 9),
        0,
        "{}",
        last()
    );
    // SAFETY: no filter (every stream), no context.
    let rc = unsafe { accelrt_torch_begin_allocate_to_pool(0, 0, 9, None, null_mut(), None) };
    assert_eq!(rc, 0, "{}", last());
    assert_eq!(accelrt_torch_pool_use_count(0, 0, 9), 2);
    let t = alloc(3 << 20, side);
    assert_eq!(accelrt_torch_end_allocate_to_pool(0, 0, 9), 0);
    assert_eq!(accelrt_torch_release_pool(0, 0, 9), 0);
    assert_eq!(accelrt_torch_pool_use_count(0, 0, 9), 1);
    assert_eq!(pool_of(&snapshot(), t), Some((0, 9)));
    free(t);
    assert_eq!(accelrt_torch_release_pool(0, 0, 9), 0);
    assert_eq!(accelrt_torch_pool_use_count(0, 0, 9), 0);
}

#[test]
fn out_of_memory_is_reported_with_figures_and_the_allocator_recovers() {
    let _g = setup();
    assert_eq!(accelrt_torch_empty_cache(), 0, "{}", last());
    let total = host().device_properties(0).unwrap().total_memory;
    let fraction = (64u64 << 20) as f64 / total as f64;
    assert_eq!(
        accelrt_torch_set_memory_fraction(fraction, 0),
        0,
        "{}",
        last()
    );
    assert_eq!(accelrt_torch_get_memory_fraction(0), fraction);
    let ooms = stats()["num_ooms"];
    // SAFETY: the default stream.
    let p = unsafe { accelrt_torch_alloc(256 << 20, 0, null_mut()) };
    assert!(p.is_null(), "256 MiB under a 64 MiB cap");
    assert!(last().contains("out of memory on host:0"), "{}", last());
    let mut figures = [0i64; 4];
    // SAFETY: room for four values.
    assert_eq!(unsafe { accelrt_torch_last_oom(figures.as_mut_ptr()) }, 1);
    assert!(figures[0] >= 256 << 20, "requested: {figures:?}");
    assert!(figures[1] > 0, "device total: {figures:?}");
    assert_eq!(stats()["num_ooms"], ooms + 1);

    assert_eq!(accelrt_torch_set_memory_fraction(1.5, 0), -1);
    assert!(last().contains("[0, 1]"), "{}", last());
    assert_eq!(accelrt_torch_set_memory_fraction(1.0, 0), 0);
    let q = alloc(256 << 20, null_mut());
    // SAFETY: room for four values; the last failure above was not an OOM.
    assert_eq!(unsafe { accelrt_torch_last_oom(figures.as_mut_ptr()) }, 0);
    free(q);
}

#[test]
fn record_stream_cache_info_empty_cache_and_peaks() {
    let _g = setup();
    let side = side_stream();
    let p = alloc(2 << 20, null_mut());
    assert_eq!(
        // SAFETY: `side` is a live host stream's handle.
        unsafe { accelrt_torch_record_stream(p as *mut c_void, side) },
        0,
        "{}",
        last()
    );
    free(p); // waits for `side` before the block is reused
    assert_eq!(
        // SAFETY: refused: no allocator holds the address.
        unsafe { accelrt_torch_record_stream(0x10 as *mut c_void, side) },
        -1
    );
    assert!(
        last().contains("not memory accelrt allocated"),
        "{}",
        last()
    );

    let mut largest = 0usize;
    assert_eq!(
        // SAFETY: `largest` is a live local.
        unsafe { accelrt_torch_cache_info(0, &mut largest) },
        0,
        "{}",
        last()
    );
    assert!(largest > 0);

    host().device_synchronize(0).unwrap();
    assert_eq!(accelrt_torch_empty_cache(), 0, "{}", last());
    assert_eq!(accelrt_torch_reset_peak_stats(0), 0);
    let s = stats();
    assert_eq!(
        s["allocated_bytes.all.peak"],
        s["allocated_bytes.all.current"]
    );
    assert_eq!(
        s["reserved_bytes.all.peak"],
        s["reserved_bytes.all.current"]
    );
    assert_eq!(accelrt_torch_reset_accumulated_stats(0), 0);
    assert_eq!(stats()["num_device_alloc"], 0);
}

#[test]
fn init_checks_that_both_sides_see_the_same_devices() {
    let _g = setup();
    let n = host().device_count() as c_int;
    assert_eq!(accelrt_torch_device_count(), n);
    assert_eq!(accelrt_torch_init(n), 0, "{}", last());
    assert_eq!(accelrt_torch_init(n + 2), -1);
    assert!(
        last().contains(&format!(
            "PyTorch sees {} device(s) but accelrt's host backend sees {n}",
            n + 2
        )),
        "{}",
        last()
    );
}

/// `accelrt_torch_set_rounding` with a slice (NULL for an empty one).
fn set_rounding(divisions: &[u32], gc: f64) -> c_int {
    let ptr = if divisions.is_empty() {
        std::ptr::null()
    } else {
        divisions.as_ptr()
    };
    // SAFETY: `divisions.len()` entries at `ptr` (none when NULL).
    unsafe { accelrt_torch_set_rounding(ptr, divisions.len(), gc) }
}

#[test]
fn rounding_set_at_run_time_applies_to_the_next_requests() {
    let _g = setup();
    let active = || stats()["active_bytes.all.current"];
    let grown = |size: isize| {
        let before = active();
        let p = alloc(size, null_mut());
        let by = active() - before;
        free(p);
        by
    };
    let size = 84 << 20; // PyTorch's test_allocator_settings: 21 Mi floats
    assert_eq!(
        grown(size),
        84 << 20,
        "no divisions: 512-byte rounding only"
    );
    assert_eq!(set_rounding(&[4], 0.0), 0, "{}", last());
    assert_eq!(
        grown(size),
        96 << 20,
        "4 divisions between 64 and 128 MiB: steps of 16 MiB"
    );
    // A table by interval (1, 2, 4, .. MiB): 8 divisions from 64 MiB on.
    assert_eq!(set_rounding(&[0, 0, 0, 0, 0, 0, 8], 0.5), 0, "{}", last());
    assert_eq!(grown(size), 88 << 20, "8 divisions: steps of 8 MiB");
    // Invalid settings change nothing.
    assert_eq!(set_rounding(&[3], 0.0), -1);
    assert!(last().contains("power of two"), "{}", last());
    assert_eq!(set_rounding(&[], 1.5), -1);
    assert!(last().contains("(0, 1)"), "{}", last());
    assert_eq!(grown(size), 88 << 20, "the last valid table still applies");
    assert_eq!(set_rounding(&[], 0.0), 0, "{}", last());
    assert_eq!(grown(size), 84 << 20, "back to the default");
}

fn peak_breakdown(device: c_int) -> Option<serde_json::Value> {
    let p = accelrt_torch_peak_breakdown_json(device);
    if p.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated buffer from the library, freed right after.
    let json = unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned();
    // SAFETY: from accelrt_torch_peak_breakdown_json, not yet freed.
    unsafe { accelrt_torch_free_buffer(p.cast()) };
    Some(serde_json::from_str(&json).expect("JSON"))
}

#[test]
fn the_peak_breakdown_is_recorded_when_asked_for_and_adds_up() {
    let _serial = setup();
    assert_eq!(accelrt_torch_empty_cache(), 0, "{}", last());
    assert_eq!(accelrt_torch_reset_peak_stats(0), 0);
    assert_eq!(accelrt_torch_record_peak_breakdown(1), 0, "{}", last());
    let base = stats()["reserved_bytes.all.current"];
    // A new peak: more than everything reserved so far.
    let big = alloc((base + (64 << 20)) as isize, null_mut());
    let b = peak_breakdown(0).expect("a device that exists answers");
    assert!(b.is_object(), "a peak was recorded: {b}");
    let parts: u64 = [
        "allocated",
        "free_in_shared_pages",
        "free_in_used_chunks",
        "idle_chunks",
        "spare_chunks",
        "free_in_segments",
        "other",
    ]
    .iter()
    .map(|k| b[*k].as_u64().unwrap_or_else(|| panic!("{k} in {b}")))
    .sum();
    assert_eq!(b["reserved"].as_u64(), Some(parts), "{b}");
    assert_eq!(
        b["reserved"].as_u64(),
        Some(stats()["reserved_bytes.all.peak"])
    );
    free(big);
    // Off: forgotten, and nothing recorded any more.
    assert_eq!(accelrt_torch_record_peak_breakdown(0), 0);
    assert_eq!(peak_breakdown(0), Some(serde_json::Value::Null));
    // A device that does not exist: an error naming it, not a crash.
    assert_eq!(peak_breakdown(1 << 20), None);
    assert!(last().contains("device"), "{}", last());
    assert_eq!(accelrt_torch_empty_cache(), 0);
}
