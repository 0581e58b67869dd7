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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use accelrt::alloc::{
    AllocatorConfig, CachingAllocator, ChunkHandle, MemoryProvider, ProviderError, VirtualMemory,
};
use accelrt::backend::host::HostMemory;
use accelrt::{AllocError, Device, DeviceType, Stream};

const DEV: Device = Device {
    kind: DeviceType::Host,
    index: 0,
};
const MIB: usize = 1 << 20;
const STREAM: Stream = Stream {
    device: DEV,
    index: 0,
};
/// Longest a step waits for the other thread; only reached on a bug.
const PATIENCE: Duration = Duration::from_secs(20);

/// What a gated `map` does once the test lets it go on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Map,
    Fail,
}

#[derive(Default)]
struct GateState {
    armed: Option<Outcome>,
    entered: bool,
    released: bool,
}

/// Host memory whose next `map` (once armed) stops until [`Gated::release`].
struct Gated {
    inner: HostMemory,
    gate: Mutex<GateState>,
    cv: Condvar,
}

impl Gated {
    fn new() -> Arc<Gated> {
        Arc::new(Gated {
            inner: HostMemory::new(1 << 30),
            gate: Mutex::default(),
            cv: Condvar::new(),
        })
    }

    fn arm(&self, outcome: Outcome) {
        *self.gate.lock().unwrap() = GateState {
            armed: Some(outcome),
            ..GateState::default()
        };
    }

    /// Wait until a `map` is stopped at the gate.
    fn wait_entered(&self) {
        let g = self.gate.lock().unwrap();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, PATIENCE, |g| !g.entered)
            .unwrap();
        assert!(g.entered, "no allocation reached map() within {PATIENCE:?}");
    }

    fn release(&self) {
        self.gate.lock().unwrap().released = true;
        self.cv.notify_all();
    }
}

impl MemoryProvider for Gated {
    fn allocate(&self, size: usize) -> Result<usize, ProviderError> {
        self.inner.allocate(size)
    }
    unsafe fn free(&self, ptr: usize, size: usize) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.inner.free(ptr, size) }
    }
    fn memory_info(&self) -> (u64, u64) {
        self.inner.memory_info()
    }
    fn host_visible(&self) -> bool {
        true
    }
    fn driver_allocated(&self) -> u64 {
        self.inner.driver_allocated()
    }
    fn virtual_memory(&self) -> Option<&dyn VirtualMemory> {
        Some(self)
    }
}

impl VirtualMemory for Gated {
    fn granularity(&self) -> usize {
        self.inner.granularity()
    }
    fn reserve(&self, size: usize) -> Result<usize, ProviderError> {
        self.inner.reserve(size)
    }
    unsafe fn unreserve(&self, base: usize, size: usize) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.inner.unreserve(base, size) }
    }
    fn create(&self, size: usize) -> Result<ChunkHandle, ProviderError> {
        self.inner.create(size)
    }
    unsafe fn release(&self, chunk: ChunkHandle, size: usize) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.inner.release(chunk, size) }
    }
    unsafe fn map(
        &self,
        addr: usize,
        chunks: &[(ChunkHandle, usize)],
    ) -> Result<(), ProviderError> {
        let mut g = self.gate.lock().unwrap();
        if let Some(outcome) = g.armed.take() {
            g.entered = true;
            self.cv.notify_all();
            let (_g, _) = self
                .cv
                .wait_timeout_while(g, PATIENCE, |g| !g.released)
                .unwrap();
            if outcome == Outcome::Fail {
                return Err(ProviderError::OutOfMemory);
            }
        } else {
            drop(g);
        }
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.inner.map(addr, chunks) }
    }
    unsafe fn unmap(&self, addr: usize, len: usize) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.inner.unmap(addr, len) }
    }
}

/// An allocator over `mem` (expandable segments, no events: nothing to wait for) holding a
/// live 2 MiB block `k` (it keeps the range) and, after it, a freed 4 MiB block at `p` whose
/// pages `empty_cache` gave back: allocating 4 MiB again takes that block and must map pages
/// for it. Returns (allocator, k, p).
fn allocator_with_unmapped_block(mem: &Arc<Gated>) -> (CachingAllocator, usize, usize) {
    let config = AllocatorConfig::parse("expandable_segments:true").unwrap();
    let a = CachingAllocator::new(DEV, mem.clone(), None, config).unwrap();
    assert!(a.is_expandable());
    let k = a.raw_alloc(2 * MIB, STREAM).unwrap();
    let p = a.raw_alloc(4 * MIB, STREAM).unwrap();
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
    mem: &Gated,
    p: usize,
    outcome: Outcome,
) -> (Result<(), AllocError>, Result<usize, AllocError>) {
    mem.arm(outcome);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let alloc = s.spawn(|| {
            let r = a.raw_alloc(4 * MIB, STREAM);
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
    let mem = Gated::new();
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
    let r = a.raw_alloc(4 * MIB, STREAM).unwrap();
    assert_ne!(r, q, "a live block was handed out twice");
    a.raw_free(r).unwrap();
    a.raw_free(q).unwrap();
    assert!(a.raw_free(q).is_err(), "and now a second free is refused");
    a.raw_free(k).unwrap();
    a.check_invariants().unwrap();
}

#[test]
fn a_stale_free_and_a_failed_mapping_never_put_a_block_on_a_free_list_twice() {
    let mem = Gated::new();
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
