//! What PyTorch's full allocator interface (`c10::cuda::CUDACachingAllocator::CUDAAllocator`)
//! needs beyond alloc/free: a private pool's live blocks (cudagraph trees'
//! `checkPoolLiveAllocations` and `getCheckpointState`), putting a pool back to a checkpoint
//! (`setCheckpointPoolState`), the segment holding a pointer (`getBaseAllocation`, IPC),
//! emptying one pool's cache, a structured snapshot with stream handles (PyTorch's
//! `SnapshotInfo`), history with a per-allocation context id (PyTorch's stack frames), and the
//! segment events NCCL registration listens to (`attachAllocatorTraceTracker`).
//!
//! Everything here goes through `CachingAllocator`'s public API (putting a freed block back
//! is `CachingAllocator::claim_block`; whole checkpoints of a pool are in `checkpoint.rs`).

use std::ffi::{c_int, c_void};
use std::ptr::null_mut;
use std::sync::Arc;

use accelrt::alloc::{BlockStatus, CachingAllocator, Frame, MemorySnapshot, PoolKind, TraceAction};
use accelrt::{Device, MempoolId, Stream};

use crate::errors::{guard, Failure, Report};
use crate::state::{state, State};
use crate::trackers;
pub use crate::trackers::TrackerFn;
use crate::{device_name, maybe_relaxed, pool_id, status};

/// One live block of a private pool (`accelrt_torch_block` in the header).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockRecord {
    pub ptr: u64,
    pub size: u64,
    pub requested: u64,
}

/// One segment of a structured snapshot (`accelrt_torch_segment` in the header).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SegmentRecord {
    pub address: u64,
    pub total_size: u64,
    pub allocated_size: u64,
    pub active_size: u64,
    pub requested_size: u64,
    /// Native handle of the stream whose pool holds the segment (0 for private pools).
    pub stream: u64,
    pub pool_id0: u64,
    pub pool_id1: u64,
    pub device: i32,
    pub is_large: i32,
    pub is_expandable: i32,
    /// Index of the segment's first block in the snapshot's block array.
    pub first_block: u32,
    pub block_count: u32,
}

/// One block of a structured snapshot (`accelrt_torch_snapshot_block` in the header).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotBlock {
    pub address: u64,
    pub size: u64,
    pub requested_size: u64,
    /// 0 inactive, 1 active_allocated, 2 active_pending_free.
    pub state: i32,
    pub reserved: i32,
    /// The context id the caller set when the block was allocated (0: none).
    pub context: u64,
}

/// One history entry of a structured snapshot (`accelrt_torch_trace_entry` in the header).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceRecord {
    /// PyTorch's `TraceEntry::Action` numbering: 0 alloc, 1 free_requested, 2
    /// free_completed, 3 segment_alloc, 4 segment_free, 5 segment_map, 6 segment_unmap, 7
    /// snapshot, 8 oom.
    pub action: i32,
    pub device: i32,
    pub addr: u64,
    pub size: u64,
    /// Native stream handle (0: the default stream, or a private pool).
    pub stream: u64,
    /// Microseconds since the Unix epoch.
    pub time_us: u64,
    pub context: u64,
}

/// A structured snapshot (`accelrt_torch_snapshot` in the header); arrays owned by the
/// library until `accelrt_torch_snapshot_free`.
#[repr(C)]
#[derive(Debug)]
pub struct RawSnapshot {
    pub segments: *mut SegmentRecord,
    pub segment_count: usize,
    pub blocks: *mut SnapshotBlock,
    pub block_count: usize,
    /// History entries (PyTorch's trace entries, `device_traces`), when asked for.
    pub traces: *mut TraceRecord,
    pub trace_count: usize,
}

impl Default for RawSnapshot {
    fn default() -> Self {
        RawSnapshot {
            segments: null_mut(),
            segment_count: 0,
            blocks: null_mut(),
            block_count: 0,
            traces: null_mut(),
            trace_count: 0,
        }
    }
}

/// The frame name that carries a caller's context id through accelrt's history.
pub const CONTEXT_FRAME: &str = "accelrt_torch_context";

