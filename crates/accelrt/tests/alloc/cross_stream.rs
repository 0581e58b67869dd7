//! Cross-stream safety on real host streams: a block freed by the host while a task on
//! another stream still writes to it must not be handed out again until that stream has
//! passed the free. Checked by the data, over many trials.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use accelrt::{Backend, StreamPriority};

use crate::common::runtime;

const SIZE: usize = 64 << 10;

/// What a "kernel" on another stream does first: spin until the test opens `gate` (at most
/// ten seconds, so a broken test ends).
fn wait_for(gate: &AtomicBool) {
    let start = Instant::now();
    while !gate.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(10) {
        std::hint::spin_loop();
    }
}

#[test]
fn block_used_on_another_stream_waits_for_that_stream() {
    // A runtime of its own: the device-wide statistics checked at the end are this test's.
    let host = runtime(1);
    let alloc = host.allocator(0).unwrap();
    let a = host.default_stream(0).unwrap();
    let b = host.new_stream(0, StreamPriority::Normal).unwrap();
    let mut reused_after_sync = 0;
    for trial in 0..300u32 {
        let p = alloc.raw_alloc(SIZE, a).unwrap();
        alloc.record_stream(p, b).unwrap();
        let go = Arc::new(AtomicBool::new(false));
        let g = go.clone();
        // The "kernel" on B: waits for the gate, then keeps writing into p.
        host.launch_host(
            b,
            Arc::new(move || {
                wait_for(&g);
                for _ in 0..4 {
                    // SAFETY: `p` stays mapped: the allocator must not reuse it before this
                    // task ends, which is exactly what the test checks.
                    unsafe { std::ptr::write_bytes(p as *mut u8, 0xBB, SIZE) };
                }
            }),
        )
        .unwrap();
        alloc.raw_free(p).unwrap(); // host is done with it; B is not
        let q = alloc.raw_alloc(SIZE, a).unwrap();
        assert_ne!(
            q, p,
            "trial {trial}: block handed out while stream B still uses it"
        );
        // SAFETY: q is a live host buffer of SIZE bytes owned by this test.
        unsafe { std::ptr::write_bytes(q as *mut u8, 0xAA, SIZE) };
        go.store(true, Ordering::Release);
        host.stream_synchronize(b).unwrap();
        // SAFETY: q is still live; B has finished.
        let data = unsafe { std::slice::from_raw_parts(q as *const u8, SIZE) };
        assert!(
            data.iter().all(|&x| x == 0xAA),
            "trial {trial}: B's writes reached a live block"
        );
        alloc.raw_free(q).unwrap();
        // Once B has passed, p is reusable again.
        let r = alloc.raw_alloc(SIZE, a).unwrap();
        if r == p {
            reused_after_sync += 1;
        }
        alloc.raw_free(r).unwrap();
    }
    assert!(
        reused_after_sync > 0,
        "the pending block never came back to the cache"
    );
    alloc.check_invariants().unwrap();
    let s = alloc.stats().all();
    assert_eq!(
        s.active.current, 0,
        "no block is left pending once B is done and the cache was used"
    );
}

#[test]
fn record_events_and_wait_for_events_on_host_streams() {
    let host = runtime(1);
    let alloc = host.allocator(0).unwrap();
    let s = host.new_stream(0, StreamPriority::Normal).unwrap();
    let p = alloc.raw_alloc(4096, s).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    host.launch_host(
        s,
        Arc::new(move || {
            std::thread::sleep(Duration::from_millis(30));
            d.store(true, Ordering::Release);
        }),
    )
    .unwrap();
    alloc.record_events(&[p], s).unwrap();
    alloc.wait_for_events(&[p]).unwrap();
    assert!(
        done.load(Ordering::Acquire),
        "wait_for_events returned before the stream reached the event"
    );
    alloc.raw_free(p).unwrap();
    let err = alloc.wait_for_events(&[p]).unwrap_err().to_string();
    assert!(err.contains("wait_for_events"), "{err}");
}

/// The `active` figures are derived from the allocation figures and the pending frees (they
/// cost the fast paths nothing): a free waiting for another stream keeps its block active,
/// its end deactivates it, and the totals survive a reset taken while a free is pending.
#[test]
fn a_pending_free_stays_active_until_its_stream_passes() {
    let host = runtime(1);
    let alloc = host.allocator(0).unwrap();
    let a = host.default_stream(0).unwrap();
    let b = host.new_stream(0, StreamPriority::Normal).unwrap();
    let gate = Arc::new(AtomicBool::new(false));
    let figures = |alloc: &accelrt::alloc::CachingAllocator| {
        let s = alloc.stats().all();
        [
            (s.allocation.current, s.active.current, s.active.peak),
            (s.active.allocated, s.active.freed, s.active_bytes.current),
        ]
    };
    let p = alloc.raw_alloc(SIZE, a).unwrap();
    let q = alloc.raw_alloc(SIZE, a).unwrap();
    alloc.record_stream(p, b).unwrap();
    let g = gate.clone();
    host.launch_host(b, Arc::new(move || wait_for(&g))).unwrap();
    alloc.raw_free(p).unwrap(); // pending: B has not passed the free
    assert_eq!(figures(&alloc), [(1, 2, 2), (2, 0, 2 * SIZE as u64)]);
    alloc.reset_accumulated_stats();
    alloc.reset_peak_stats();
    assert_eq!(figures(&alloc), [(1, 2, 2), (0, 0, 2 * SIZE as u64)]);
    gate.store(true, Ordering::Release);
    host.stream_synchronize(b).unwrap();
    // The next allocation finishes the pending free (and takes its block back).
    let r = alloc.raw_alloc(SIZE, a).unwrap();
    assert_eq!(figures(&alloc), [(2, 2, 2), (1, 1, 2 * SIZE as u64)]);
    alloc.raw_free(q).unwrap();
    alloc.raw_free(r).unwrap();
    assert_eq!(figures(&alloc), [(0, 0, 2), (1, 3, 0)]);
    alloc.check_invariants().unwrap();
}
