//! Private memory pools: routing during capture, memory kept for replays, release.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use accelrt::alloc::{AllocatorConfig, CachingAllocator, StreamFilter};
use accelrt::backend::host::{HostDriver, HostMemory};
use accelrt::runtime::Runtime;
use accelrt::{Backend, MempoolId, StreamPriority};

use crate::common::{host_stream as s, HOST0 as DEV};

const MIB: usize = 1 << 20;

fn allocator() -> CachingAllocator {
    let config = AllocatorConfig {
        debug_checks: true,
        ..AllocatorConfig::default()
    };
    CachingAllocator::new(DEV, Arc::new(HostMemory::new(1 << 30)), None, config).unwrap()
}

#[test]
fn allocations_on_filtered_streams_go_to_the_pool_and_stay_there() {
    let a = allocator();
    let pool = a.new_pool_id();
    a.begin_allocate_to_pool(pool, StreamFilter::Only(s(1)))
        .unwrap();
    let inside = a.raw_alloc(3 * MIB, s(1)).unwrap();
    let outside = a.raw_alloc(3 * MIB, s(2)).unwrap(); // other stream: its own pool
    a.end_allocate_to_pool(pool).unwrap();
    let snap = a.memory_snapshot();
    let seg_of = |p: usize| {
        snap.segments
            .iter()
            .find(|g| g.address <= p as u64 && (p as u64) < g.address + g.total_size)
            .unwrap()
    };
    assert_eq!(seg_of(inside).segment_pool_id, (pool.0, pool.1));
    assert!(
        !seg_of(inside).is_expandable,
        "private pools use plain segments"
    );
    assert_eq!(seg_of(outside).segment_pool_id, (0, 0));
    // Freed, the block returns to the private pool: stream 1 does not get it outside capture.
    a.raw_free(inside).unwrap();
    let later = a.raw_alloc(3 * MIB, s(1)).unwrap();
    assert_ne!(
        later, inside,
        "memory of a private pool is not handed to ordinary allocations"
    );
    // Routing to the pool again (a replay's allocations) reuses its memory.
    a.begin_allocate_to_pool(pool, StreamFilter::Only(s(1)))
        .unwrap();
    let again = a.raw_alloc(3 * MIB, s(1)).unwrap();
    a.end_allocate_to_pool(pool).unwrap();
    assert_eq!(again, inside);
    for p in [outside, later, again] {
        a.raw_free(p).unwrap();
    }
    a.check_invariants().unwrap();
}

#[test]
fn releasing_the_last_use_gives_memory_back_even_if_blocks_outlive_it() {
    let a = allocator();
    let pool = a.new_pool_id();
    a.begin_allocate_to_pool(pool, StreamFilter::All).unwrap();
    let x = a.raw_alloc(30 * MIB, s(0)).unwrap();
    let y = a.raw_alloc(40 * MIB, s(3)).unwrap();
    a.end_allocate_to_pool(pool).unwrap();
    a.retain_pool(pool).unwrap(); // e.g. a second graph shares it
    assert_eq!(a.pool_use_count(pool), Some(2));
    a.raw_free(x).unwrap();
    let before = a.reserved_bytes();
    a.release_pool(pool).unwrap();
    assert_eq!(
        a.reserved_bytes(),
        before,
        "one use remains: nothing is released"
    );
    a.release_pool(pool).unwrap();
    assert_eq!(
        a.reserved_bytes(),
        before - 30 * MIB as u64,
        "the cached segment goes at once"
    );
    a.raw_free(y).unwrap();
    assert_eq!(
        a.reserved_bytes(),
        0,
        "the last block's segment goes when it is freed"
    );
    assert_eq!(
        a.pool_use_count(pool),
        None,
        "an emptied, released pool is gone"
    );
    a.check_invariants().unwrap();
}

/// A captured graph replays into blocks it freed during capture: `empty_cache` must leave a
/// private pool's memory alone while the pool is in use (PyTorch frees only pools nothing
/// uses), and give it back once the pool is released.
#[test]
fn empty_cache_keeps_a_private_pool_in_use() {
    let a = allocator();
    let pool = a.new_pool_id();
    a.begin_allocate_to_pool(pool, StreamFilter::All).unwrap();
    let x = a.raw_alloc(30 * MIB, s(0)).unwrap();
    a.end_allocate_to_pool(pool).unwrap();
    a.raw_free(x).unwrap(); // freed during capture: its memory is the graph's
    let before = a.reserved_bytes();
    a.empty_cache().unwrap();
    assert_eq!(
        a.reserved_bytes(),
        before,
        "the pool is in use: its memory stays"
    );
    a.begin_allocate_to_pool(pool, StreamFilter::All).unwrap();
    assert_eq!(a.raw_alloc(30 * MIB, s(0)).unwrap(), x, "a replay finds it");
    a.end_allocate_to_pool(pool).unwrap();
    a.raw_free(x).unwrap();
    a.release_pool(pool).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.reserved_bytes(), 0, "released: everything goes back");
    a.check_invariants().unwrap();
}