/// PyTorch's action numbers (`c10::CachingDeviceAllocator::TraceEntry::Action`).
pub fn action_number(a: TraceAction) -> i32 {
    match a {
        TraceAction::Alloc => 0,
        TraceAction::FreeRequested => 1,
        TraceAction::FreeCompleted => 2,
        TraceAction::SegmentAlloc => 3,
        TraceAction::SegmentFree => 4,
        TraceAction::SegmentMap => 5,
        TraceAction::SegmentUnmap => 6,
        TraceAction::Snapshot => 7,
        TraceAction::Oom => 8,
    }
}

fn context_of(frames: &Option<accelrt::alloc::Frames>) -> u64 {
    frames
        .as_ref()
        .and_then(|f| f.iter().find(|f| f.name == CONTEXT_FRAME))
        .and_then(|f| f.filename.parse().ok())
        .unwrap_or(0)
}

// ---- private pools: live blocks and checkpoints --------------------------------------------

/// The allocated blocks of private pool `id`, ordered by address.
pub fn pool_live_blocks(a: &CachingAllocator, id: MempoolId) -> Vec<BlockRecord> {
    let snap = a.memory_snapshot();
    let mut out: Vec<BlockRecord> = snap
        .segments
        .iter()
        .filter(|s| s.segment_pool_id == (id.0, id.1))
        .flat_map(|s| s.blocks.iter())
        .filter(|b| b.state == BlockStatus::ActiveAllocated)
        .map(|b| BlockRecord {
            ptr: b.address,
            size: b.size,
            requested: b.requested_size,
        })
        .collect();
    out.sort_by_key(|b| b.ptr);
    out
}

/// Make the free range `[block.ptr, block.ptr + block.size)` of private pool `id` an
/// allocated block again, as `raw_alloc` would have handed it out (PyTorch's
/// `setCheckpointPoolState` re-creates the blocks a checkpoint had live, at their addresses),
/// through `CachingAllocator::claim_block`. A block still allocated is left as it is.
pub fn claim_block(a: &CachingAllocator, id: MempoolId, block: BlockRecord) -> Result<(), Failure> {
    let live = pool_live_blocks(a, id);
    if live
        .iter()
        .any(|b| b.ptr == block.ptr && b.size == block.size)
    {
        return Ok(()); // still allocated: nothing to re-create
    }
    a.claim_block(id, block.ptr as usize, block.size, block.requested)
        .map_err(|e| Failure::from(e.to_string()))
}

/// Copy up to `cap` records into `out` and return how many there are (possibly more than
/// `cap`: the caller retries with a larger array).
///
/// # Safety
/// `out` must be NULL (with `cap` 0) or valid for writing `cap` records.
unsafe fn copy_out<T: Copy>(items: &[T], out: *mut T, cap: usize) -> isize {
    let n = items.len().min(cap);
    if n > 0 {
        // SAFETY: the caller guarantees `out` has room for `cap >= n` records.
        unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), out, n) };
    }
    isize::try_from(items.len()).unwrap_or(isize::MAX)
}

/// The live (allocated) blocks of private pool `(id0, id1)` of `device`, by address: up to
/// `cap` into `out`; returns how many there are, or -1.
///
/// # Safety
/// `out` must be NULL (with `cap` 0) or valid for writing `cap` records.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_pool_live_blocks(
    device: c_int,
    id0: u64,
    id1: u64,
    out: *mut BlockRecord,
    cap: usize,
) -> isize {
    guard("accelrt_torch_pool_live_blocks", -1, Report::Status, || {
        if out.is_null() && cap != 0 {
            return Err("out is NULL with a non-zero cap".into());
        }
        let id = pool_id(id0, id1)?;
        let st = state()?;
        let a = st.allocator(device)?;
        if a.pool_use_count(id).is_none() {
            return Err(format!(
                "no private pool ({id0}, {id1}) on {}: it was never begun or was released",
                device_name(st, device)
            )
            .into());
        }
        let blocks = pool_live_blocks(a, id);
        // SAFETY: forwarded from this function's contract.
        Ok(unsafe { copy_out(&blocks, out, cap) })
    })
}

