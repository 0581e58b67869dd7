//! The MPS allocator interface's calls on the host backend: buffer ids unique across stream
//! and private pools, `free_inactive_buffers` (finishes pending frees, waits for nothing,
//! gives nothing back), watermark limits in bytes and the signed low-watermark value,
//! scalar buffers written in stream order, and what host-visible memory allows.

use crate::common;

use std::collections::HashSet;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use accelrt::alloc::{AllocatorConfig, CachingAllocator, StreamFilter};
use accelrt::backend::host::HostMemory;
use accelrt::{Backend, Device, DeviceType, MempoolId, StreamPriority};
use common::{runtime, Gate};

const MIB: u64 = 1 << 20;

#[test]
fn buffer_ids_are_unique_across_stream_pools_and_private_pools() {
    let rt = runtime(1);
    let a = rt.allocator(0).unwrap();
    let streams = [
        rt.default_stream(0).unwrap(),
        rt.new_stream(0, StreamPriority::Normal).unwrap(),
    ];
    let mut live = Vec::new();
    // Four blocks in each stream pool...
    for s in streams {
        for _ in 0..4 {
            live.push(a.raw_alloc(4096, s).unwrap());
        }
    }
    // ... and four in each of two private pools (private pools use the pool slots past the
    // stream pools: with 12 bits for the slot, private slot 0's second block and stream
    // pool 0's third had the same id).
    for _ in 0..2 {
        let pool = a.new_pool_id();
        a.begin_allocate_to_pool(pool, StreamFilter::Only(streams[0]))
            .unwrap();
        for _ in 0..4 {
            live.push(a.raw_alloc(4096, streams[0]).unwrap());
        }
        a.end_allocate_to_pool(pool).unwrap();
    }
    let ids: Vec<u64> = live.iter().map(|&p| a.buffer_id(p).unwrap()).collect();
    let distinct: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), ids.len(), "ids: {ids:x?}");
    assert!(!distinct.contains(&0));
    // Ids are never reused: free everything, allocate again in the same pools.
    for p in live.drain(..) {
        a.raw_free(p).unwrap();
    }
    for s in streams {
        let p = a.raw_alloc(4096, s).unwrap();
        assert!(!distinct.contains(&a.buffer_id(p).unwrap()));
        a.raw_free(p).unwrap();
    }
}

#[test]
fn free_inactive_buffers_finishes_pending_frees_without_waiting_or_releasing() {
    let rt = runtime(1);
    let a = rt.allocator(0).unwrap();
    let (own, other) = (
        rt.new_stream(0, StreamPriority::Normal).unwrap(),
        rt.new_stream(0, StreamPriority::Normal).unwrap(),
    );
    let gate = Gate::new();
    rt.launch_host(other, gate.task()).unwrap();
    let ptr = a.raw_alloc((4 * MIB) as usize, own).unwrap();
    let block = a.block_size(ptr).unwrap();
    a.record_stream(ptr, other).unwrap();
    a.raw_free(ptr).unwrap(); // pending: `other` may still use it
    let active = |a: &CachingAllocator| a.stats().all().active_bytes.current;
    let (active_before, reserved_before) = (active(&a), a.reserved_bytes());
    assert!(active_before >= block);

    // While `other` is held, the call returns at once and changes nothing.
    let (done_tx, done) = mpsc::channel();
    let a2 = Arc::clone(&a);
    std::thread::spawn(move || done_tx.send(a2.free_inactive_buffers()).unwrap());
    let returned = done.recv_timeout(Duration::from_secs(5));
    assert!(
        matches!(returned, Ok(Ok(()))),
        "free_inactive_buffers waited for a stream (or failed): {returned:?}"
    );
    assert_eq!(
        active(&a),
        active_before,
        "the pending free is still pending"
    );
    assert_eq!(a.reserved_bytes(), reserved_before);

    // Once `other` has passed, the free completes; the memory stays cached.
    gate.open();
    rt.stream_synchronize(other).unwrap();
    a.free_inactive_buffers().unwrap();
    assert_eq!(
        active(&a),
        active_before - block,
        "the block is inactive now"
    );
    assert_eq!(
        a.reserved_bytes(),
        reserved_before,
        "nothing went back to the device"
    );
    let again = a.raw_alloc((4 * MIB) as usize, own).unwrap();
    assert_eq!(again, ptr, "the completed free's block is reused");
    a.raw_free(again).unwrap();
    a.empty_cache().unwrap();
}

