//! Fences and pending frees: how often the allocator asks the device (issue 10's driver
//! calls), on a device whose completions the test controls.
//!
//! A fence is an event recorded on a pool's stream; once it completes, memory freed before it
//! is no longer used by queued work (lent ranges can be unmapped, idle chunks given back). A
//! stream passes its fences in order, so one answer stands for every older fence, and a
//! "not yet" stays true until the device moves on.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use accelrt::alloc::{AllocatorConfig, CachingAllocator, HostMemory, StreamEvents, QUIET_TICKS};
use accelrt::{AllocError, Stream};
use common::Gate;

const MIB: usize = 1 << 20;
use crate::common::{host_stream as stream, HOST0 as DEV};

/// A device that completes nothing until told: tickets up to `passed` have completed.
#[derive(Default)]
struct Clock {
    issued: AtomicU64,
    passed: AtomicU64,
    queries: AtomicU64,
    records: AtomicU64,
    /// While set, `query` blocks on it (a slow driver call).
    hold: Mutex<Option<Gate>>,
    in_query: AtomicBool,
}

impl Clock {
    /// The device passes everything queued so far.
    fn pass_all(&self) {
        self.passed
            .store(self.issued.load(Ordering::SeqCst), Ordering::SeqCst);
    }
    fn queries(&self) -> u64 {
        self.queries.load(Ordering::SeqCst)
    }
    fn records(&self) -> u64 {
        self.records.load(Ordering::SeqCst)
    }
}

impl StreamEvents for Clock {
    fn record(&self, _stream: Stream) -> Result<u64, AllocError> {
        self.records.fetch_add(1, Ordering::SeqCst);
        Ok(self.issued.fetch_add(1, Ordering::SeqCst) + 1)
    }
    fn query(&self, ticket: u64) -> Result<bool, AllocError> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let hold = self.hold.lock().unwrap().clone();
        if let Some(gate) = hold {
            self.in_query.store(true, Ordering::SeqCst);
            gate.wait();
        }
        Ok(ticket <= self.passed.load(Ordering::SeqCst))
    }
    fn synchronize(&self, ticket: u64) -> Result<(), AllocError> {
        self.passed.fetch_max(ticket, Ordering::SeqCst);
        Ok(())
    }
    fn wait(&self, _stream: Stream, _ticket: u64) -> Result<(), AllocError> {
        Ok(())
    }
    fn release(&self, _ticket: u64) {}
    fn synchronize_device(&self, _device: u32) -> Result<(), AllocError> {
        self.pass_all();
        Ok(())
    }
}

/// The default configuration (expandable segments, `release_at_peak`), checked after every
/// call, over a large sparse host device and `Clock`.
fn allocator() -> (CachingAllocator, Arc<Clock>) {
    allocator_checked(true)
}

/// With `debug_checks` or without: with them, the check after each call waits for every call
/// in flight, so a test of what calls on other threads do meanwhile turns them off.
fn allocator_checked(debug_checks: bool) -> (CachingAllocator, Arc<Clock>) {
    let clock = Arc::new(Clock::default());
    let config = AllocatorConfig {
        debug_checks,
        ..AllocatorConfig::default()
    };
    let a = CachingAllocator::new(
        DEV,
        Arc::new(HostMemory::new(1 << 36)),
        Some(clock.clone()),
        config,
    )
    .unwrap();
    assert!(a.is_expandable());
    (a, clock)
}

/// Pool ticks (allocations and frees) without a slow path: a cached small block, 16 times.
fn tick(a: &CachingAllocator, s: Stream) {
    for _ in 0..16 {
        let t = a.raw_alloc(4096, s).unwrap();
        a.raw_free(t).unwrap();
    }
}