/// Re-create a block of a checkpoint in private pool `(id0, id1)` (see [`claim_block`]).
#[no_mangle]
pub extern "C" fn accelrt_torch_pool_claim_block(
    device: c_int,
    id0: u64,
    id1: u64,
    ptr: u64,
    size: u64,
    requested: u64,
) -> c_int {
    status("accelrt_torch_pool_claim_block", || {
        let id = pool_id(id0, id1)?;
        let st = state()?;
        let a = st.allocator(device)?;
        maybe_relaxed(st, || {
            claim_block(
                a,
                id,
                BlockRecord {
                    ptr,
                    size,
                    requested,
                },
            )
        })
    })
}

/// Give back the cached memory of private pool `(id0, id1)` (PyTorch's
/// `emptyCache(mempool_id)`): the pool's whole free segments go back to the device.
///
/// accelrt releases a private pool's segments when its last use is dropped; while it has
/// uses, this takes a use and drops it again only when that gives the memory back safely
/// (the pool keeps its other uses, its routes and its live blocks).
#[no_mangle]
pub extern "C" fn accelrt_torch_empty_pool_cache(device: c_int, id0: u64, id1: u64) -> c_int {
    status("accelrt_torch_empty_pool_cache", || {
        let id = pool_id(id0, id1)?;
        let st = state()?;
        let a = st.allocator(device)?;
        if a.pool_use_count(id).is_none() {
            return Err(format!(
                "no private pool ({id0}, {id1}) on {}: it was never begun or was released",
                device_name(st, device)
            )
            .into());
        }
        // A private pool's cached segments are given back by empty_cache together with the
        // default pools' (they hold no live block); PyTorch's per-pool call gets the same.
        maybe_relaxed(st, || a.empty_cache())
            .map_err(|e| format!("{}: {e}", device_name(st, device)).into())
    })
}

// ---- segments ---------------------------------------------------------------------------------

/// The segment holding `ptr` in `a`, as (base, size, expandable).
pub fn segment_of(a: &CachingAllocator, ptr: u64) -> Option<(u64, u64, bool)> {
    if !a.contains(ptr as usize) {
        return None;
    }
    a.memory_snapshot()
        .segments
        .iter()
        .find(|s| s.address <= ptr && ptr < s.address + s.total_size)
        .map(|s| (s.address, s.total_size, s.is_expandable))
}

/// The block holding `ptr` in `a`, as (address, size), if it is live.
pub fn block_of(a: &CachingAllocator, ptr: u64) -> Option<(u64, u64)> {
    a.memory_snapshot()
        .segments
        .iter()
        .filter(|s| s.address <= ptr && ptr < s.address + s.total_size)
        .flat_map(|s| s.blocks.iter())
        .find(|b| b.address <= ptr && ptr < b.address + b.size && b.state != BlockStatus::Inactive)
        .map(|b| (b.address, b.size))
}

/// Where `ptr` lives: its device, its segment's base and size, whether the segment is
/// expandable (VMM), and its live block's address and size. 0, or -1 when no device's
/// allocator holds `ptr`.
///
/// # Safety
/// Each out pointer must be NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_segment_of(
    ptr: *const c_void,
    device: *mut c_int,
    base: *mut u64,
    size: *mut u64,
    expandable: *mut c_int,
    block: *mut u64,
    block_size: *mut u64,
) -> c_int {
    status("accelrt_torch_segment_of", || {
        let addr = ptr as u64;
        let st = state()?;
        let (d, a) = st
            .existing_allocators()
            .find(|(_, a)| a.contains(addr as usize))
            .ok_or_else(|| {
                format!(
                    "{addr:#x} is not memory accelrt allocated (no {} device's allocator holds it)",
                    st.kind
                )
            })?;
        let (b, s, e) = segment_of(a, addr)
            .ok_or_else(|| format!("{addr:#x}: its segment was released meanwhile"))?;
        let (blk, blk_size) = block_of(a, addr).unwrap_or((b, s));
        // SAFETY: each pointer is NULL or valid for one write (this function's contract).
        unsafe {
            for (p, v) in [(base, b), (size, s), (block, blk), (block_size, blk_size)] {
                if !p.is_null() {
                    *p = v;
                }
            }
            if !device.is_null() {
                *device = d as c_int;
            }
            if !expandable.is_null() {
                *expandable = c_int::from(e);
            }
        }
        Ok(())
    })
}

// ---- history with context ids, structured snapshots ---------------------------------------------