/// CUDA graph trees put a pool back to a checkpoint: blocks freed since are claimed again at
/// their old addresses; anything but a free range of the pool is refused and changes nothing.
#[test]
fn claim_block_puts_a_freed_block_back() {
    let a = allocator();
    let pool = a.new_pool_id();
    a.begin_allocate_to_pool(pool, StreamFilter::All).unwrap();
    let x = a.raw_alloc(3 * MIB, s(0)).unwrap();
    let y = a.raw_alloc(5 * MIB, s(0)).unwrap();
    a.end_allocate_to_pool(pool).unwrap();
    let x_size = a.block_size(x).unwrap();
    a.raw_free(x).unwrap();
    let allocated = a.allocated_bytes();
    a.claim_block(pool, x, x_size, 3 * MIB as u64).unwrap();
    assert_eq!(a.allocated_bytes(), allocated + x_size);
    assert_eq!(a.requested_size(x).unwrap(), 3 * MIB as u64);
    a.check_invariants().unwrap();
    let y_size = a.block_size(y).unwrap();
    for (ptr, size, requested, why) in [
        (y, y_size, 1, "not free"),
        (x, x_size, 1, "not free"),
        (x + 512, 1024, 1, "not free"),
        (0x10, 1024, 1, "512"),
        (x, 1000, 1, "512"),
        (x, x_size, x_size + 1, "requested"),
    ] {
        let err = a
            .claim_block(pool, ptr, size, requested)
            .unwrap_err()
            .to_string();
        assert!(err.contains(why), "claim {ptr:#x} {size}: {err}");
    }
    let other = a.new_pool_id();
    assert!(
        a.claim_block(other, x, x_size, 1).is_err(),
        "an unknown pool"
    );
    a.check_invariants().unwrap();
    // The claimed block frees like any other.
    a.raw_free(x).unwrap();
    a.raw_free(y).unwrap();
    a.release_pool(pool).unwrap();
    assert_eq!(a.reserved_bytes(), 0);
}

#[test]
fn misuse_is_refused() {
    let a = allocator();
    let unknown = MempoolId(0, 999);
    let cases = [
        (
            a.begin_allocate_to_pool(MempoolId::NONE, StreamFilter::All)
                .unwrap_err()
                .to_string(),
            "(0, 0) is not a pool",
        ),
        (
            a.end_allocate_to_pool(unknown).unwrap_err().to_string(),
            "no private pool",
        ),
        (
            a.release_pool(unknown).unwrap_err().to_string(),
            "no private pool",
        ),
        (
            a.retain_pool(unknown).unwrap_err().to_string(),
            "no private pool",
        ),
    ];
    for (err, want) in cases {
        assert!(err.contains(want), "'{err}' lacks '{want}'");
    }
}

/// Capture on a host stream: the captured task writes into memory allocated during the
/// capture; each replay runs it again on that memory; reset gives the memory back.
#[test]
fn graph_capture_replay_and_release_with_a_private_pool() {
    std::env::remove_var("ACCELRT_ALLOC_CONF");
    let rt: Runtime<HostDriver> = Runtime::with_driver(HostDriver::with_devices(1).unwrap());
    let alloc = rt.allocator(0).unwrap();
    let stream = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let graph = rt.graph_create(0).unwrap();
    rt.graph_capture_begin(graph, stream, MempoolId::NONE)
        .unwrap();
    let buf = alloc.raw_alloc(8 * MIB, stream).unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    rt.launch_host(
        stream,
        Arc::new(move || {
            // SAFETY: buf is an 8 MiB host buffer kept by the graph's pool for its replays.
            let counter = unsafe { &*(buf as *const AtomicU64) };
            counter.fetch_add(1, Ordering::Relaxed);
            r.fetch_add(1, Ordering::Relaxed);
        }),
    )
    .unwrap();
    rt.graph_capture_end(graph).unwrap();
    assert_eq!(
        runs.load(Ordering::Relaxed),
        0,
        "capture records, it does not run"
    );
    let pool = rt.graph_pool(graph).unwrap();
    assert_eq!(alloc.pool_use_count(pool), Some(1));
    // SAFETY: buf is live; zero its counter before the replays.
    unsafe { (*(buf as *const AtomicU64)).store(0, Ordering::Relaxed) };
    for _ in 0..3 {
        rt.graph_replay(graph).unwrap();
    }
    rt.stream_synchronize(stream).unwrap();
    assert_eq!(
        // SAFETY: as above; the stream has finished.
        unsafe { (*(buf as *const AtomicU64)).load(Ordering::Relaxed) },
        3
    );
    // The program drops its tensor: the block stays in the graph's pool.
    alloc.raw_free(buf).unwrap();
    let other = alloc.raw_alloc(8 * MIB, stream).unwrap();
    assert_ne!(
        other, buf,
        "the graph's memory is not handed out while the graph lives"
    );
    alloc.raw_free(other).unwrap();
    let reserved = alloc.reserved_bytes();
    rt.graph_reset(graph).unwrap();
    assert!(
        alloc.reserved_bytes() < reserved,
        "reset released the graph's pool"
    );
    assert_eq!(alloc.pool_use_count(pool), None);
    rt.graph_destroy(graph).unwrap();
    alloc.check_invariants().unwrap();
}
