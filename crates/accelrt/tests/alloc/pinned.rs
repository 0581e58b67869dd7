//! The caching pinned-host allocator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use accelrt::alloc::PinnedAllocator;
use accelrt::backend::host::{HostDriver, HostMemory};
use accelrt::runtime::Runtime;
use accelrt::{Backend, StreamPriority};

#[test]
fn freed_blocks_are_reused_by_size_bucket() {
    let p = PinnedAllocator::new(Arc::new(HostMemory::new(1 << 30)), None);
    // (request, block it gets: powers of two from 512)
    let a = p.allocate(3000).unwrap();
    assert_eq!(p.stats().allocated_bytes.current, 4096);
    p.free(a).unwrap();
    let b = p.allocate(4096).unwrap();
    assert_eq!(b, a, "same bucket: the cached block comes back");
    let c = p.allocate(4097).unwrap();
    assert_ne!(c, a);
    assert_eq!(p.stats().num_host_alloc, 2);
    assert!(p.contains(b + 100) && !p.contains(usize::MAX - 4096));
    assert_eq!(p.requested_size(c).unwrap(), 4097);
    p.free(b).unwrap();
    p.free(c).unwrap();
    let s = p.stats();
    assert_eq!(
        (
            s.allocations.current,
            s.allocations.peak,
            s.reserved_bytes.current
        ),
        (0, 2, 4096 + 8192)
    );
    p.empty_cache();
    let s = p.stats();
    assert_eq!((s.reserved_bytes.current, s.num_host_free), (0, 2));
    assert!(!p.contains(a));
}

#[test]
fn hostile_input_is_refused() {
    let p = PinnedAllocator::new(Arc::new(HostMemory::new(1 << 20)), None);
    let a = p.allocate(100).unwrap();
    p.free(a).unwrap();
    let cases = [
        (p.free(a).unwrap_err().to_string(), "double free"),
        (
            p.free(12345 << 9).unwrap_err().to_string(),
            "not from this allocator",
        ),
        (
            p.allocate(usize::MAX).unwrap_err().to_string(),
            "requests are limited",
        ),
        (
            p.allocate(4 << 20).unwrap_err().to_string(),
            "out of memory on pinned host memory",
        ),
        (
            p.record_stream(
                a,
                accelrt::Stream {
                    device: accelrt::Device {
                        kind: accelrt::DeviceType::Host,
                        index: 0,
                    },
                    index: 0,
                },
            )
            .unwrap_err()
            .to_string(),
            "event source",
        ),
    ];
    for (err, want) in cases {
        assert!(err.contains(want), "'{err}' lacks '{want}'");
    }
    assert_eq!(p.allocate(0).unwrap(), 0);
    p.free(0).unwrap();
}

/// A pinned block used by a stream (a copy in flight) is not reused until that stream has
/// passed the free.
#[test]
fn blocks_used_on_streams_wait_for_them() {
    let rt: Runtime<HostDriver> = Runtime::with_driver(HostDriver::with_devices(1).unwrap());
    let pinned = rt.pinned_allocator().unwrap();
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let a = pinned.allocate(1 << 20).unwrap();
    assert!(rt.is_pinned_ptr(a));
    let gate = Arc::new(AtomicBool::new(false));
    let g = gate.clone();
    rt.launch_host(
        s,
        Arc::new(move || {
            while !g.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }),
    )
    .unwrap();
    pinned.record_stream(a, s).unwrap();
    pinned.free(a).unwrap();
    let b = pinned.allocate(1 << 20).unwrap();
    assert_ne!(b, a, "block handed out while its stream still uses it");
    gate.store(true, Ordering::Release);
    rt.stream_synchronize(s).unwrap();
    pinned.free(b).unwrap();
    let c = pinned.allocate(1 << 20).unwrap();
    let d = pinned.allocate(1 << 20).unwrap();
    assert!(
        [c, d].contains(&a),
        "once the stream has passed, the block is reused"
    );
    pinned.free(c).unwrap();
    pinned.free(d).unwrap();
    assert_eq!(pinned.stats().num_host_alloc, 2);
}