thread_local! {
    static LAST_CONTEXT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Attach context id `id` (0: none) to the calling thread's next allocations while history
/// with context is on (`accelrt_torch_record_history_ex(.., context = 1, ..)`). The id comes
/// back in structured snapshots (blocks and history entries), so a caller can keep its own
/// stack objects (PyTorch's `GatheredContext`) and find them again.
#[no_mangle]
pub extern "C" fn accelrt_torch_set_context_id(id: u64) {
    guard("accelrt_torch_set_context_id", (), Report::Log, || {
        if LAST_CONTEXT.with(|c| c.replace(id)) == id {
            return Ok(());
        }
        let frames = (id != 0).then(|| {
            Arc::from(vec![Frame {
                name: CONTEXT_FRAME.to_string(),
                filename: id.to_string(),
                line: 0,
            }])
        });
        accelrt::alloc::set_thread_context(frames);
        Ok(())
    })
}

/// Start (`enabled` != 0, at most `max_entries` events, with context ids when `context`
/// != 0) or stop history on `device` (-1: every device, now and later); `clear` != 0 drops
/// what was recorded first.
#[no_mangle]
pub extern "C" fn accelrt_torch_record_history_ex(
    device: c_int,
    enabled: c_int,
    max_entries: usize,
    context: c_int,
    clear: c_int,
) -> c_int {
    status("accelrt_torch_record_history_ex", || {
        let config = crate::history::history_config(enabled, max_entries, context != 0)?;
        let st = state()?;
        let targets: Vec<u32> = if device == -1 {
            st.set_history_all(config);
            st.existing_allocators().map(|(d, _)| d).collect()
        } else {
            let a = st.allocator(device)?;
            a.record_memory_history(config);
            vec![device as u32]
        };
        if clear != 0 {
            for d in targets {
                if let Some(a) = st.existing_allocator(d) {
                    a.clear_memory_history();
                }
            }
        }
        Ok(())
    })
}

fn stream_handle(st: &State, device: u32, index: u32) -> u64 {
    if index as usize >= accelrt::alloc::MAX_STREAM_POOLS {
        return 0;
    }
    st.native_handle(Stream {
        device: Device {
            kind: st.kind,
            index: device,
        },
        index,
    })
    .unwrap_or(0)
}

fn leak_vec<T>(v: Vec<T>) -> (*mut T, usize) {
    let b = v.into_boxed_slice();
    let n = b.len();
    (Box::into_raw(b).cast::<T>(), n)
}

/// # Safety
/// `(p, n)` must come from [`leak_vec`] and not have been freed.
unsafe fn free_vec<T>(p: *mut T, n: usize) {
    if !p.is_null() {
        // SAFETY: forwarded from this function's contract.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n)) });
    }
}

/// Build the structured snapshot of the given snapshots (filtered to pool `filter` when it is
/// not (0, 0)).
pub(crate) fn build_snapshot(
    st: &State,
    snaps: &[MemorySnapshot],
    filter: MempoolId,
    include_traces: bool,
) -> (Vec<SegmentRecord>, Vec<SnapshotBlock>, Vec<TraceRecord>) {
    let mut segments = Vec::new();
    let mut blocks = Vec::new();
    let mut traces = Vec::new();
    for snap in snaps {
        let d = snap.device.index;
        for s in &snap.segments {
            if !filter.is_none() && s.segment_pool_id != (filter.0, filter.1) {
                continue;
            }
            let first = blocks.len() as u32;
            blocks.extend(s.blocks.iter().map(|b| SnapshotBlock {
                address: b.address,
                size: b.size,
                requested_size: b.requested_size,
                state: match b.state {
                    BlockStatus::Inactive => 0,
                    BlockStatus::ActiveAllocated => 1,
                    BlockStatus::ActivePendingFree => 2,
                },
                reserved: 0,
                context: context_of(&b.frames),
            }));
            segments.push(SegmentRecord {
                address: s.address,
                total_size: s.total_size,
                allocated_size: s.allocated_size,
                active_size: s.active_size,
                requested_size: s.requested_size,
                stream: stream_handle(st, d, s.stream),
                pool_id0: s.segment_pool_id.0,
                pool_id1: s.segment_pool_id.1,
                device: d as i32,
                is_large: i32::from(s.segment_type == PoolKind::Large),
                is_expandable: i32::from(s.is_expandable),
                first_block: first,
                block_count: blocks.len() as u32 - first,
            });
        }
        if include_traces {
            traces.extend(snap.history.iter().map(|e| TraceRecord {
                action: action_number(e.action),
                device: d as i32,
                addr: e.addr,
                size: e.size,
                stream: if e.stream == u32::MAX {
                    0
                } else {
                    stream_handle(st, d, e.stream)
                },
                time_us: e.time_us,
                context: context_of(&e.frames),
            }));
        }
    }
    (segments, blocks, traces)
}

/// A structured snapshot of `device` (-1: every device in use), only pool `(id0, id1)`'s
/// segments unless it is (0, 0), with the history when `include_traces` != 0. Free it with
/// [`accelrt_torch_snapshot_free`].
///
/// # Safety
/// `out` must be valid for one write.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_snapshot_raw(
    device: c_int,
    id0: u64,
    id1: u64,
    include_traces: c_int,
    out: *mut RawSnapshot,
) -> c_int {
    status("accelrt_torch_snapshot_raw", || {
        if out.is_null() {
            return Err("out is NULL: pass a pointer to an accelrt_torch_snapshot".into());
        }
        let st = state()?;
        let devices: Vec<u32> = if device == -1 {
            st.existing_allocators().map(|(d, _)| d).collect()
        } else {
            vec![st.check_device(device)?]
        };
        let snaps: Vec<MemorySnapshot> = devices
            .iter()
            .filter_map(|&d| st.existing_allocator(d).map(|a| a.memory_snapshot()))
            .collect();
        let (segments, blocks, traces) =
            build_snapshot(st, &snaps, MempoolId(id0, id1), include_traces != 0);
        let (segments, segment_count) = leak_vec(segments);
        let (blocks, block_count) = leak_vec(blocks);
        let (traces, trace_count) = leak_vec(traces);
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe {
            *out = RawSnapshot {
                segments,
                segment_count,
                blocks,
                block_count,
                traces,
                trace_count,
            }
        };
        Ok(())
    })
}