fn small_allocator(capacity: u64) -> CachingAllocator {
    let config = AllocatorConfig {
        expandable_segments: false,
        ..AllocatorConfig::default()
    };
    let device = Device {
        kind: DeviceType::Host,
        index: 0,
    };
    CachingAllocator::new(device, Arc::new(HostMemory::new(capacity)), None, config).unwrap()
}

#[test]
fn watermark_limits_in_bytes_and_a_signed_low_watermark_value() {
    let a = small_allocator(100 * MIB);
    let stream = accelrt::Stream {
        device: a.device(),
        index: 0,
    };
    assert_eq!(a.recommended_max(), 100 * MIB);
    assert_eq!(
        (
            a.low_watermark_limit(),
            a.high_watermark_limit(),
            a.low_watermark_value()
        ),
        (None, None, None),
        "no watermarks by default"
    );
    a.set_high_watermark_ratio(1.5).unwrap();
    a.set_low_watermark_ratio(0.25).unwrap();
    assert_eq!(a.high_watermark_limit(), Some(150 * MIB));
    assert_eq!(a.low_watermark_limit(), Some(25 * MIB));
    assert_eq!(a.low_watermark_value(), Some((25 * MIB) as i64));
    // Live memory above the low watermark (nothing cached can be collected): negative.
    let live: Vec<usize> = (0..2)
        .map(|_| a.raw_alloc((20 * MIB) as usize, stream).unwrap())
        .collect();
    let reserved = a.reserved_bytes() as i64;
    assert!(reserved >= (40 * MIB) as i64);
    assert_eq!(a.low_watermark_value(), Some((25 * MIB) as i64 - reserved));
    assert!(a.low_watermark_value().unwrap() < 0);
    assert_eq!(
        a.low_watermark_headroom(),
        Some(0),
        "the unsigned figure stops at 0"
    );
    for p in live {
        a.raw_free(p).unwrap();
    }
    // Turning a watermark off turns its limit off.
    a.set_low_watermark_ratio(0.0).unwrap();
    a.set_high_watermark_ratio(0.0).unwrap();
    assert_eq!(
        (a.low_watermark_limit(), a.high_watermark_limit()),
        (None, None)
    );
}

#[test]
fn scalar_buffers_are_written_in_stream_order() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let a = rt.allocator(0).unwrap();
    // The stream is held: the write is queued behind the gate, not done at once.
    let gate = Gate::new();
    rt.launch_host(s, gate.task()).unwrap();
    let value = 0x1122_3344_5566_7788u64.to_le_bytes();
    let ptr = rt.alloc_scalar_with_value(s, &value).unwrap();
    assert_eq!(a.requested_size(ptr), Ok(8));
    assert_eq!(
        rt.stream_query(s),
        Ok(false),
        "the write waits in the stream"
    );
    gate.open();
    rt.stream_synchronize(s).unwrap();
    // SAFETY: host memory; `ptr` is a live buffer of 8 bytes, written by the finished stream.
    let read = unsafe { std::slice::from_raw_parts(ptr as *const u8, 8) };
    assert_eq!(read, value);
    a.raw_free(ptr).unwrap();

    let err = rt.alloc_scalar_with_value(s, &[]).unwrap_err();
    assert!(err.to_string().contains("at least one byte"), "{err}");
    // Refused while the stream captures a graph (the write would be captured).
    let g = rt.graph_create(0).unwrap();
    rt.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
    let err = rt.alloc_scalar_with_value(s, &[1]).unwrap_err();
    assert!(
        err.to_string().contains("while it is capturing graph"),
        "{err}"
    );
    rt.graph_capture_end(g).unwrap();
}

#[test]
fn host_memory_is_shared_with_the_host() {
    let rt = runtime(1);
    let s = rt.default_stream(0).unwrap();
    let a = rt.allocator(0).unwrap();
    assert!(a.is_shared_storage_supported());
    let p = a.raw_alloc(64, s).unwrap();
    assert!(a.is_shared_buffer(p));
    assert_eq!(a.shared_host_ptr(p).unwrap() as usize, p);
    a.raw_free(p).unwrap();
    assert!(!a.is_shared_buffer(p), "a freed buffer is not shared");
    assert!(a.shared_host_ptr(p).is_err());
}
