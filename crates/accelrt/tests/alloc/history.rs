//! Memory history and snapshots.

use std::sync::Arc;

use accelrt::alloc::{
    set_thread_context, AllocatorConfig, BlockStatus, CachingAllocator, Frame, HistoryConfig,
    PoolKind, TraceAction,
};
use accelrt::backend::host::HostMemory;

use crate::common::{host_stream as s, HOST0 as DEV};

const MIB: usize = 1 << 20;

fn allocator(capacity: u64) -> CachingAllocator {
    let mut config =
        AllocatorConfig::parse("release_at_peak:false,expandable_segments:false").unwrap();
    config.debug_checks = true;
    CachingAllocator::new(DEV, Arc::new(HostMemory::new(capacity)), None, config).unwrap()
}

#[test]
fn history_records_pytorch_actions_in_order() {
    let a = allocator(64 * MIB as u64);
    let p0 = a.raw_alloc(100, s(0)).unwrap(); // before recording: not in the history
    a.record_memory_history(Some(HistoryConfig {
        max_entries: 100,
        context: false,
    }));
    let p = a.raw_alloc(1000, s(1)).unwrap();
    a.raw_free(p).unwrap();
    a.empty_cache().unwrap();
    assert!(a.raw_alloc(1 << 40, s(1)).is_err());
    a.record_memory_history(None);
    a.raw_free(p0).unwrap(); // after: not recorded either
    let h = a.memory_history();
    let actions: Vec<(TraceAction, u64)> = h.iter().map(|e| (e.action, e.size)).collect();
    use TraceAction::*;
    assert_eq!(
        actions,
        vec![
            (SegmentAlloc, 2 * MIB as u64),
            (Alloc, 1000),
            (FreeRequested, 1000),
            (FreeCompleted, 1000),
            (SegmentFree, 2 * MIB as u64),
            (Oom, 1 << 40),
        ]
    );
    assert!(h.windows(2).all(|w| w[0].time_us <= w[1].time_us));
    assert!(h.iter().take(5).all(|e| e.stream == 1));
    assert_eq!(h[1].addr, p as u64);
    assert_eq!(Oom.name(), "oom");
    assert_eq!(
        TraceAction::from_name("free_requested"),
        Some(FreeRequested)
    );
}

#[test]
fn a_snapshots_marker_lands_in_the_next_snapshot_as_in_pytorch() {
    let a = allocator(64 * MIB as u64);
    a.record_memory_history(Some(HistoryConfig {
        max_entries: 100,
        context: false,
    }));
    let p = a.raw_alloc(4096, s(0)).unwrap();
    let first = a.memory_snapshot();
    let last = first.history.last().expect("the allocation is recorded");
    assert_eq!((last.action, last.size), (TraceAction::Alloc, 4096));
    let second = a.memory_snapshot();
    assert_eq!(
        second.history.last().unwrap().action,
        TraceAction::Snapshot,
        "the first snapshot's marker"
    );
    a.raw_free(p).unwrap();
}

#[test]
fn a_snapshot_shows_free_neighbours_as_one_block() {
    // PyTorch's TestBlockStateAbsorption: eleven small blocks, all freed but the sixth.
    let a = allocator(64 * MIB as u64);
    let ptrs: Vec<usize> = (0..11).map(|_| a.raw_alloc(512, s(0)).unwrap()).collect();
    for (i, p) in ptrs.iter().enumerate() {
        if i != 5 {
            a.raw_free(*p).unwrap();
        }
    }
    let snap = a.memory_snapshot();
    let seg = snap
        .segments
        .iter()
        .find(|g| g.blocks.iter().any(|b| b.address == ptrs[5] as u64))
        .expect("the live block's segment");
    let states: Vec<BlockStatus> = seg.blocks.iter().map(|b| b.state).collect();
    assert_eq!(
        states,
        vec![
            BlockStatus::Inactive,
            BlockStatus::ActiveAllocated,
            BlockStatus::Inactive
        ],
        "{:?}",
        seg.blocks
    );
    a.raw_free(ptrs[5]).unwrap();
}

#[test]
fn ring_buffer_keeps_the_newest_entries() {
    let a = allocator(64 * MIB as u64);
    a.record_memory_history(Some(HistoryConfig {
        max_entries: 4,
        context: false,
    }));
    for _ in 0..10 {
        let p = a.raw_alloc(512, s(0)).unwrap();
        a.raw_free(p).unwrap();
    }
    let h = a.memory_history();
    assert_eq!(h.len(), 4);
    assert_eq!(h.last().unwrap().action, TraceAction::FreeCompleted);
    a.clear_memory_history();
    assert!(a.memory_history().is_empty());
}

#[test]
fn snapshot_shows_segments_blocks_and_context() {
    let a = allocator(256 * MIB as u64);
    a.record_memory_history(Some(HistoryConfig::default()));
    let frames: Arc<[Frame]> = vec![Frame {
        name: "forward".into(),
        filename: "model.py".into(),
        line: 42,
    }]
    .into();
    let previous = set_thread_context(Some(frames.clone()));
    let small = a.raw_alloc(1000, s(0)).unwrap();
    set_thread_context(previous);
    let large = a.raw_alloc(30 * MIB, s(2)).unwrap();
    let snap = a.memory_snapshot();
    assert_eq!(snap.segments.len(), 2);
    let seg_small = snap
        .segments
        .iter()
        .find(|g| g.segment_type == PoolKind::Small)
        .unwrap();
    assert_eq!(
        (seg_small.total_size, seg_small.stream),
        (2 * MIB as u64, 0)
    );
    assert_eq!(seg_small.allocated_size, 1024);
    assert_eq!(seg_small.requested_size, 1000);
    assert_eq!(
        seg_small.blocks.len(),
        2,
        "the block and the rest of the segment"
    );
    let b = &seg_small.blocks[0];
    assert_eq!(
        (b.address, b.state, b.requested_size),
        (small as u64, BlockStatus::ActiveAllocated, 1000)
    );
    assert_eq!(b.frames.as_deref(), Some(&frames[..]));
    assert_eq!(seg_small.blocks[1].state, BlockStatus::Inactive);
    let seg_large = snap
        .segments
        .iter()
        .find(|g| g.segment_type == PoolKind::Large)
        .unwrap();
    assert_eq!(
        (
            seg_large.address,
            seg_large.stream,
            seg_large.blocks[0].frames.clone()
        ),
        (large as u64, 2, None)
    );
    let total: u64 = snap.segments.iter().map(|g| g.total_size).sum();
    assert_eq!(total, a.reserved_bytes());
    assert_eq!(
        snap.history.last().map(|e| e.action),
        Some(TraceAction::Alloc),
        "the snapshot's own marker lands in the next snapshot"
    );
    assert_eq!(
        snap.history[1].frames.as_deref(),
        Some(&frames[..]),
        "context recorded with the alloc"
    );
    let json = serde_json::to_string(&snap).unwrap();
    assert!(json.contains("\"active_allocated\"") && json.contains("\"segment_alloc\""));
    a.raw_free(small).unwrap();
    a.raw_free(large).unwrap();
}
