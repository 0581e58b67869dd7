//! `TestMemory`: host memory whose driver calls a test can make fail or hold.
//!
//! - `fail_create` / `fail_map`: while set, `create` / `map` fail with a driver's result
//!   code (`cuMemCreate`: 1, `CUDA_ERROR_INVALID_VALUE`; `cuMemMap`: 700,
//!   `CUDA_ERROR_ILLEGAL_ADDRESS`), so a failure in the middle of a move can be checked;
//! - [`TestMemory::arm`]: the next `map` stops at a gate until [`TestMemory::release`], then
//!   maps or fails as armed, so a stale free can race an allocation deterministically.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use accelrt::alloc::{ChunkHandle, MemoryProvider, ProviderError, VirtualMemory};
use accelrt::backend::host::HostMemory;

use super::PATIENCE;

/// What a gated `map` does once the test lets it go on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    Map,
    Fail,
}

#[derive(Default)]
struct GateState {
    armed: Option<Outcome>,
    entered: bool,
    released: bool,
}

/// Host memory (1 GiB) whose driver calls can be made to fail ([`TestMemory::fail_create`],
/// [`TestMemory::fail_map`]) or to stop at a gate ([`TestMemory::arm`]).
pub struct TestMemory {
    inner: HostMemory,
    pub fail_map: AtomicBool,
    pub fail_create: AtomicBool,
    gate: Mutex<GateState>,
    cv: Condvar,
}

impl TestMemory {
    pub fn new() -> Arc<TestMemory> {
        Arc::new(TestMemory {
            inner: HostMemory::new(1 << 30),
            fail_map: AtomicBool::new(false),
            fail_create: AtomicBool::new(false),
            gate: Mutex::default(),
            cv: Condvar::new(),
        })
    }

    /// Make the next `map` stop until [`TestMemory::release`], then do `outcome`.
    pub fn arm(&self, outcome: Outcome) {
        *self.gate.lock().unwrap() = GateState {
            armed: Some(outcome),
            ..GateState::default()
        };
    }

    /// Wait until a `map` is stopped at the gate.
    pub fn wait_entered(&self) {
        let g = self.gate.lock().unwrap();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, PATIENCE, |g| !g.entered)
            .unwrap();
        assert!(g.entered, "no allocation reached map() within {PATIENCE:?}");
    }

    /// Let the `map` stopped at the gate go on.
    pub fn release(&self) {
        self.gate.lock().unwrap().released = true;
        self.cv.notify_all();
    }
}

impl MemoryProvider for TestMemory {
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

impl VirtualMemory for TestMemory {
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
        if self.fail_create.load(Ordering::Relaxed) {
            // CUDA_ERROR_INVALID_VALUE: a result code the allocator's error must keep.
            return Err(ProviderError::Driver {
                code: 1,
                message: "cuMemCreate: injected failure".into(),
            });
        }
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
        if self.fail_map.load(Ordering::Relaxed) {
            // CUDA_ERROR_ILLEGAL_ADDRESS.
            return Err(ProviderError::Driver {
                code: 700,
                message: "cuMemMap: injected failure".into(),
            });
        }
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