/// Free what [`accelrt_torch_snapshot_raw`] filled in (and zero it).
///
/// # Safety
/// `snap` must be NULL or filled by `accelrt_torch_snapshot_raw` and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_snapshot_free(snap: *mut RawSnapshot) {
    if snap.is_null() {
        return;
    }
    // SAFETY: the caller guarantees `snap` came from accelrt_torch_snapshot_raw.
    unsafe {
        let s = std::mem::take(&mut *snap);
        free_vec(s.segments, s.segment_count);
        free_vec(s.blocks, s.block_count);
        free_vec(s.traces, s.trace_count);
    }
}

// ---- segment events (attachAllocatorTraceTracker) -----------------------------------------------

/// Call `f(ctx, action, device, addr, size)` for every segment event from now on: 3
/// segment_alloc, 4 segment_free (plain segments), 5 segment_map (expandable segments:
/// pages mapped). `f` must be callable from any thread and must not unwind; `ctx` stays
/// the caller's and must live for the rest of the process.
#[no_mangle]
pub extern "C" fn accelrt_torch_add_segment_tracker(f: TrackerFn, ctx: *mut c_void) -> c_int {
    status("accelrt_torch_add_segment_tracker", || {
        let f = f.ok_or("the tracker function is NULL")?;
        trackers::add(f, ctx);
        let st = state()?;
        for (d, a) in st.existing_allocators() {
            trackers::hook_allocator(d, a);
        }
        Ok(())
    })
}

/// The allocator configuration of `device` as a `key:value` string (accelrt's syntax),
/// NUL-terminated; free it with `accelrt_torch_free_buffer`. NULL on failure.
#[no_mangle]
pub extern "C" fn accelrt_torch_config_string(device: c_int) -> *mut std::ffi::c_char {
    guard(
        "accelrt_torch_config_string",
        null_mut(),
        Report::Status,
        || {
            let st = state()?;
            let conf = st.allocator(device)?.config().to_conf_string();
            Ok(crate::malloc_copy(conf.as_bytes(), true)?.cast())
        },
    )
}
