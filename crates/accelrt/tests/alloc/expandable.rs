//! Expandable segments: reserved address ranges backed by pages mapped on demand, with idle
//! pages reused across blocks of any size.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use accelrt::alloc::{
    AllocatorConfig, AllocatorEvent, BlockStatus, CachingAllocator, HistoryConfig, TraceAction,
};
use accelrt::backend::host::{HostDriver, HostMemory};
use accelrt::runtime::Runtime;
use accelrt::{Backend, StreamPriority};

use crate::common::{host_stream as s, HOST0 as DEV};

const MIB: usize = 1 << 20;

fn allocator(capacity: u64, conf: &str) -> CachingAllocator {
    let mut config = AllocatorConfig::parse(conf).unwrap();
    config.debug_checks = true;
    let a = CachingAllocator::new(DEV, Arc::new(HostMemory::new(capacity)), None, config).unwrap();
    assert!(a.is_expandable(), "host memory supports virtual memory");
    a
}

#[test]
fn reserved_memory_is_the_pages_under_live_blocks() {
    let a = allocator(1 << 30, "");
    // (request, reserved after it, in 2 MiB pages). Small and large requests have their own
    // ranges; 1 MiB + 1 lands at offset 3 MiB of the large range, spanning a third page.
    let table = [(3 * MIB, 2), (512, 3), (MIB + 1, 4)];
    let mut live = Vec::new();
    for (size, pages) in table {
        live.push(a.raw_alloc(size, s(0)).unwrap());
        assert_eq!(a.reserved_bytes(), pages * 2 * MIB as u64, "after {size}");
    }
    for p in live.drain(..) {
        a.raw_free(p).unwrap();
    }
    // Same sizes again: all from mapped, cached memory.
    let before = a.stats().counters.num_device_alloc;
    let again: Vec<usize> = table
        .iter()
        .map(|&(size, _)| a.raw_alloc(size, s(0)).unwrap())
        .collect();
    assert_eq!(
        a.stats().counters.num_device_alloc,
        before,
        "no new pages for cached sizes"
    );
    again.into_iter().for_each(|p| a.raw_free(p).unwrap());
    a.empty_cache().unwrap();
    assert_eq!(a.reserved_bytes(), 0);
    assert_eq!(
        a.stats().all().segment.current,
        0,
        "empty ranges are unreserved"
    );
}

#[test]
fn idle_pages_of_a_freed_block_back_a_larger_one() {
    let a = allocator(1 << 30, "");
    let x = a.raw_alloc(64 * MIB, s(0)).unwrap();
    let y = a.raw_alloc(64 * MIB, s(0)).unwrap();
    a.raw_free(x).unwrap();
    // 96 MiB fits no hole: with plain segments this needs 96 MiB more (224 MiB reserved);
    // here x's 32 idle pages move under the new block and only 16 are created.
    let z = a.raw_alloc(96 * MIB, s(0)).unwrap();
    let st = a.stats();
    assert_eq!(
        st.reserved_bytes_peak,
        160 * MIB as u64,
        "peak reserved == peak allocated"
    );
    assert_eq!(st.counters.num_page_steals, 1);
    assert_eq!(st.counters.num_pages_remapped, 32);
    // SAFETY: z is a live 96 MiB host buffer; write all of it (remapped pages are usable).
    unsafe { std::ptr::write_bytes(z as *mut u8, 0xC3, 96 * MIB) };
    a.raw_free(y).unwrap();
    a.raw_free(z).unwrap();
    a.check_invariants().unwrap();
}