#[test]
fn a_pending_fence_is_asked_once_until_the_pool_moves_on() {
    let (a, clock) = allocator();
    let s = stream(0);
    let x = a.raw_alloc(64 * MIB, s).unwrap();
    let y = a.raw_alloc(64 * MIB, s).unwrap();
    a.raw_free(x).unwrap();
    let z = a.raw_alloc(96 * MIB, s).unwrap(); // past the peak: x's chunks move under z
    assert!(a.stats().counters.num_page_steals >= 1, "x's memory moved");
    assert_eq!(clock.records(), 1, "one fence covers x's old range");
    // Five more slow paths while the device has not passed that fence: it is asked once per
    // QUIET_TICKS of them (each is one pool tick).
    let before = clock.queries();
    let mut more: Vec<usize> = (0..5)
        .map(|i| a.raw_alloc((40 + i) * MIB, s).unwrap())
        .collect();
    assert_eq!(
        clock.queries() - before,
        5u64.div_ceil(QUIET_TICKS),
        "a fence that answered \"not yet\" is asked again only QUIET_TICKS slow paths later"
    );
    // The device passes it; housekeeping asks again once the pool has moved on, once, and
    // the old range is unmapped.
    clock.pass_all();
    let (before, unmaps) = (clock.queries(), a.stats().driver_calls.unmap);
    tick(&a, s);
    more.push(a.raw_alloc(50 * MIB, s).unwrap());
    assert_eq!(clock.queries() - before, 1, "one answer");
    assert!(
        a.stats().driver_calls.unmap > unmaps,
        "the lent range was unmapped: {:?}",
        a.stats().driver_calls
    );
    assert_eq!(
        a.stats().driver_calls.event_query,
        clock.queries(),
        "driver_calls counts every query"
    );
    for p in more.into_iter().chain([y, z]) {
        a.raw_free(p).unwrap();
    }
    a.check_invariants().unwrap();
}

#[test]
fn ranges_lent_before_a_fence_share_it() {
    let (a, clock) = allocator();
    let s = stream(0);
    // Three 64 MiB holes between live blocks.
    let blocks: Vec<usize> = (0..6).map(|_| a.raw_alloc(64 * MIB, s).unwrap()).collect();
    for &x in blocks.iter().step_by(2) {
        a.raw_free(x).unwrap();
    }
    // Two allocations past the peak, each filled by moving chunks out of the holes: every
    // range lent was last used before the first move's fence, which covers them all.
    let z1 = a.raw_alloc(66 * MIB, s).unwrap();
    let steals = a.stats().counters.num_page_steals;
    assert_eq!(clock.records(), 1);
    let z2 = a.raw_alloc(66 * MIB, s).unwrap();
    assert!(
        a.stats().counters.num_page_steals > steals,
        "the second allocation moved chunks too"
    );
    assert_eq!(
        clock.records(),
        1,
        "ranges freed before a fence in flight need no fence of their own"
    );
    assert_eq!(a.stats().driver_calls.event_record, 1);
    // Memory freed after that fence needs a new one.
    a.raw_free(blocks[1]).unwrap();
    let z3 = a.raw_alloc(130 * MIB, s).unwrap();
    assert_eq!(clock.records(), 2);
    for p in [z1, z2, z3, blocks[3], blocks[5]] {
        a.raw_free(p).unwrap();
    }
    a.check_invariants().unwrap();
}

#[test]
fn one_answer_of_the_newest_fence_stands_for_the_older_ones() {
    let (a, clock) = allocator();
    let s = stream(0);
    // A first step, all freed and allocated again: what the pool frees from now on may move
    // (moves wait for its first cycle: `PoolState::recycling`).
    let first: Vec<usize> = (0..10).map(|_| a.raw_alloc(64 * MIB, s).unwrap()).collect();
    first.into_iter().for_each(|p| a.raw_free(p).unwrap());
    let blocks: Vec<usize> = (0..10).map(|_| a.raw_alloc(64 * MIB, s).unwrap()).collect();
    // Five rounds: free a hole, move its chunks under a new block; each round's range was
    // used after the previous fence, so each records one.
    let mut moved = Vec::new();
    for r in 0..5 {
        a.raw_free(blocks[2 * r]).unwrap();
        moved.push(a.raw_alloc(64 * MIB + 4096, s).unwrap());
    }
    assert_eq!(clock.records(), 5, "five fences in flight");
    clock.pass_all();
    // Housekeeping on the next slow paths (the small blocks' first segment, then 20 MiB).
    let (before, unmaps) = (clock.queries(), a.stats().driver_calls.unmap);
    tick(&a, s);
    moved.push(a.raw_alloc(20 * MIB, s).unwrap());
    assert!(
        a.stats().driver_calls.unmap > unmaps,
        "the lent ranges were unmapped"
    );
    assert!(
        clock.queries() - before <= 2,
        "the oldest useful fence and the newest answer for all five: {} queries",
        clock.queries() - before
    );
    for p in moved
        .into_iter()
        .chain(blocks.iter().skip(1).step_by(2).copied())
    {
        a.raw_free(p).unwrap();
    }
    a.check_invariants().unwrap();
}

