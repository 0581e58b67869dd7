//! Hostile input and misuse found by fuzzing (issue 13), one test per finding: each failed
//! (a panic, a wrong answer or a misleading message) before its fix.

use std::sync::Arc;

use accelrt::alloc::{AllocatorConfig, CachingAllocator, StreamFilter};
use accelrt::backend::host::HostMemory;
use accelrt::{Device, DeviceType, Stream};

const DEV: Device = Device {
    kind: DeviceType::Host,
    index: 0,
};

fn allocator() -> CachingAllocator {
    let config = AllocatorConfig {
        debug_checks: true,
        ..AllocatorConfig::default()
    };
    CachingAllocator::new(DEV, Arc::new(HostMemory::new(1 << 30)), None, config).unwrap()
}

/// Item 5: a released pool that still has a live block has no use left to drop; a second
/// release underflowed its use count (a panic in debug builds, 2^32 - 1 uses in release).
#[test]
fn a_released_pool_cannot_be_released_retained_or_begun_again() {
    let a = allocator();
    let pool = a.new_pool_id();
    a.begin_allocate_to_pool(pool, StreamFilter::All).unwrap();
    let p = a
        .raw_alloc(
            512,
            Stream {
                device: DEV,
                index: 0,
            },
        )
        .unwrap();
    a.end_allocate_to_pool(pool).unwrap();
    a.release_pool(pool).unwrap();
    assert_eq!(a.pool_use_count(pool), Some(0), "released, draining");
    let refusals = [
        a.release_pool(pool).unwrap_err(),
        a.retain_pool(pool).unwrap_err(),
        a.begin_allocate_to_pool(pool, StreamFilter::All)
            .unwrap_err(),
    ];
    for e in refusals {
        assert!(
            e.to_string().contains("was already released"),
            "says what happened: {e}"
        );
        assert!(
            !e.to_string().contains("MempoolId"),
            "no debug formatting: {e}"
        );
    }
    assert_eq!(a.pool_use_count(pool), Some(0));
    a.raw_free(p).unwrap();
    assert_eq!(a.pool_use_count(pool), None, "gone with its last block");
    a.check_invariants().unwrap();
}