/// Moves wait for the pool's first cycle: until its allocated memory has fallen to two thirds
/// of its peak (or it has freed half its peak since the peak last rose), what it frees is
/// taken back in place, and a larger block gets new memory instead of moving freed chunks
/// under it.
#[test]
fn moves_wait_for_the_first_cycle() {
    // (blocks of 64 MiB freed out of 8 live before a 96 MiB request: whether it moved)
    let table = [(1, false), (2, false), (3, true), (4, true)];
    for (freed, moves) in table {
        let a = allocator(1 << 31, "");
        let live: Vec<usize> = (0..8)
            .map(|_| a.raw_alloc(64 * MIB, s(0)).unwrap())
            .collect();
        // Every other block, so that no two freed ones merge into a hole 96 MiB fits.
        let order: Vec<usize> = (0..8).step_by(2).chain((1..8).step_by(2)).collect();
        for &i in &order[..freed] {
            a.raw_free(live[i]).unwrap();
        }
        let z = a.raw_alloc(96 * MIB, s(0)).unwrap();
        let st = a.stats();
        assert_eq!(st.counters.num_page_steals > 0, moves, "{freed} of 8 freed");
        if !moves {
            assert_eq!(
                st.reserved_bytes_peak,
                (8 * 64 + 96) as u64 * MIB as u64,
                "{freed} of 8 freed: new memory"
            );
        }
        a.raw_free(z).unwrap();
        for &i in &order[freed..] {
            a.raw_free(live[i]).unwrap();
        }
        a.check_invariants().unwrap();
    }
    // A churn at its peak, whose allocated memory neither falls nor grows much: the first
    // move comes once it has fallen a third below its peak or half the peak has been freed
    // since the peak last rose.
    let a = allocator(1 << 34, "");
    let mut rng = accelrt::alloc::splitmix::SplitMix64(11);
    let mut size = || 1 + rng.below(128 * MIB as u64) as usize;
    let mut live: Vec<usize> = (0..16)
        .map(|_| a.raw_alloc(size(), s(0)).unwrap())
        .collect();
    let (mut over, mut first_move, mut seen) = (false, None, (0, 0));
    for round in 0..2000 {
        let k = round * 7 % 16;
        a.raw_free(live[k]).unwrap();
        let now = a.stats().all().allocated_bytes;
        if now.peak != seen.0 {
            seen = (now.peak, now.freed);
        }
        over |= now.current * 3 <= now.peak * 2 || (now.freed - seen.1) * 2 >= now.peak;
        live[k] = a.raw_alloc(size(), s(0)).unwrap();
        if a.stats().counters.num_page_steals > 0 {
            first_move = Some((now, over));
            break;
        }
    }
    let (at, over) = first_move.expect("the churn moved memory");
    assert!(over, "moved before the first cycle was over: {at:?}");
    live.into_iter().for_each(|p| a.raw_free(p).unwrap());
    a.check_invariants().unwrap();
}

#[test]
fn streams_without_events_do_not_take_each_others_pages_forever() {
    // Two streams of one allocator without events, each freeing and asking again for its own
    // block (as threads on their own streams do). A stream whose idle page another took
    // creates a page rather than take the other's in turn: the two settle on pages of their
    // own, instead of each slow path taking the other's page and sending it down its own slow
    // path (every allocation a move, without end).
    let a = allocator(1 << 30, "");
    let rounds = |n: usize| {
        for _ in 0..n {
            for stream in [s(1), s(2)] {
                let p = a.raw_alloc(3 * MIB, stream).unwrap();
                a.raw_free(p).unwrap();
            }
        }
    };
    rounds(200);
    let settled = a.stats();
    rounds(1_000);
    let after = a.stats();
    assert!(
        settled.counters.num_page_steals <= 4,
        "the streams kept taking each other's pages while settling: {} moves",
        settled.counters.num_page_steals
    );
    assert_eq!(
        after.counters.num_page_steals, settled.counters.num_page_steals,
        "moves once settled"
    );
    assert_eq!(after.driver_calls.total(), settled.driver_calls.total());
    a.check_invariants().unwrap();
}

#[test]
fn threads_on_their_own_streams_never_see_each_others_bytes_without_events() {
    // Eight threads, each freeing its block and asking for it again on its own stream and
    // yielding in between, so that another may take its idle page (without events, at once)
    // while it is off the core. Each writes its own pattern into its block and checks it:
    // however the moves interleave, no thread ever sees another's bytes, and the allocator
    // is consistent once they are done. (`debug_checks` stays off, so that the threads
    // really overlap rather than wait for each call's check; the invariants are checked at
    // the end. How many moves it takes to settle depends on the interleaving; the
    // deterministic test above pins that down.)
    const THREADS: u32 = 8;
    let config = AllocatorConfig::default();
    let a = CachingAllocator::new(DEV, Arc::new(HostMemory::new(1 << 30)), None, config).unwrap();
    let barrier = std::sync::Barrier::new(THREADS as usize);
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (a, barrier) = (&a, &barrier);
            scope.spawn(move || {
                barrier.wait();
                for round in 0..5_000u32 {
                    let p = a.raw_alloc(3 * MIB, s(t + 1)).unwrap();
                    let mark = (t * 31 + round) as u8;
                    // SAFETY: p is this thread's live 3 MiB host buffer until the free below.
                    let bytes = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, 3 * MIB) };
                    for at in (0..3 * MIB).step_by(64 << 10) {
                        bytes[at] = mark;
                    }
                    std::thread::yield_now();
                    for at in (0..3 * MIB).step_by(64 << 10) {
                        assert_eq!(
                            bytes[at], mark,
                            "thread {t} round {round}: byte {at} changed"
                        );
                    }
                    a.raw_free(p).unwrap();
                    // Its page idle while the others run: theirs to take.
                    std::thread::yield_now();
                }
            });
        }
    });
    a.check_invariants().unwrap();
    assert_eq!(a.allocated_bytes(), 0);
}