/// The events of pending frees are asked with the pool's lock released: a slow driver query
/// does not hold up frees and allocations of the pool on other threads.
#[test]
fn pending_frees_are_asked_without_the_pool_lock() {
    let (a, clock) = allocator_checked(false);
    let (s0, s1) = (stream(0), stream(1));
    let keep = a.raw_alloc(MIB, s0).unwrap();
    let cached = a.raw_alloc(2 * MIB, s0).unwrap();
    a.raw_free(cached).unwrap();
    let p = a.raw_alloc(MIB, s0).unwrap();
    a.record_stream(p, s1).unwrap();
    a.raw_free(p).unwrap(); // pending: waits for an event on s1
    let gate = Gate::new();
    *clock.hold.lock().unwrap() = Some(gate.clone());
    let a = &a;
    std::thread::scope(|scope| {
        let asking = scope.spawn(|| a.free_inactive_buffers());
        assert!(common::eventually(|| clock.in_query.load(Ordering::SeqCst)));
        let (tx, rx) = std::sync::mpsc::channel();
        let other = scope.spawn(move || {
            let q = a.raw_alloc(2 * MIB, s0).unwrap();
            a.raw_free(q).unwrap();
            a.raw_free(keep).unwrap();
            tx.send(()).unwrap();
        });
        let went_on = rx.recv_timeout(Duration::from_secs(5)).is_ok();
        *clock.hold.lock().unwrap() = None;
        gate.open();
        asking.join().unwrap().unwrap();
        other.join().unwrap();
        assert!(
            went_on,
            "an allocation and frees of the pool waited for another thread's event query"
        );
    });
    clock.pass_all();
    a.free_inactive_buffers().unwrap();
    assert_eq!(
        a.stats().combined.active_bytes.current,
        0,
        "the pending free finished"
    );
    a.check_invariants().unwrap();
}

/// Fences are asked with the pool's lock released too: a slow driver query of a fence does
/// not hold up the pool's fast paths on other threads, and the answer still counts.
#[test]
fn fences_are_asked_without_the_pool_lock() {
    // Without checks after every call: a check takes the lock the asking thread's slow path
    // holds (the chunks'), and is meant for quiescent moments; the test checks at the end.
    let clock = Arc::new(Clock::default());
    let a = CachingAllocator::new(
        DEV,
        Arc::new(HostMemory::new(1 << 36)),
        Some(clock.clone()),
        AllocatorConfig::default(),
    )
    .unwrap();
    let s = stream(0);
    let keep = a.raw_alloc(4096, s).unwrap(); // live, so its pages stay where they are
    let x = a.raw_alloc(64 * MIB, s).unwrap();
    let y = a.raw_alloc(64 * MIB, s).unwrap();
    a.raw_free(x).unwrap();
    let z = a.raw_alloc(96 * MIB, s).unwrap(); // past the peak: x's chunks move under z
    assert!(clock.records() >= 1, "a fence covers x's old range");
    clock.pass_all();
    let gate = Gate::new();
    *clock.hold.lock().unwrap() = Some(gate.clone());
    let (queries, unmaps) = (clock.queries(), a.stats().driver_calls.unmap);
    let a = &a;
    std::thread::scope(|scope| {
        // A slow path: unmapping the lent range asks the fence, and the query hangs.
        let asking = scope.spawn(|| a.raw_alloc(40 * MIB, s).unwrap());
        assert!(common::eventually(|| clock.in_query.load(Ordering::SeqCst)));
        let (tx, rx) = std::sync::mpsc::channel();
        let other = scope.spawn(move || {
            // The fast paths: the freed block is cached, mapped, and served again.
            a.raw_free(keep).unwrap();
            let q = a.raw_alloc(4096, s).unwrap();
            a.raw_free(q).unwrap();
            tx.send(()).unwrap();
        });
        let went_on = rx.recv_timeout(Duration::from_secs(5)).is_ok();
        *clock.hold.lock().unwrap() = None;
        gate.open();
        let big = asking.join().unwrap();
        other.join().unwrap();
        assert!(
            went_on,
            "a free and an allocation of the pool waited for another thread's fence query"
        );
        a.raw_free(big).unwrap();
    });
    assert_eq!(clock.queries() - queries, 1, "one answer");
    assert!(
        a.stats().driver_calls.unmap > unmaps,
        "the answer asked unlocked was applied: the lent range was unmapped"
    );
    for p in [y, z] {
        a.raw_free(p).unwrap();
    }
    a.check_invariants().unwrap();
}
