//! The C ABI under hostile concurrency (issue 13 item 4): threads mixing allocations on
//! shared and private streams, cross-thread frees, double frees of their own pointers,
//! foreign pointers, `empty_cache`, `record_stream`, snapshots and statistics, under a
//! memory cap so that mapping pages fails now and then. Every round must finish (a free-list
//! cycle made `empty_cache` loop forever, filling memory) and leave the allocator's
//! invariants intact.
//!
//! `ACCELRT_CONCURRENCY_ROUNDS=N` runs N rounds instead of the CI's few (the target
//! is 1,000 without a failure; RELIABILITY.md records the runs).

use std::ffi::{c_void, CStr};
use std::ptr::null_mut;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use accelrt::{Backend, DeviceType, StreamPriority};
use accelrt_torch::*;

const THREADS: u64 = 8;
const OPS: usize = 400;
/// A round takes well under a second; only a hang reaches this.
const ROUND_LIMIT: Duration = Duration::from_secs(30);

fn host() -> &'static dyn Backend {
    accelrt::backend(DeviceType::Host)
}

fn last() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next error.
    unsafe { CStr::from_ptr(accelrt_torch_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// splitmix64: deterministic per seed (the workspace's one copy).
use accelrt::alloc::splitmix::SplitMix64 as Rng;

fn alloc(size: isize, stream: usize) -> Option<usize> {
    // SAFETY: `stream` is 0 (the default stream) or a live host stream's handle.
    let p = unsafe { accelrt_torch_alloc(size, 0, stream as *mut c_void) } as usize;
    (p != 0).then_some(p)
}

fn free(p: usize) {
    // SAFETY: the library checks the pointer: unknown and stale ones are refused.
    unsafe { accelrt_torch_free(p as *mut c_void, 0, 0, null_mut()) }
}

/// One thread's share of a round.
fn worker(seed: u64, streams: &[usize], mailbox: &Mutex<Vec<usize>>) {
    let mut rng = Rng(seed);
    let mut mine: Vec<usize> = Vec::new();
    for _ in 0..OPS {
        match rng.below(100) {
            0..=39 => {
                // Sizes from 1 byte to 8 MiB: small and large pools, split and whole pages.
                let scale = 10 + rng.below(11);
                let size = 1 + rng.below(8 << scale) as isize;
                let stream = streams[rng.below(streams.len() as u64) as usize];
                if let Some(p) = alloc(size, stream) {
                    mine.push(p);
                }
            }
            40..=59 if !mine.is_empty() => {
                let p = mine.swap_remove(rng.below(mine.len() as u64) as usize);
                free(p);
            }
            60..=66 if !mine.is_empty() => {
                // Double free of our own pointer: the second is stale (and may even hit
                // another thread's allocation at the same address, as a real bug would).
                let p = mine.swap_remove(rng.below(mine.len() as u64) as usize);
                free(p);
                // Let other threads reuse the address first, as a real bug would.
                std::thread::sleep(Duration::from_micros(rng.below(200)));
                free(p);
            }
            67..=74 if !mine.is_empty() => {
                let p = mine.swap_remove(rng.below(mine.len() as u64) as usize);
                mailbox.lock().unwrap().push(p);
            }
            75..=81 => {
                let theirs = mailbox.lock().unwrap().pop();
                if let Some(p) = theirs {
                    free(p); // cross-thread, often cross-pool
                }
            }
            82..=85 => {
                let _ = accelrt_torch_empty_cache();
            }
            86..=88 if !mine.is_empty() => {
                let p = mine[rng.below(mine.len() as u64) as usize];
                let stream = streams[rng.below(streams.len() as u64) as usize];
                // SAFETY: `stream` is a live host stream's handle or 0.
                let _ = unsafe { accelrt_torch_record_stream(p as *mut c_void, stream as _) };
            }
            89..=90 => {
                let mut len = 0usize;
                // SAFETY: `len` is a live local.
                let buf = unsafe { accelrt_torch_snapshot_pickle(0, &mut len) };
                if !buf.is_null() {
                    // SAFETY: from accelrt_torch_snapshot_pickle, freed once.
                    unsafe { accelrt_torch_free_buffer(buf.cast()) };
                }
            }
            91..=93 => {
                let json = accelrt_torch_memory_stats_json(0);
                if !json.is_null() {
                    // SAFETY: from accelrt_torch_memory_stats_json, freed once.
                    unsafe { accelrt_torch_free_buffer(json.cast()) };
                }
            }
            94..=96 => {
                // Foreign pointers: near live memory, unaligned, and far away.
                let base = mine.last().copied().unwrap_or(0x7000_0000);
                let foreign = match rng.below(3) {
                    0 => base + 512,
                    1 => base + 1 + rng.below(511) as usize,
                    _ => rng.next_u64() as usize | 1,
                };
                free(foreign);
            }
            _ => {}
        }
    }
    for p in mine {
        free(p);
    }
}

fn round(seed: u64, streams: &[usize]) {
    let mailbox = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, done_rx) = mpsc::channel();
    for t in 0..THREADS {
        let (mailbox, done_tx, streams) = (mailbox.clone(), done_tx.clone(), streams.to_vec());
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                worker(seed ^ (t << 40), &streams, &mailbox)
            }));
            let _ = done_tx.send(outcome.is_ok());
        });
    }
    for _ in 0..THREADS {
        match done_rx.recv_timeout(ROUND_LIMIT) {
            Ok(true) => {}
            Ok(false) => panic!("round {seed:#x}: a thread panicked"),
            Err(_) => panic!(
                "round {seed:#x}: a thread did not finish within {ROUND_LIMIT:?} (a hang: a \
                 free list with a cycle loops forever)"
            ),
        }
    }
    for p in mailbox.lock().unwrap().drain(..) {
        free(p);
    }
    host().device_synchronize(0).unwrap();
    assert_eq!(accelrt_torch_empty_cache(), 0, "{}", last());
    let allocator = host().allocator(0).unwrap();
    allocator
        .check_invariants()
        .unwrap_or_else(|e| panic!("round {seed:#x} broke an invariant: {e}"));
}

#[test]
fn eight_threads_with_double_frees_and_empty_cache_never_hang_or_corrupt() {
    use_backend(DeviceType::Host).expect("this test uses the host backend");
    accelrt_torch_set_log_alloc_failures(0);
    // A cap well under what 8 threads ask for: mapping pages fails now and then.
    let total = host().device_properties(0).unwrap().total_memory;
    let cap = (192u64 << 20) as f64 / total as f64;
    assert_eq!(accelrt_torch_set_memory_fraction(cap, 0), 0, "{}", last());
    let streams: Vec<usize> = std::iter::once(0)
        .chain((0..3).map(|_| {
            let s = host().stream_from_pool(0, StreamPriority::Normal).unwrap();
            host().stream_native_handle(s).unwrap() as usize
        }))
        .collect();
    let rounds: u64 = std::env::var("ACCELRT_CONCURRENCY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    for r in 0..rounds {
        round(0x5eed_0000 + r, &streams);
    }
    let allocator = host().allocator(0).unwrap();
    assert_eq!(allocator.allocated_bytes(), 0, "every pointer was freed");
}