#[test]
fn without_release_at_peak_pages_are_created_instead() {
    let a = allocator(1 << 30, "release_at_peak:false");
    let x = a.raw_alloc(64 * MIB, s(0)).unwrap();
    let y = a.raw_alloc(64 * MIB, s(0)).unwrap();
    a.raw_free(x).unwrap();
    let z = a.raw_alloc(96 * MIB, s(0)).unwrap();
    let st = a.stats();
    assert_eq!(st.reserved_bytes_peak, 224 * MIB as u64);
    assert_eq!(st.counters.num_page_steals, 0);
    a.raw_free(y).unwrap();
    a.raw_free(z).unwrap();
}

#[test]
fn out_of_memory_steals_every_idle_page_then_reports() {
    let a = allocator(64 * MIB as u64, "");
    let failed = Arc::new(Mutex::new(0));
    let f = failed.clone();
    a.add_callback(Arc::new(move |_, _, ev| {
        if ev == AllocatorEvent::AllocationFailed {
            *f.lock().unwrap() += 1;
        }
    }));
    let x = a.raw_alloc(40 * MIB, s(0)).unwrap();
    let err = a.raw_alloc(40 * MIB, s(1)).unwrap_err();
    assert!(err.is_out_of_memory(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("tried to allocate 40.00 MiB") && msg.contains("64.00 MiB total"),
        "{msg}"
    );
    assert_eq!(*failed.lock().unwrap(), 1);
    a.check_invariants().unwrap();
    a.raw_free(x).unwrap();
    // x's pages are idle now: another stream's block gets them.
    let y = a.raw_alloc(60 * MIB, s(1)).unwrap();
    assert!(a.reserved_bytes() <= 64 * MIB as u64);
    a.raw_free(y).unwrap();
    a.check_invariants().unwrap();
}

#[test]
fn snapshot_and_history_show_mapping() {
    let a = allocator(1 << 30, "");
    a.record_memory_history(Some(HistoryConfig {
        max_entries: 1000,
        context: false,
    }));
    let x = a.raw_alloc(5 * MIB, s(0)).unwrap();
    let snap = a.memory_snapshot();
    assert_eq!(snap.segments.len(), 1);
    let seg = &snap.segments[0];
    assert!(seg.is_expandable);
    let unmapped: u64 = seg.unmapped.iter().map(|&(_, len)| len).sum();
    assert_eq!(
        seg.total_size - unmapped,
        6 * MIB as u64,
        "three pages mapped under a 5 MiB block"
    );
    assert_eq!(seg.blocks[0].state, BlockStatus::ActiveAllocated);
    a.raw_free(x).unwrap();
    a.empty_cache().unwrap();
    let actions: Vec<TraceAction> = a.memory_history().iter().map(|e| e.action).collect();
    use TraceAction::*;
    assert_eq!(
        actions,
        vec![
            SegmentMap,
            Alloc,
            Snapshot,
            FreeRequested,
            FreeCompleted,
            SegmentUnmap
        ]
    );
}

/// A freed block's memory may still be written by work queued on its stream (stream-ordered
/// reuse). At the memory limit, taking its pages for another stream must wait for that work:
/// were they unmapped first, the task below would write to inaccessible memory and crash.
#[test]
fn at_the_limit_stealing_pages_waits_for_the_stream_that_used_them() {
    std::env::remove_var("ACCELRT_ALLOC_CONF");
    let rt: Runtime<HostDriver> = Runtime::with_driver(HostDriver::with_devices(1).unwrap());
    let alloc = rt.allocator(0).unwrap();
    assert!(alloc.is_expandable());
    let total = rt.device_properties(0).unwrap().total_memory;
    alloc
        .set_memory_fraction(160.0 * MIB as f64 / total as f64)
        .unwrap(); // room for 160 MiB
    let s1 = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let s2 = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let x = alloc.raw_alloc(64 * MIB, s1).unwrap();
    let y = alloc.raw_alloc(64 * MIB, s1).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    rt.launch_host(
        s1,
        Arc::new(move || {
            std::thread::sleep(Duration::from_millis(60));
            // SAFETY: x stays mapped until s1 has passed this task (what the test checks).
            unsafe { std::ptr::write_bytes(x as *mut u8, 0x77, 64 * MIB) };
            d.store(true, Ordering::Release);
        }),
    )
    .unwrap();
    alloc.raw_free(x).unwrap(); // legal: s1's queued work still uses it, in stream order
    let z = alloc.raw_alloc(96 * MIB, s2).unwrap(); // needs x's pages: must wait for s1
    assert!(
        done.load(Ordering::Acquire),
        "pages were taken before the stream passed its work"
    );
    assert!(alloc.stats().counters.num_page_steals >= 1);
    alloc.raw_free(y).unwrap();
    alloc.raw_free(z).unwrap();
    rt.device_synchronize(0).unwrap();
}

/// Moving memory never waits for the GPU. A freed block's memory may still be written by work
/// queued on its stream; its chunk moves under a new block of the same stream at once (the
/// stream runs the old work first), and its old range stays mapped until a fence shows that
/// work done. Were the old range unmapped at the move, the queued task below would fault.
#[test]
fn moves_never_wait_and_keep_the_old_range_until_its_work_has_passed() {
    std::env::remove_var("ACCELRT_ALLOC_CONF");
    let rt: Runtime<HostDriver> = Runtime::with_driver(HostDriver::with_devices(1).unwrap());
    let alloc = rt.allocator(0).unwrap();
    let s1 = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let x = alloc.raw_alloc(64 * MIB, s1).unwrap();
    let y = alloc.raw_alloc(64 * MIB, s1).unwrap();
    rt.launch_host(
        s1,
        Arc::new(move || {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: x's old range stays mapped until s1 has passed this task (what the test
            // checks); its bytes now belong to z, whose own work runs after this, in order.
            unsafe { std::ptr::write_bytes(x as *mut u8, 0x77, 64 * MIB) };
        }),
    )
    .unwrap();
    alloc.raw_free(x).unwrap(); // legal: s1's queued work still uses it, in stream order
    let start = std::time::Instant::now();
    let z = alloc.raw_alloc(96 * MIB, s1).unwrap(); // past the peak: x's chunks move under z
    let waited = start.elapsed();
    let st = alloc.stats();
    let unmaps = st.driver_calls.unmap;
    assert!(
        st.counters.num_page_steals >= 1 && st.counters.num_pages_remapped >= 32,
        "x's idle memory moved: {:?}",
        st.counters
    );
    assert_eq!(
        st.reserved_bytes_peak,
        160 * MIB as u64,
        "no new memory for x's share"
    );
    assert!(
        waited < Duration::from_millis(150),
        "the move waited for s1: {waited:?}"
    );
    // Another slow path while the task still runs (a first small block): the lent range must
    // stay mapped (the task writes it in a moment).
    let v = alloc.raw_alloc(4096, s1).unwrap();
    let ok = Arc::new(AtomicBool::new(false));
    let o = ok.clone();
    rt.launch_host(
        s1,
        Arc::new(move || {
            // SAFETY: z is a live 96 MiB buffer; this task runs after the one writing x.
            let bytes = unsafe {
                std::ptr::write_bytes(z as *mut u8, 0x3C, 96 * MIB);
                std::slice::from_raw_parts(z as *const u8, 96 * MIB)
            };
            o.store(bytes.iter().all(|&b| b == 0x3C), Ordering::Release);
        }),
    )
    .unwrap();
    rt.stream_synchronize(s1).unwrap();
    assert!(
        ok.load(Ordering::Acquire),
        "z holds its own bytes, in stream order"
    );
    // The old range is unmapped on a later slow path, once the fence recorded at the move has
    // completed: nothing waits for it. Its fence answered "not yet" at `v`'s slow path, so
    // the pool's fences are asked again for housekeeping only after `QUIET_TICKS` (at most
    // 16) more allocations and frees of the pool: these cached ones make them.
    for _ in 0..16 {
        let t = alloc.raw_alloc(4096, s1).unwrap();
        alloc.raw_free(t).unwrap();
    }
    let w = alloc.raw_alloc(40 * MIB, s1).unwrap();
    assert!(
        alloc.stats().driver_calls.unmap > unmaps,
        "the lent range was unmapped: {:?}",
        alloc.stats().driver_calls
    );
    alloc.check_invariants().unwrap();
    for p in [y, z, w, v] {
        alloc.raw_free(p).unwrap();
    }
    rt.device_synchronize(0).unwrap();
    alloc.empty_cache().unwrap();
    assert_eq!(alloc.reserved_bytes(), 0);
    let calls = alloc.stats().driver_calls;
    assert_eq!(
        calls.create, calls.release,
        "every chunk released: {calls:?}"
    );
    assert_eq!(
        calls.reserve, calls.unreserve,
        "every range given back: {calls:?}"
    );
}

/// Chunk sizes: by default chunks of up to 64 MiB (`max_chunk_mb`); with `chunk_mb` below it
/// (memory first), short runs get chunks of that size and a long run about 12 chunks. And a
/// freed block's chunks are idle, so a block elsewhere takes them instead of new ones.
#[test]
fn chunks_are_sized_by_configuration_and_run_length() {
    // (configuration, one block of MiB plus extra bytes, chunks created for it). A block
    // whose end falls inside a page (extra bytes) shares that page with whatever comes next:
    // a run that fits in one chunk is then cut into its pages less one, and that one page.
    // A block ending on a page boundary shares nothing and is not cut.
    const KIB: usize = 1 << 10;
    let table = [
        ("", 8, 0, 1),
        ("", 8, KIB, 2), // 5 pages: 4 + 1
        ("", 64, 0, 1),
        ("", 62, KIB, 2),          // 32 pages: 31 + 1
        ("", 1024, 0, 16),         // 512 pages: 16 x 32
        ("", 1022, KIB, 17),       // 512 pages: 15 x 32, then 31 + 1
        ("chunk_mb:4", 8, 0, 2),   // 2 + 2 pages
        ("chunk_mb:4", 6, KIB, 3), // 2 + 1 + 1 pages
        ("chunk_mb:4", 64, 0, 16),
        ("chunk_mb:4", 240, 0, 12),   // 120 pages: 12 x 10
        ("chunk_mb:4", 238, KIB, 13), // 120 pages: 11 x 10, then 9 + 1
        ("chunk_mb:4", 1024, 0, 16),
        ("chunk_mb:8", 24, 0, 3),
        ("max_chunk_mb:2", 64, 0, 32),
        ("max_chunk_mb:1", 8, 0, 4), // never less than a page
    ];
    for (conf, mib, extra, chunks) in table {
        let a = allocator(4 << 30, conf);
        let bytes = mib * MIB + extra;
        let x = a.raw_alloc(bytes, s(0)).unwrap();
        let c = a.stats().driver_calls;
        assert_eq!(c.create, chunks, "{conf:?}, {mib} MiB + {extra}: {c:?}");
        assert_eq!(
            a.reserved_bytes(),
            bytes.div_ceil(2 * MIB) as u64 * 2 * MIB as u64,
            "{conf:?}: the block's pages only"
        );
        // The freed block's chunks are idle: a larger block takes them all (in place or
        // moved) and only the difference is new.
        let keep = a.raw_alloc(MIB, s(0)).unwrap();
        a.raw_free(x).unwrap();
        let y = a.raw_alloc((mib + 32) * MIB, s(0)).unwrap();
        assert!(
            a.reserved_bytes() <= ((mib + 36) * MIB) as u64,
            "{conf:?}, {mib} MiB: reserved {}",
            a.reserved_bytes()
        );
        for p in [keep, y] {
            a.raw_free(p).unwrap();
        }
    }
}

/// With `chunk_div` (256 by default), once the pool's first cycle is over, a short run's new
/// chunks follow reserved memory: at most reserved / the divisor (at least a page, at most
/// the largest chunk), and a long run is cut into about 12 chunks as in the memory-first
/// mode. With `chunk_div:off`, and during the first cycle, the chunk size is fixed.
#[test]
fn chunk_div_sizes_new_chunks_by_reserved_memory() {
    // (configuration, MiB already live, then a block of MiB, chunks created for that block).
    // Every size is whole pages, so no run shares a page with a neighbour.
    let table = [
        ("chunk_div:256", 0, 24, 12),      // nothing reserved: one-page chunks
        ("chunk_div:256", 2048, 24, 3),    // 1,024 pages reserved: chunks of 4
        ("chunk_div:256", 4096, 24, 2),    // 2,048 pages: 8 + 4
        ("chunk_div:256", 4096, 1024, 16), // a long run: 512 pages / 12, at most 32 a chunk
        ("chunk_div:256", 16384, 24, 1),   // 8,192 pages: 32, the largest chunk
        ("chunk_div:64", 2048, 24, 1),     // 1,024 pages / 64 = 16
        ("", 2048, 24, 3),                 // the default: 256
        ("chunk_div:off", 2048, 24, 1),
    ];
    for (conf, live_mib, mib, chunks) in table {
        let a = allocator(64 << 30, conf);
        // The pool's first cycle, over before the table's blocks (`chunk_div` applies from
        // then on): a small block allocated and freed, its segment given back.
        let p = a.raw_alloc(4096, s(0)).unwrap();
        a.raw_free(p).unwrap();
        a.empty_cache().unwrap();
        let live = (live_mib > 0).then(|| a.raw_alloc(live_mib * MIB, s(0)).unwrap());
        let before = a.stats().driver_calls.create;
        let x = a.raw_alloc(mib * MIB, s(0)).unwrap();
        let created = a.stats().driver_calls.create - before;
        assert_eq!(created, chunks, "{conf:?}, {live_mib} MiB live, {mib} MiB");
        assert_eq!(
            a.reserved_bytes(),
            ((live_mib + mib) * MIB) as u64,
            "{conf:?}: the blocks' pages only"
        );
        a.raw_free(x).unwrap();
        if let Some(p) = live {
            a.raw_free(p).unwrap();
        }
    }
    // During the first cycle: one chunk for the 24 MiB block, as with `chunk_div:off`.
    for conf in ["chunk_div:256", ""] {
        let a = allocator(64 << 30, conf);
        let x = a.raw_alloc(24 * MIB, s(0)).unwrap();
        assert_eq!(
            a.stats().driver_calls.create,
            1,
            "{conf:?}: the first cycle's chunk"
        );
        a.raw_free(x).unwrap();
    }
}

/// Every driver call is counted, one count per kind, and `total` is their sum.
#[test]
fn driver_calls_are_counted_per_kind() {
    let a = allocator(1 << 30, "");
    let x = a.raw_alloc(64 * MIB, s(0)).unwrap(); // one range, chunks for 32 pages
    let c = a.stats().driver_calls;
    assert_eq!((c.reserve, c.segment_alloc), (1, 0));
    assert!(
        c.create >= 1 && c.map >= c.create && c.set_access >= 1,
        "{c:?}"
    );
    assert_eq!(c.total(), c.named().iter().map(|(_, n)| n).sum::<u64>());
    // A cached pair makes no driver call.
    a.raw_free(x).unwrap();
    let again = a.raw_alloc(64 * MIB, s(0)).unwrap();
    assert_eq!(a.stats().driver_calls, c, "reuse in place calls nothing");
    a.raw_free(again).unwrap();
    a.empty_cache().unwrap();
    let c = a.stats().driver_calls;
    assert_eq!(c.release, c.create);
    assert!(c.unmap >= 1 && c.unreserve == 1, "{c:?}");
    let flat = a.stats().to_flat_map();
    assert_eq!(flat["driver_calls.total"], c.total());
    assert_eq!(flat["driver_calls.create"], c.create);
    // Plain segments count segment allocations instead.
    let config = AllocatorConfig::parse("expandable_segments:false").unwrap();
    let plain =
        CachingAllocator::new(DEV, Arc::new(HostMemory::new(1 << 30)), None, config).unwrap();
    let x = plain.raw_alloc(64 * MIB, s(0)).unwrap();
    plain.raw_free(x).unwrap();
    plain.empty_cache().unwrap();
    let c = plain.stats().driver_calls;
    assert_eq!(
        (c.segment_alloc, c.segment_free, c.create, c.map),
        (1, 1, 0, 0),
        "{c:?}"
    );
    // ... and make no virtual-memory call, so none is timed (`vm_call_us`).
    assert_eq!(plain.stats().counters.vm_call_us, 0);
}

/// The time of the virtual-memory calls is measured (`vm_call_us`): what the counts cost.
#[test]
fn the_time_of_virtual_memory_calls_is_measured_and_reset_with_the_counts() {
    let a = allocator(1 << 30, "");
    // 50 rounds of create, map (an mmap here), unmap and release: hundreds of system calls.
    for _ in 0..50 {
        let x = a.raw_alloc(16 * MIB, s(0)).unwrap();
        a.raw_free(x).unwrap();
        a.empty_cache().unwrap();
    }
    let st = a.stats();
    assert!(st.driver_calls.map >= 50, "{:?}", st.driver_calls);
    assert!(st.counters.vm_call_us > 0, "{:?}", st.counters);
    assert_eq!(st.to_flat_map()["vm_call_us"], st.counters.vm_call_us);
    a.reset_accumulated_stats();
    assert_eq!(a.stats().counters.vm_call_us, 0);
    // Plain segments time nothing: `driver_calls_are_counted_per_kind`.
}

#[test]
fn page_size_is_configurable_in_multiples_of_the_granularity() {
    // (page MiB, reserved after a 5 MiB block)
    for (page_mb, reserved_mb) in [(2u64, 6u64), (8, 8), (20, 20)] {
        let a = allocator(1 << 30, &format!("expandable_page_mb:{page_mb}"));
        let x = a.raw_alloc(5 * MIB, s(0)).unwrap();
        assert_eq!(a.reserved_bytes(), reserved_mb << 20, "{page_mb} MiB pages");
        a.raw_free(x).unwrap();
        a.empty_cache().unwrap();
        assert_eq!(a.reserved_bytes(), 0);
    }
    let config = AllocatorConfig::parse("expandable_page_mb:3").unwrap();
    let err =
        CachingAllocator::new(DEV, Arc::new(HostMemory::new(1 << 30)), None, config).unwrap_err();
    assert!(
        err.to_string()
            .contains("not a multiple of host:0's page granularity (2.00 MiB)"),
        "{err}"
    );
}

/// `reserved` is the sum of the breakdown's parts: nothing is counted twice or lost.
fn assert_adds_up(b: &accelrt::alloc::PeakBreakdown) {
    assert_eq!(b.accounted() + b.other, b.reserved, "{b:?}");
}

#[test]
fn the_peak_breakdown_shows_free_pages_stranded_in_a_partly_used_chunk() {
    let a = allocator(1 << 30, "");
    assert_eq!(a.peak_breakdown(), None, "off until asked for");
    a.record_peak_breakdown(true);
    assert_eq!(a.peak_breakdown(), None, "no peak yet");
    // A 10 MiB block (five pages, its own chunks) with a live block after it; freed, then a
    // 2 MiB block reuses the start of its range, so the chunk under it is partly used and its
    // other pages lie free between two live blocks.
    let big = a.raw_alloc(10 * MIB, s(0)).unwrap();
    let first = a
        .peak_breakdown()
        .expect("the first allocation raised the peak");
    assert_adds_up(&first);
    let after = a.raw_alloc(2 * MIB, s(0)).unwrap();
    assert_eq!(after, big + 10 * MIB);
    a.raw_free(big).unwrap();
    let small = a.raw_alloc(2 * MIB, s(0)).unwrap();
    assert_eq!(small, big, "best fit reuses the freed range");
    // A request those 8 MiB cannot hold raises the peak.
    let larger = a.raw_alloc(20 * MIB, s(0)).unwrap();
    let b = a.peak_breakdown().unwrap();
    assert_adds_up(&b);
    assert_eq!(b.reserved, a.stats().reserved_bytes_peak);
    // The request's own block is carved (and counted) before its memory is mapped.
    assert_eq!(b.allocated, 24 * MIB as u64, "{b:?}");
    assert!(
        b.free_in_used_chunks >= 4 * MIB as u64,
        "the free pages of the 10 MiB block's chunk: {b:?}"
    );
    for p in [small, after, larger] {
        a.raw_free(p).unwrap();
    }
    a.record_peak_breakdown(false);
    assert_eq!(a.peak_breakdown(), None, "turning it off forgets it");
}

#[test]
fn the_peak_breakdown_adds_up_through_churn_in_both_segment_kinds() {
    for conf in ["", "expandable_segments:false"] {
        let a = allocator_any(conf);
        a.record_peak_breakdown(true);
        let mut live: Vec<usize> = Vec::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if live.len() > 40 || (i % 3 == 2 && !live.is_empty()) {
                let p = live.swap_remove((x % live.len() as u64) as usize);
                a.raw_free(p).unwrap();
            } else {
                let size = 1 + (x % (24 * MIB as u64)) as usize;
                live.push(a.raw_alloc(size, s(0)).unwrap());
            }
        }
        let b = a.peak_breakdown().expect("peaks were reached");
        assert_adds_up(&b);
        assert_eq!(b.reserved, a.stats().reserved_bytes_peak, "{conf}");
        assert!(b.allocated <= b.reserved);
        if conf.is_empty() {
            assert_eq!(b.free_in_segments, 0, "no plain segments");
        } else {
            let vm_parts = b.free_in_shared_pages + b.free_in_used_chunks + b.idle_chunks;
            assert_eq!(
                vm_parts + b.spare_chunks,
                0,
                "no chunks with plain segments"
            );
        }
        live.into_iter().for_each(|p| a.raw_free(p).unwrap());
    }
}

