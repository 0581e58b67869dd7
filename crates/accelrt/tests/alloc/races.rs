//! Races between a stale free and an allocation still in flight, made deterministic: a
//! memory provider whose `map` stops at a gate while the test thread frees.
//!
//! An allocation that must map pages (expandable segments, a cached block whose pages were
//! given back by `empty_cache`) carves its block under the pool lock, then maps pages with the
//! lock released. The block is not the caller's yet: a free of its address in that window can
//! only be a stale one (a double free of a pointer whose address was handed out again), and
//! must be refused. Before the fix it was accepted: the block went back to the cache while
//! the allocation went on with it, so it was handed out twice, and when mapping then failed,
//! released a second time: on a free list twice, a cycle (`empty_cache` then looped in
//! `Tlsf::at_least`, issue 13 item 4).

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use accelrt::alloc::{AllocatorConfig, CachingAllocator};
use accelrt::AllocError;
use common::memory::{Outcome, TestMemory};
use common::{host_stream, HOST0 as DEV};

const MIB: usize = 1 << 20;

/// An allocator over `mem` (expandable segments, no events: nothing to wait for) holding a
/// live 2 MiB block `k` (it keeps the range) and, after it, a freed 4 MiB block at `p` whose
/// pages `empty_cache` gave back: allocating 4 MiB again takes that block and must map pages
/// for it. Returns (allocator, k, p).
fn allocator_with_unmapped_block(mem: &Arc<TestMemory>) -> (CachingAllocator, usize, usize) {
    let config = AllocatorConfig::parse("expandable_segments:true").unwrap();
    let a = CachingAllocator::new(DEV, mem.clone(), None, config).unwrap();
    assert!(a.is_expandable());
    let k = a.raw_alloc(2 * MIB, host_stream(0)).unwrap();
    let p = a.raw_alloc(4 * MIB, host_stream(0)).unwrap();
    assert_eq!(p, k + 2 * MIB, "carved one after the other");
    a.raw_free(p).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(
        a.reserved_bytes(),
        2 * MIB as u64,
        "empty_cache unmapped the freed block's pages"
    );
    (a, k, p)
}

/// Run an allocation of 4 MiB on another thread; while its `map` is stopped at the gate,
/// free `p` (a stale pointer: it was freed already) on this thread. Returns what the stale
/// free and the allocation answered.
fn stale_free_while_mapping(
    a: &CachingAllocator,
    mem: &TestMemory,
    p: usize,
    outcome: Outcome,
) -> (Result<(), AllocError>, Result<usize, AllocError>) {
    mem.arm(outcome);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let alloc = s.spawn(|| {
            let r = a.raw_alloc(4 * MIB, host_stream(0));
            done.store(true, Ordering::SeqCst);
            r
        });
        mem.wait_entered();
        let stale = a.raw_free(p);
        mem.release();
        let fresh = alloc.join().expect("the allocating thread does not panic");
        assert!(done.load(Ordering::SeqCst));
        (stale, fresh)
    })
}

#[test]
fn a_stale_free_cannot_take_a_block_that_is_still_being_mapped() {
    let mem = TestMemory::new();
    let (a, k, p) = allocator_with_unmapped_block(&mem);
    let (stale, fresh) = stale_free_while_mapping(&a, &mem, p, Outcome::Map);
    let err = stale.expect_err("the block is not the caller's yet: the free must be refused");
    assert!(
        err.to_string().contains("double free"),
        "the refusal says why: {err}"
    );
    let q = fresh.expect("the allocation itself succeeds");
    assert_eq!(q, p, "the cached block was reused");
    a.check_invariants().unwrap();
    // The block is live, once: another allocation of the same size gets other memory.
    let r = a.raw_alloc(4 * MIB, host_stream(0)).unwrap();
    assert_ne!(r, q, "a live block was handed out twice");
    a.raw_free(r).unwrap();
    a.raw_free(q).unwrap();
    assert!(a.raw_free(q).is_err(), "and now a second free is refused");
    a.raw_free(k).unwrap();
    a.check_invariants().unwrap();
}

#[test]
fn a_stale_free_and_a_failed_mapping_never_put_a_block_on_a_free_list_twice() {
    let mem = TestMemory::new();
    let (a, k, p) = allocator_with_unmapped_block(&mem);
    let (stale, fresh) = stale_free_while_mapping(&a, &mem, p, Outcome::Fail);
    assert!(stale.is_err(), "the stale free is refused");
    // The failed mapping is retried after releasing the cache; the retry maps (the gate is
    // used up), so the allocation succeeds.
    let q = fresh.expect("the retry succeeds");
    a.check_invariants().unwrap();
    a.raw_free(q).unwrap();
    a.raw_free(k).unwrap();
    // With a cycle on a free list this never returned (issue 13 item 4).
    a.empty_cache().unwrap();
    a.check_invariants().unwrap();
    assert_eq!(a.reserved_bytes(), 0);
}
