//! Checkpoints of private pools through the C ABI (PyTorch's `getCheckpointState` /
//! `setCheckpointPoolState`, what CUDA graph trees call), on the host backend: blocks freed
//! and carved since the checkpoint, blocks used on another stream, refusals that change
//! nothing. The tests share device 0, so they run one at a time.

use std::ffi::{c_void, CStr};
use std::ptr::null_mut;
use std::sync::{Mutex, MutexGuard};

use accelrt::{DeviceType, StreamPriority};
use accelrt_torch::checkpoint::*;
use accelrt_torch::full::BlockRecord;
use accelrt_torch::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn setup() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use_backend(DeviceType::Host).expect("these tests use the host backend");
    guard
}

fn last() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next error.
    unsafe { CStr::from_ptr(accelrt_torch_last_error()) }
        .to_string_lossy()
        .into_owned()
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

/// Allocate `sizes` with every stream routed to pool `id` (a capture's allocations).
fn in_pool(id: (u64, u64), sizes: &[isize]) -> Vec<usize> {
    assert_eq!(
        // SAFETY: no filter: every stream of the device is routed.
        unsafe { accelrt_torch_begin_allocate_to_pool(0, id.0, id.1, None, null_mut(), None) },
        0,
        "{}",
        last()
    );
    let ptrs = sizes.iter().map(|&n| alloc(n, null_mut())).collect();
    assert_eq!(accelrt_torch_end_allocate_to_pool(0, id.0, id.1), 0);
    ptrs
}

fn records(n: isize, fill: impl Fn(*mut BlockRecord, usize) -> isize) -> Vec<BlockRecord> {
    assert!(n >= 0, "{}", last());
    let mut out = vec![BlockRecord::default(); n as usize];
    assert_eq!(fill(out.as_mut_ptr(), out.len()), n);
    out
}

fn live_blocks(id: (u64, u64)) -> Vec<BlockRecord> {
    // SAFETY: NULL with cap 0 counts; then a vector with room for `n`.
    let n = unsafe { full::accelrt_torch_pool_live_blocks(0, id.0, id.1, null_mut(), 0) };
    records(n, |out, cap| {
        // SAFETY: `out` has room for `cap` records.
        unsafe { full::accelrt_torch_pool_live_blocks(0, id.0, id.1, out, cap) }
    })
}

fn checkpoint_blocks(handle: u64) -> Vec<BlockRecord> {
    // SAFETY: NULL with cap 0 counts; then a vector with room for `n`.
    let n = unsafe { accelrt_torch_checkpoint_blocks(handle, null_mut(), 0) };
    records(n, |out, cap| {
        // SAFETY: `out` has room for `cap` records.
        unsafe { accelrt_torch_checkpoint_blocks(handle, out, cap) }
    })
}

fn side_stream() -> *mut c_void {
    let host = accelrt::backend(DeviceType::Host);
    let s = host.stream_from_pool(0, StreamPriority::Normal).unwrap();
    host.stream_native_handle(s).unwrap() as usize as *mut c_void
}

#[test]
fn a_restore_puts_the_pools_blocks_back_at_their_addresses() {
    let _g = setup();
    let id = (9101, 1);
    let p = in_pool(id, &[3000, 5 << 20, 512, 100_000]);
    free(p[3]);
    let before = live_blocks(id);
    let handle = accelrt_torch_pool_checkpoint(0, id.0, id.1);
    assert_ne!(handle, 0, "{}", last());
    assert_eq!(
        checkpoint_blocks(handle),
        before,
        "the checkpoint lists the blocks live when it was taken"
    );

    // After the checkpoint: one block dies, new ones are carved (one into the freed hole), and
    // one is used on another stream, so its free waits for that stream.
    free(p[0]);
    let later = in_pool(id, &[2048, 7000, 100_000]);
    let side = side_stream();
    // SAFETY: `later[1]` is live; `side` is a live host stream's handle.
    let recorded = unsafe { accelrt_torch_record_stream(later[1] as *mut c_void, side) };
    assert_eq!(recorded, 0, "{}", last());
    assert_ne!(live_blocks(id), before);

    assert_eq!(accelrt_torch_pool_restore(0, handle), 0, "{}", last());
    assert_eq!(
        live_blocks(id),
        before,
        "exactly the checkpoint's blocks, at their addresses and sizes"
    );
    // Restoring again is a no-op in effect.
    assert_eq!(accelrt_torch_pool_restore(0, handle), 0, "{}", last());
    assert_eq!(live_blocks(id), before);

    // The re-created blocks are ordinary allocations.
    for b in &before {
        free(b.ptr as usize);
    }
    assert!(live_blocks(id).is_empty());
    assert_eq!(accelrt_torch_checkpoint_free(handle), 0, "{}", last());
    assert_eq!(accelrt_torch_release_pool(0, id.0, id.1), 0, "{}", last());
}

#[test]
fn refusals_say_why_and_change_nothing() {
    let _g = setup();
    let id = (9102, 1);
    let p = in_pool(id, &[4096, 8192]);
    let handle = accelrt_torch_pool_checkpoint(0, id.0, id.1);
    assert_ne!(handle, 0, "{}", last());
    let now = live_blocks(id);

    assert_eq!(accelrt_torch_pool_restore(0, handle + 1000), -1);
    assert!(last().contains("no checkpoint"), "{}", last());
    assert_eq!(accelrt_torch_pool_restore(1, handle), -1);
    assert!(last().contains("not 1"), "{}", last());
    assert_eq!(accelrt_torch_pool_checkpoint(0, 4242, 4242), 0);
    assert!(
        last().contains("no private pool (4242, 4242)"),
        "{}",
        last()
    );
    assert_eq!(accelrt_torch_pool_checkpoint(0, 0, 0), 0);
    assert!(last().contains("(0, 0) is not a pool"), "{}", last());
    // SAFETY: a NULL array with a non-zero cap is refused before any write.
    let n = unsafe { accelrt_torch_checkpoint_blocks(handle, null_mut(), 4) };
    assert_eq!(n, -1);
    assert!(last().contains("NULL"), "{}", last());
    assert_eq!(live_blocks(id), now, "nothing changed");

    // The pool goes away (its blocks freed, its use dropped): the checkpoint cannot be
    // restored any more.
    for q in p {
        free(q);
    }
    assert_eq!(accelrt_torch_release_pool(0, id.0, id.1), 0, "{}", last());
    assert_eq!(accelrt_torch_pool_restore(0, handle), -1);
    assert!(last().contains("no private pool (9102, 1)"), "{}", last());

    assert_eq!(accelrt_torch_checkpoint_free(handle), 0);
    assert_eq!(accelrt_torch_checkpoint_free(handle), -1);
    assert!(last().contains("freed already"), "{}", last());
}