fn allocator_any(conf: &str) -> CachingAllocator {
    let mut config = AllocatorConfig::parse(conf).unwrap();
    config.debug_checks = true;
    CachingAllocator::new(DEV, Arc::new(HostMemory::new(1 << 30)), None, config).unwrap()
}

/// Churn at the peak (RMM's random benchmark, shortened): `live` allocations of 1 B..`max`,
/// then `ops` times free a random one and allocate another, under `clock` and configuration
/// `conf`. Returns the allocator's figures after it.
fn churn(conf: &str, clock: accelrt::alloc::Clock) -> accelrt::alloc::MemoryStats {
    let mut config = AllocatorConfig::parse(conf).unwrap();
    config.debug_checks = false; // 40,000 calls
    let a = CachingAllocator::new(DEV, Arc::new(HostMemory::new(64 << 30)), None, config).unwrap();
    a.set_clock(clock);
    let mut rng = accelrt::alloc::splitmix::SplitMix64(7);
    let (live, max, ops) = (200, 256 * MIB as u64, 20_000);
    let mut ptrs: Vec<usize> = (0..live)
        .map(|_| a.raw_alloc(1 + rng.below(max) as usize, s(0)).unwrap())
        .collect();
    for _ in 0..ops {
        let k = rng.below(live as u64) as usize;
        a.raw_free(ptrs[k]).unwrap();
        ptrs[k] = a.raw_alloc(1 + rng.below(max) as usize, s(0)).unwrap();
    }
    let stats = a.stats();
    ptrs.into_iter().for_each(|p| a.raw_free(p).unwrap());
    stats
}

