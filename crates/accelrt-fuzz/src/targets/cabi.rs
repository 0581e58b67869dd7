//! The C ABI: call sequences on one thread and on four.

use std::ffi::{c_int, c_void, CStr};
use std::ptr::null_mut;
use std::time::Duration;

use accelrt::snapshot;
use accelrt::DeviceType;

use crate::{Outcome, Target};

/// Reads structured values out of fuzz bytes (zeros once they run out).
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next error.
    unsafe { CStr::from_ptr(accelrt_torch::accelrt_torch_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A failed call must give a reason, and never a caught panic.
fn check_failure(what: &str) -> Result<(), String> {
    let e = last_error();
    if e.contains("panicked") {
        panic!("{what}: the C ABI caught a panic: {e}");
    }
    if e.is_empty() {
        return Err(format!("{what} failed without a reason"));
    }
    let prefix = e.split(':').next().unwrap_or("");
    if prefix.len() > 10 && e.matches(prefix).count() > 2 {
        return Err(format!("{what}: a message repeats itself: {e}"));
    }
    Ok(())
}

static CABI_INIT: std::sync::Once = std::sync::Once::new();

fn host_stream_handles() -> &'static [usize] {
    static HANDLES: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    HANDLES.get_or_init(|| {
        let host = accelrt::backend(DeviceType::Host);
        std::iter::once(0)
            .chain((0..3).filter_map(|_| {
                let s = host
                    .stream_from_pool(0, accelrt::StreamPriority::Normal)
                    .ok()?;
                host.stream_native_handle(s).ok().map(|h| h as usize)
            }))
            .collect()
    })
}

fn cabi_init() {
    CABI_INIT.call_once(|| {
        accelrt_torch::use_backend(DeviceType::Host)
            .expect("the fuzz process uses the host backend");
        accelrt_torch::accelrt_torch_set_log_alloc_failures(0);
        let _ = host_stream_handles();
    });
}

/// What one sequence of calls leaves to clean up.
#[derive(Default)]
struct Held {
    ptrs: Vec<usize>,
    pools: Vec<(u64, u64)>,
}

extern "C" fn odd_streams(_ctx: *mut c_void, stream: *mut c_void) -> c_int {
    (stream as usize % 2) as c_int
}

/// Run one call sequence (one thread's share).
fn cabi_sequence(mut b: Bytes<'_>, held: &mut Held) -> Result<u64, String> {
    use accelrt_torch::*;
    let streams = host_stream_handles();
    let mut steps = 0;
    // Which calls ran, and which of them failed: the outcome signature.
    let mut seen = 0u64;
    while !b.is_empty() && steps < 200 {
        steps += 1;
        let op = b.u8() % 24;
        seen |= 1 << op;
        if last_error_changed() {
            seen |= 1 << (32 + op);
        }
        let pick = |held: &Held, i: u8| held.ptrs.get(i as usize % held.ptrs.len().max(1)).copied();
        match op {
            0..=5 => {
                let shift = b.u8() % 28;
                let size = (b.u32() as isize) & ((1isize << shift) - 1);
                let size = if b.u8() == 255 { -size - 1 } else { size };
                let stream = streams[b.u8() as usize % streams.len()];
                // SAFETY: `stream` is 0 or a live host stream's handle.
                let p = unsafe { accelrt_torch_alloc(size, 0, stream as *mut c_void) };
                if p.is_null() {
                    if size > 0 {
                        check_failure("alloc")?;
                    }
                } else {
                    held.ptrs.push(p as usize);
                }
            }
            6..=8 => {
                if !held.ptrs.is_empty() {
                    let i = b.u8() as usize % held.ptrs.len();
                    let p = held.ptrs.swap_remove(i);
                    // SAFETY: checked by the library.
                    unsafe { accelrt_torch_free(p as *mut c_void, 0, 0, null_mut()) };
                }
            }
            9 => {
                // A double free, or a free of a pointer another sequence owns.
                if let Some(p) = pick(held, b.u8()) {
                    // SAFETY: checked by the library.
                    unsafe { accelrt_torch_free(p as *mut c_void, 0, 0, null_mut()) };
                    // SAFETY: as above: the second is stale.
                    unsafe { accelrt_torch_free(p as *mut c_void, 0, 0, null_mut()) };
                    held.ptrs.retain(|&q| q != p);
                }
            }
            10 => {
                // Foreign pointers: inside live blocks, unaligned, wild.
                let base = pick(held, b.u8()).unwrap_or(0x10_0000);
                let p = match b.u8() % 4 {
                    0 => base.wrapping_add(512),
                    1 => base.wrapping_add(1),
                    2 => b.u32() as usize,
                    _ => (b.u32() as usize) << 20 | 0x7f00_0000_0000,
                };
                let device = (b.u8() % 3) as c_int - 1;
                // SAFETY: checked by the library: an unknown pointer is refused.
                unsafe { accelrt_torch_free(p as *mut c_void, 0, device, null_mut()) };
            }
            11 => {
                if accelrt_torch_empty_cache() != 0 {
                    check_failure("empty_cache")?;
                }
            }
            12 => {
                let p = pick(held, b.u8()).unwrap_or(b.u32() as usize);
                let stream = streams[b.u8() as usize % streams.len()];
                // SAFETY: `stream` is 0 or a live host stream's handle; `p` is checked.
                if unsafe { accelrt_torch_record_stream(p as *mut c_void, stream as *mut c_void) }
                    != 0
                {
                    check_failure("record_stream")?;
                }
            }
            13 => {
                let id = (b.u8() as u64 % 4, b.u8() as u64 % 3);
                let filter: FilterFn = if b.u8() % 2 == 0 {
                    None
                } else {
                    Some(odd_streams)
                };
                // SAFETY: the filter is thread-safe and never unwinds; no context.
                let rc = unsafe {
                    accelrt_torch_begin_allocate_to_pool(0, id.0, id.1, filter, null_mut(), None)
                };
                if rc == 0 {
                    held.pools.push(id);
                } else {
                    check_failure("begin_allocate_to_pool")?;
                }
            }
            14 => {
                let id = (b.u8() as u64 % 4, b.u8() as u64 % 3);
                if accelrt_torch_end_allocate_to_pool(0, id.0, id.1) != 0 {
                    check_failure("end_allocate_to_pool")?;
                }
            }
            15 => {
                let id = (b.u8() as u64 % 4, b.u8() as u64 % 3);
                if accelrt_torch_release_pool(0, id.0, id.1) != 0 {
                    check_failure("release_pool")?;
                }
                let uses = accelrt_torch_pool_use_count(0, id.0, id.1);
                if !(-1..=100_000).contains(&uses) {
                    return Err(format!("pool {id:?} has {uses} uses after a release"));
                }
            }
            16 => {
                let id = (b.u8() as u64 % 4, b.u8() as u64 % 3);
                if accelrt_torch_create_or_incref_pool(0, id.0, id.1) == 0 {
                    held.pools.push(id);
                } else {
                    check_failure("create_or_incref_pool")?;
                }
            }
            17 => {
                let mut len = 0usize;
                let device = (b.u8() % 3) as c_int - 1;
                // SAFETY: `len` is a live local.
                let p = unsafe { accelrt_torch_snapshot_pickle(device, &mut len) };
                if p.is_null() {
                    check_failure("snapshot_pickle")?;
                } else {
                    // SAFETY: `len` bytes from the library, freed right after.
                    let bytes = unsafe { std::slice::from_raw_parts(p, len) }.to_vec();
                    // SAFETY: from accelrt_torch_snapshot_pickle, freed once.
                    unsafe { accelrt_torch_free_buffer(p.cast()) };
                    snapshot::parse_bytes("abi.pickle", &bytes)
                        .map_err(|e| format!("the C ABI's snapshot does not read back: {e}"))?;
                }
            }
            18 => {
                let device = (b.u8() % 3) as c_int - 1;
                let p = accelrt_torch_memory_stats_json(device);
                if p.is_null() {
                    check_failure("memory_stats_json")?;
                } else {
                    // SAFETY: a NUL-terminated buffer from the library, freed right after.
                    let json = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
                    // SAFETY: from accelrt_torch_memory_stats_json, freed once.
                    unsafe { accelrt_torch_free_buffer(p.cast()) };
                    serde_json::from_str::<serde_json::Value>(&json)
                        .map_err(|e| format!("stats JSON does not parse: {e}"))?;
                }
            }
            19 => {
                let mut out = vec![0i64; STATS_LEN + 1];
                let len = b.u8() as usize % (STATS_LEN + 2);
                let len = len.min(out.len());
                // SAFETY: `out` holds at least `len` values.
                if unsafe { accelrt_torch_stats_array(0, out.as_mut_ptr(), len) } < 0 {
                    check_failure("stats_array")?;
                }
            }
            20 => {
                let f = match b.u8() % 5 {
                    0 => 0.0,
                    1 => f64::NAN,
                    2 => 1.5,
                    3 => 1.0,
                    _ => (b.u8() as f64 + 1.0) / 256.0,
                };
                if accelrt_torch_set_memory_fraction(f, 0) != 0 {
                    check_failure("set_memory_fraction")?;
                }
                // The rounding knobs from the same value (no extra input byte, so saved
                // inputs keep their meaning): divisions 0..=12 (not all powers of two) and
                // the same value as the collection threshold (NaN and 1.5 are refused).
                let divisions = [(f * 12.0) as u32, 2, 0];
                // SAFETY: three entries at a live array.
                if unsafe { accelrt_torch_set_rounding(divisions.as_ptr(), 3, f) } != 0 {
                    check_failure("set_rounding")?;
                }
            }
            21 => {
                let enabled = b.u8() as c_int % 2;
                let max = b.u8() as usize * 100;
                let device = (b.u8() % 3) as c_int - 1;
                if accelrt_torch_record_history(device, enabled, max) != 0 {
                    check_failure("record_history")?;
                }
            }
            22 => {
                let mut largest = 0usize;
                // SAFETY: `largest` is a live local.
                if unsafe { accelrt_torch_cache_info(0, &mut largest) } != 0 {
                    check_failure("cache_info")?;
                }
                let _ = accelrt_torch_reset_peak_stats(0);
                // The peak breakdown, turned on and off with the step count (no extra input
                // byte, so saved inputs keep their meaning): when one is recorded, its parts
                // add up to what was reserved.
                if accelrt_torch_record_peak_breakdown((steps % 2) as c_int) != 0 {
                    check_failure("record_peak_breakdown")?;
                }
                let p = accelrt_torch_peak_breakdown_json(0);
                if p.is_null() {
                    check_failure("peak_breakdown_json")?;
                } else {
                    // SAFETY: a NUL-terminated buffer from the library, freed right after.
                    let json = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
                    // SAFETY: from accelrt_torch_peak_breakdown_json, freed once.
                    unsafe { accelrt_torch_free_buffer(p.cast()) };
                    let v: serde_json::Value = serde_json::from_str(&json)
                        .map_err(|e| format!("peak breakdown JSON does not parse: {e}"))?;
                    if let Some(m) = v.as_object() {
                        let sum: u64 = m
                            .iter()
                            .filter(|(k, _)| k.as_str() != "reserved")
                            .filter_map(|(_, x)| x.as_u64())
                            .sum();
                        if Some(sum) != v["reserved"].as_u64() {
                            return Err(format!("peak breakdown does not add up: {json}"));
                        }
                    }
                }
            }
            _ => {
                // Bad devices everywhere.
                let d = b.u8() as c_int - 128;
                let _ = accelrt_torch_get_memory_fraction(d);
                let _ = accelrt_torch_pool_use_count(d, 1, 1);
                // SAFETY: refused before the stream is used (bad device) or NULL stream.
                let p = unsafe { accelrt_torch_alloc(512, d, null_mut()) };
                if !p.is_null() {
                    held.ptrs.push(p as usize);
                }
            }
        }
    }
    if last_error_changed() {
        seen |= 1 << 63;
    }
    Ok(seen)
}

thread_local! {
    static LAST_SEEN: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Whether this thread's last C ABI error changed since the last look.
fn last_error_changed() -> bool {
    let now = last_error();
    LAST_SEEN.with(|l| {
        let changed = *l.borrow() != now;
        *l.borrow_mut() = now;
        changed
    })
}

/// After a case: free what it holds, close its routes and pools, and check the allocator.
fn cabi_cleanup(held: Vec<Held>) -> Result<(), String> {
    use accelrt_torch::*;
    for h in &held {
        for &p in &h.ptrs {
            // SAFETY: checked by the library (some were freed by another sequence).
            unsafe { accelrt_torch_free(p as *mut c_void, 0, 0, null_mut()) };
        }
    }
    for h in &held {
        for &(a, b) in &h.pools {
            let _ = accelrt_torch_end_allocate_to_pool(0, a, b);
            let mut guard = 0;
            while accelrt_torch_pool_use_count(0, a, b) > 0 && guard < 10_000 {
                if accelrt_torch_release_pool(0, a, b) != 0 {
                    break;
                }
                guard += 1;
            }
        }
    }
    let _ = accelrt_torch_set_memory_fraction(1.0, 0);
    // SAFETY: no entries.
    let _ = unsafe { accelrt_torch_set_rounding(std::ptr::null(), 0, 0.0) };
    let _ = accelrt_torch_record_history(-1, 0, 0);
    let _ = accelrt_torch_record_peak_breakdown(0);
    let host = accelrt::backend(DeviceType::Host);
    host.device_synchronize(0).map_err(|e| e.to_string())?;
    if accelrt_torch_empty_cache() != 0 {
        check_failure("empty_cache")?;
    }
    let a = host.allocator(0).map_err(|e| e.to_string())?;
    a.check_invariants()
        .map_err(|e| format!("invariant broken after the calls: {e}"))?;
    Ok(())
}

fn cabi_seeds() -> Vec<Vec<u8>> {
    vec![
        vec![0, 10, 0, 16, 0, 0, 0, 0, 6, 0],
        vec![
            13, 1, 0, 0, 0, 20, 0, 0, 0, 0, 0, 14, 1, 0, 15, 1, 0, 15, 1, 0, 7, 0,
        ],
        vec![
            1, 20, 255, 255, 255, 255, 0, 1, 9, 0, 11, 12, 0, 1, 17, 1, 18, 1, 19, 200,
        ],
        vec![
            20, 4, 5, 27, 255, 255, 255, 127, 0, 0, 11, 16, 2, 1, 15, 2, 1, 15, 2, 1,
        ],
        vec![21, 1, 10, 1, 2, 10, 0, 16, 0, 0, 1, 17, 0, 6, 0, 23, 7],
    ]
}

/// C ABI call sequences, one thread.
fn check_cabi(bytes: &[u8]) -> Outcome {
    cabi_init();
    let mut held = Held::default();
    let r = cabi_sequence(Bytes(bytes), &mut held);
    cabi_cleanup(vec![held])?;
    r.map(|seen| format!("calls {seen:016x}"))
}

/// The same, split between four threads running at once.
fn check_cabi_threads(bytes: &[u8]) -> Outcome {
    cabi_init();
    let quarter = bytes.len().div_ceil(4).max(1);
    let results: Vec<(Held, Result<u64, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = bytes
            .chunks(quarter)
            .map(|chunk| {
                s.spawn(move || {
                    let mut held = Held::default();
                    let r = cabi_sequence(Bytes(chunk), &mut held);
                    (held, r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(x) => x,
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    });
    let mut first = Ok(0u64);
    let mut held = Vec::new();
    for (h, r) in results {
        held.push(h);
        first = match (first, r) {
            (Ok(a), Ok(b)) => Ok(a | b),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
    }
    cabi_cleanup(held)?;
    first.map(|seen| format!("calls {seen:016x}"))
}

/// The C ABI (`libaccelrt_torch`), one thread: hostile call sequences.
pub const CABI: Target = Target {
    name: "cabi",
    about: "C ABI call sequences: double frees, foreign pointers, pool misuse, bad devices",
    seeds: cabi_seeds,
    run: check_cabi,
    max_len: 2048,
    dictionary: CABI_DICTIONARY,
    case_timeout: Duration::from_secs(30),
};

/// Tokens for the C ABI targets: call codes that begin, end and release pools, and -1.
const CABI_DICTIONARY: &[&[u8]] = &[
    &[9],
    &[10],
    &[11],
    &[15],
    &[13],
    &[16],
    &[255, 255, 255, 255],
];

/// The C ABI from four threads at once.
pub const CABI_THREADS: Target = Target {
    name: "cabi_threads",
    about: "C ABI call sequences from four threads at once (the item 4 race's surface)",
    seeds: cabi_seeds,
    run: check_cabi_threads,
    max_len: 4096,
    dictionary: CABI_DICTIONARY,
    case_timeout: Duration::from_secs(30),
};
