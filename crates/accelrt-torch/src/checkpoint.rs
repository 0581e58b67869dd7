//! Checkpoints of private pools through the C ABI: PyTorch's `getCheckpointState` and
//! `setCheckpointPoolState`, which CUDA graph trees (`torch.compile(mode="reduce-overhead")`)
//! use to put a pool back to an earlier state before recording a new graph into it.
//!
//! A checkpoint is the allocator's [`PoolCheckpoint`] (the pool's segments and every block in
//! them), kept here under a handle the C++ shim holds in its `AllocatorState` and frees when
//! PyTorch drops it. Restoring is `CachingAllocator::restore_pool`: every block allocated now
//! is freed and the checkpoint's allocated blocks are allocated again at their addresses, or
//! nothing changes and the error says why.

use std::collections::BTreeMap;
use std::ffi::c_int;

use accelrt::alloc::PoolCheckpoint;
use parking_lot::Mutex;

use crate::errors::{guard, Failure, Report};
use crate::full::BlockRecord;
use crate::state::state;
use crate::{device_name, maybe_relaxed, pool_id, status};

/// At most this many checkpoints alive at once: each holds a copy of a pool's block table,
/// and PyTorch frees them with their `AllocatorState`, so more means a leak.
pub const MAX_CHECKPOINTS: usize = 1 << 16;

struct Registry {
    next: u64,
    map: BTreeMap<u64, (c_int, PoolCheckpoint)>,
}

static CHECKPOINTS: Mutex<Registry> = Mutex::new(Registry {
    next: 1,
    map: BTreeMap::new(),
});

fn unknown(handle: u64) -> Failure {
    format!(
        "no checkpoint {handle}: it was never returned by accelrt_torch_pool_checkpoint or was \
         freed already (accelrt_torch_checkpoint_free)"
    )
    .into()
}

/// Record private pool `(id0, id1)` of `device` (PyTorch's `getCheckpointState`): its
/// segments and every block in them. Returns a handle (never 0) for
/// [`accelrt_torch_checkpoint_blocks`], [`accelrt_torch_pool_restore`] and
/// [`accelrt_torch_checkpoint_free`]; 0 on error (no such pool; too many checkpoints alive).
#[no_mangle]
pub extern "C" fn accelrt_torch_pool_checkpoint(device: c_int, id0: u64, id1: u64) -> u64 {
    guard("accelrt_torch_pool_checkpoint", 0, Report::Status, || {
        let id = pool_id(id0, id1)?;
        let st = state()?;
        let a = st.allocator(device)?;
        let cp = a
            .checkpoint_pool(id)
            .map_err(|e| Failure::from(e.to_string()))?;
        let mut reg = CHECKPOINTS.lock();
        if reg.map.len() >= MAX_CHECKPOINTS {
            return Err(format!(
                "{MAX_CHECKPOINTS} checkpoints are alive on {}: free each with \
                 accelrt_torch_checkpoint_free when its state is dropped",
                device_name(st, device)
            )
            .into());
        }
        let handle = reg.next;
        reg.next += 1;
        reg.map.insert(handle, (device, cp));
        Ok(handle)
    })
}

/// The blocks checkpoint `handle` had allocated, by address: up to `cap` into `out` (NULL
/// with cap 0 to count); returns how many there are, or -1 (unknown handle).
///
/// # Safety
/// `out` must be NULL (with `cap` 0) or valid for writing `cap` records.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_checkpoint_blocks(
    handle: u64,
    out: *mut BlockRecord,
    cap: usize,
) -> isize {
    guard(
        "accelrt_torch_checkpoint_blocks",
        -1,
        Report::Status,
        || {
            if out.is_null() && cap != 0 {
                return Err("out is NULL with a non-zero cap".into());
            }
            let reg = CHECKPOINTS.lock();
            let (_, cp) = reg.map.get(&handle).ok_or_else(|| unknown(handle))?;
            let blocks: Vec<BlockRecord> = cp
                .allocated()
                .map(|b| BlockRecord {
                    ptr: b.addr as u64,
                    size: b.size,
                    requested: b.requested,
                })
                .collect();
            let n = blocks.len().min(cap);
            if n > 0 {
                // SAFETY: the caller guarantees `out` has room for `cap >= n` records; `blocks`
                // is a separate allocation, so the ranges do not overlap.
                unsafe { std::ptr::copy_nonoverlapping(blocks.as_ptr(), out, n) };
            }
            Ok(isize::try_from(blocks.len()).unwrap_or(isize::MAX))
        },
    )
}

/// Put the pool of checkpoint `handle` back to it (PyTorch's `setCheckpointPoolState`):
/// every block allocated in the pool now is freed, and the checkpoint's allocated blocks are
/// allocated again at their addresses (list them with [`accelrt_torch_checkpoint_blocks`];
/// the blocks allocated before are those `accelrt_torch_pool_live_blocks` listed). 0 on
/// success; -1 when the checkpoint no longer fits the pool (the message says why), and then
/// nothing changed. `device` must be the checkpoint's.
#[no_mangle]
pub extern "C" fn accelrt_torch_pool_restore(device: c_int, handle: u64) -> c_int {
    status("accelrt_torch_pool_restore", || {
        let cp = {
            let reg = CHECKPOINTS.lock();
            let (dev, cp) = reg.map.get(&handle).ok_or_else(|| unknown(handle))?;
            if *dev != device {
                return Err(format!(
                    "checkpoint {handle} is of device {dev}, not {device}: restore it on its \
                     own device"
                )
                .into());
            }
            cp.clone()
        };
        let st = state()?;
        let a = st.allocator(device)?;
        maybe_relaxed(st, || a.restore_pool(&cp))
            .map(|_| ())
            .map_err(|e| Failure::from(e.to_string()))
    })
}

/// Free checkpoint `handle` (its `AllocatorState` was dropped). 0; -1 for an unknown handle.
#[no_mangle]
pub extern "C" fn accelrt_torch_checkpoint_free(handle: u64) -> c_int {
    status("accelrt_torch_checkpoint_free", || {
        CHECKPOINTS
            .lock()
            .map
            .remove(&handle)
            .map(|_| ())
            .ok_or_else(|| unknown(handle))
    })
}