#[test]
fn moves_take_a_bounded_share_of_the_time() {
    use accelrt::alloc::Clock;
    // A clock that stands still: after the 25 ms of moves in hand at the start (60 us a
    // chunk), no more moves; memory is created instead.
    let frozen = churn("", Clock::External(Arc::new(|| 0)));
    // A clock on which a second passes between readings: time never runs short.
    let tick = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t = Arc::clone(&tick);
    let roomy = churn(
        "",
        Clock::External(Arc::new(move || t.fetch_add(1_000_000, Ordering::Relaxed))),
    );
    // No clock (a replay of an untimed trace): counted moves only.
    let off = churn("", Clock::Off);

    let (f, r, o) = (&frozen.counters, &roomy.counters, &off.counters);
    assert!(f.num_moves_deferred > 0, "the frozen clock declined moves");
    assert_eq!(r.num_moves_deferred, 0);
    assert_eq!(o.num_moves_deferred, 0);
    // Moved chunks are mapped a second time: with the clock frozen, at most the start's worth
    // (416 chunks, plus the chunks of the move that overdrew it) beyond the creations.
    let moved = |st: &accelrt::alloc::MemoryStats| st.driver_calls.map - st.driver_calls.create;
    assert!(
        moved(&frozen) < moved(&roomy),
        "{} vs {}",
        moved(&frozen),
        moved(&roomy)
    );
    assert!(moved(&frozen) <= 416 + 256, "{}", moved(&frozen));
    // Without a time limit, the clock makes no difference.
    assert_eq!(r.num_page_steals, o.num_page_steals);
    assert_eq!(roomy.reserved_bytes_peak, off.reserved_bytes_peak);
    // How much of the budget was drawn at once: all of the 25 ms in hand and the overdraft
    // of the last move with the clock frozen; with a second between readings, never more
    // than one move's chunks (the bucket is full again at the next reading); nothing is
    // withheld without a clock, and nothing is reported.
    let drawn = |st: &accelrt::alloc::MemoryStats| st.counters.move_time_drawn_peak_us;
    assert!(drawn(&frozen) >= 25_000, "{}", drawn(&frozen));
    assert!(
        drawn(&roomy) > 0 && drawn(&roomy) <= 256 * 60,
        "{}",
        drawn(&roomy)
    );
    assert_eq!(drawn(&off), 0);
}

#[test]
fn reset_peak_stats_sets_the_drawn_peak_to_what_is_drawn_now() {
    use accelrt::alloc::Clock;
    let mut config = AllocatorConfig::parse("").unwrap();
    config.debug_checks = false;
    let a = CachingAllocator::new(DEV, Arc::new(HostMemory::new(8 << 30)), None, config).unwrap();
    a.set_clock(Clock::External(Arc::new(|| 0))); // time stands still: nothing is put back
                                                  // Every other block freed: idle chunks between live blocks, none large enough for the
                                                  // next request, which takes them (moves) rather than grow past the peak.
    let blocks: Vec<usize> = (0..8)
        .map(|_| a.raw_alloc(64 * MIB, s(0)).unwrap())
        .collect();
    for p in blocks.iter().step_by(2) {
        a.raw_free(*p).unwrap();
    }
    let big = a.raw_alloc(200 * MIB, s(0)).unwrap();
    let drawn = a.stats().counters.move_time_drawn_peak_us;
    assert!(a.stats().counters.num_page_steals > 0);
    assert!(drawn > 0);
    a.reset_peak_stats();
    // The clock stood still: what was drawn is still drawn.
    assert_eq!(a.stats().counters.move_time_drawn_peak_us, drawn);
    a.raw_free(big).unwrap();
    for p in blocks.iter().skip(1).step_by(2) {
        a.raw_free(*p).unwrap();
    }
}

#[test]
fn move_time_pct_sets_the_share() {
    use accelrt::alloc::Clock;
    // 100 us pass between readings: 10 us of moves a reading at the default 10% (a chunk
    // costs 60 us: the budget runs dry), 100 us at 100% (never dry here), nothing at 0% (only
    // the 25 ms in hand at the start).
    let ticking = || {
        let t = Arc::new(std::sync::atomic::AtomicU64::new(0));
        Clock::External(Arc::new(move || t.fetch_add(100, Ordering::Relaxed)))
    };
    let default = churn("", ticking());
    let all = churn("move_time_pct:100", ticking());
    let none = churn("move_time_pct:0", ticking());
    let deferred = |st: &accelrt::alloc::MemoryStats| st.counters.num_moves_deferred;
    assert_eq!(deferred(&all), 0);
    assert!(deferred(&default) > 0);
    assert!(deferred(&none) > 0);
    let steals = |st: &accelrt::alloc::MemoryStats| st.counters.num_page_steals;
    assert!(steals(&none) < steals(&default) && steals(&default) < steals(&all));
}
