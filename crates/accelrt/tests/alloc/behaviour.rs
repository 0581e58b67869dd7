//! Caching allocator behaviour on host memory: reuse, splitting, coalescing, statistics,
//! callbacks, limits, the out-of-memory path and hostile input.

use std::sync::{Arc, Mutex};

use accelrt::alloc::{AllocatorConfig, AllocatorEvent, CachingAllocator, MemoryProvider};
use accelrt::backend::host::HostMemory;
use accelrt::{AllocError, Device, DeviceType, Stream};

use crate::common::{host_stream as stream, HOST0 as DEV};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// These tests are about plain segments (sizes, splits, segment release); expandable
/// segments have their own file.
fn allocator_with(capacity: u64, conf: &str) -> CachingAllocator {
    let mut config = AllocatorConfig::parse(conf).unwrap();
    config.expandable_segments = false;
    config.debug_checks = true;
    CachingAllocator::new(DEV, Arc::new(HostMemory::new(capacity)), None, config).unwrap()
}

fn allocator() -> CachingAllocator {
    allocator_with(1 << 34, "")
}

#[test]
fn freed_block_is_reused_on_the_same_stream() {
    let a = allocator();
    let p = a.raw_alloc(1000, stream(0)).unwrap();
    a.raw_free(p).unwrap();
    let q = a.raw_alloc(900, stream(0)).unwrap();
    assert_eq!(p, q, "a cached block of the same size class is reused");
    assert_eq!(a.stats().counters.num_device_alloc, 1);
    a.raw_free(q).unwrap();
}

#[test]
fn streams_do_not_share_cached_blocks() {
    // With release_at_peak the cached segment would be given back, and the OS could hand
    // the same address out again: keep it cached to see that stream 2 does not take it.
    let a = allocator_with(1 << 34, "release_at_peak:false");
    let p = a.raw_alloc(4096, stream(1)).unwrap();
    a.raw_free(p).unwrap();
    let q = a.raw_alloc(4096, stream(2)).unwrap();
    assert_ne!(p, q);
    assert_eq!(a.stats().counters.num_device_alloc, 2);
}

#[test]
fn small_and_large_requests_use_their_own_segments() {
    // (request, expected segment bytes reserved after it alone)
    let table = [
        (1, 2 * MIB),
        (MIB, 2 * MIB),
        (MIB + 1, 20 * MIB),
        (10 * MIB, 10 * MIB),
        (11 * MIB, 12 * MIB),
    ];
    for (size, reserved) in table {
        let a = allocator();
        let b = a.allocate(size, stream(0)).unwrap();
        assert_eq!(a.reserved_bytes(), reserved as u64, "request {size}");
        drop(b);
    }
}

#[test]
fn split_blocks_coalesce_back_to_a_whole_segment() {
    let a = allocator();
    let ptrs: Vec<usize> = (0..4)
        .map(|_| a.raw_alloc(512 * KIB, stream(0)).unwrap())
        .collect();
    assert_eq!(
        a.stats().counters.num_device_alloc,
        1,
        "four 512 KiB blocks fill one 2 MiB segment"
    );
    // Free out of order: the middle ones first, so merging happens on both sides.
    for i in [1, 0, 3, 2] {
        a.raw_free(ptrs[i]).unwrap();
    }
    assert_eq!(a.stats().all().allocated_bytes.current, 0);
    a.check_invariants().unwrap();
    a.empty_cache().unwrap();
    assert_eq!(
        a.stats().all().inactive_split.current,
        0,
        "coalesced back to one whole segment"
    );
    assert_eq!(
        a.reserved_bytes(),
        0,
        "whole segments go back to the device"
    );
    assert_eq!(a.stats().counters.num_device_free, 1);
}

#[test]
fn statistics_follow_pytorch_meanings() {
    let a = allocator();
    let p = a.raw_alloc(1000, stream(0)).unwrap(); // 1024-byte block in a 2 MiB segment
    let q = a.raw_alloc(3 * MIB, stream(0)).unwrap(); // large pool, 20 MiB segment
    let s = a.stats();
    assert_eq!(s.small_pool.allocated_bytes.current, 1024);
    assert_eq!(s.small_pool.requested_bytes.current, 1000);
    assert_eq!(s.small_pool.reserved_bytes.current, 2 * MIB as u64);
    assert_eq!(
        s.small_pool.inactive_split.current, 1,
        "the rest of the small segment"
    );
    assert_eq!(s.large_pool.allocated_bytes.current, 3 * MIB as u64);
    assert_eq!(s.large_pool.reserved_bytes.current, 20 * MIB as u64);
    assert_eq!(s.all().allocation.current, 2);
    a.raw_free(p).unwrap();
    a.raw_free(q).unwrap();
    let s = a.stats();
    assert_eq!(s.all().allocation.current, 0);
    assert_eq!(s.all().allocation.peak, 2);
    assert_eq!(s.all().allocation.allocated, 2);
    assert_eq!(s.all().allocation.freed, 2);
    a.reset_peak_stats();
    assert_eq!(a.stats().all().allocation.peak, 0);
    a.reset_accumulated_stats();
    let s = a.stats();
    assert_eq!(
        (s.all().allocation.allocated, s.counters.num_device_alloc),
        (0, 0)
    );
    let flat = s.to_flat_map();
    assert!(flat.contains_key("allocated_bytes.all.current"));
    assert!(flat.contains_key("reserved_bytes.large_pool.peak"));
    assert!(flat.contains_key("num_alloc_retries"));
}

#[test]
fn callbacks_fire_at_documented_points() {
    let a = allocator_with(4 * MIB as u64, "");
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let id = a.add_callback(Arc::new(move |_ptr, _size, ev| l.lock().unwrap().push(ev)));
    let p = a.raw_alloc(1000, stream(0)).unwrap();
    a.raw_free(p).unwrap();
    let p = a.raw_alloc(1000, stream(0)).unwrap();
    a.raw_free(p).unwrap();
    a.empty_cache().unwrap();
    use AllocatorEvent::*;
    assert_eq!(
        *log.lock().unwrap(),
        vec![Allocated, Freed, Recycled, Freed, Released]
    );
    log.lock().unwrap().clear();
    // Fill the 4 MiB device, then ask for more: AllocationFailed fires before the retry.
    let big = a.raw_alloc(4 * MIB, stream(0)).unwrap();
    assert!(a.raw_alloc(512, stream(1)).unwrap_err().is_out_of_memory());
    assert_eq!(*log.lock().unwrap(), vec![Allocated, AllocationFailed]);
    assert!(a.remove_callback(id));
    assert!(!a.remove_callback(id));
    a.raw_free(big).unwrap();
}

#[test]
fn allocation_failed_callback_can_free_memory_for_the_retry() {
    let a = Arc::new(allocator_with(4 * MIB as u64, ""));
    let hog = Arc::new(Mutex::new(Some(a.raw_alloc(4 * MIB, stream(0)).unwrap())));
    let (a2, h2) = (a.clone(), hog.clone());
    a.add_callback(Arc::new(move |_, _, ev| {
        if ev == AllocationFailed {
            if let Some(p) = h2.lock().unwrap().take() {
                a2.raw_free(p).unwrap();
            }
        }
    }));
    use AllocatorEvent::AllocationFailed;
    let p = a
        .raw_alloc(MIB, stream(1))
        .expect("the callback freed the hog, the retry succeeds");
    assert_eq!(a.stats().counters.num_alloc_retries, 1);
    a.raw_free(p).unwrap();
}

#[test]
fn out_of_memory_releases_the_cache_retries_then_reports() {
    let a = allocator_with(8 * MIB as u64, "");
    let live = a.raw_alloc(2 * MIB, stream(0)).unwrap(); // 2 MiB in use
    let cached = a.raw_alloc(4 * MIB, stream(1)).unwrap();
    a.raw_free(cached).unwrap(); // 4 MiB cached on stream 1
    let observed = Arc::new(Mutex::new(Vec::new()));
    let o = observed.clone();
    a.attach_oom_observer(Arc::new(move |info| o.lock().unwrap().push(info.requested)));
    let err = a.raw_alloc(7 * MIB, stream(0)).unwrap_err();
    let msg = err.to_string();
    for want in [
        "out of memory on host:0",
        "tried to allocate 7.00 MiB",
        "8.00 MiB total",
        "2.00 MiB allocated",
        "limit hit: device memory",
    ] {
        assert!(msg.contains(want), "message '{msg}' lacks '{want}'");
    }
    assert_eq!(*observed.lock().unwrap(), vec![7 * MIB as u64]);
    let s = a.stats();
    assert_eq!(s.counters.num_ooms, 1);
    assert_eq!(s.counters.num_alloc_retries, 1);
    assert_eq!(
        a.reserved_bytes(),
        2 * MIB as u64,
        "the cached 4 MiB went back before failing"
    );
    a.check_invariants().unwrap();
    // Still usable: 6 MiB fits now.
    let q = a.raw_alloc(6 * MIB, stream(0)).unwrap();
    a.raw_free(q).unwrap();
    a.raw_free(live).unwrap();
}

#[test]
fn cached_memory_on_other_streams_is_released_before_failing() {
    let a = allocator_with(4 * MIB as u64, "release_at_peak:false");
    let p = a.raw_alloc(2 * MIB, stream(1)).unwrap();
    let q = a.raw_alloc(2 * MIB, stream(1)).unwrap();
    a.raw_free(p).unwrap();
    a.raw_free(q).unwrap();
    assert_eq!(a.reserved_bytes(), 4 * MIB as u64);
    // Stream 2 needs 3 MiB: stream 1's cache is given back, then the allocation succeeds.
    let r = a.raw_alloc(3 * MIB, stream(2)).unwrap();
    assert_eq!(a.stats().counters.num_alloc_retries, 1);
    assert_eq!(a.reserved_bytes(), 4 * MIB as u64);
    a.raw_free(r).unwrap();
}

#[test]
fn a_request_that_fits_only_a_smaller_segment_still_succeeds() {
    // 3 MiB normally takes a 20 MiB segment; a 4 MiB device still serves it.
    let a = allocator_with(4 * MIB as u64, "");
    let p = a.raw_alloc(3 * MIB, stream(0)).unwrap();
    assert_eq!(a.reserved_bytes(), 4 * MIB as u64);
    assert_eq!(a.stats().counters.num_alloc_retries, 0);
    a.raw_free(p).unwrap();
}

#[test]
fn memory_fraction_and_high_watermark_are_hard_limits() {
    // (config, request, limit named in the message)
    let table = [
        (
            "per_process_memory_fraction:0.25",
            20 * MIB,
            "per_process_memory_fraction 0.25",
        ),
        (
            "high_watermark_ratio:0.25",
            20 * MIB,
            "high_watermark_ratio 0.25",
        ),
    ];
    for (conf, size, want) in table {
        let a = allocator_with(64 * MIB as u64, conf);
        let err = a.raw_alloc(size, stream(0)).unwrap_err().to_string();
        assert!(err.contains(want), "{conf}: '{err}' lacks '{want}'");
        let ok = a.raw_alloc(8 * MIB, stream(0)).unwrap();
        a.raw_free(ok).unwrap();
    }
    let a = allocator_with(64 * MIB as u64, "");
    a.set_memory_fraction(0.5).unwrap();
    assert_eq!(a.memory_fraction(), Some(0.5));
    assert!(a.set_memory_fraction(-0.1).is_err());
    assert!(a.set_memory_fraction(1.5).is_err());
    assert!(a.set_memory_fraction(f64::NAN).is_err());
    assert_eq!(
        a.memory_fraction(),
        Some(0.5),
        "a rejected setting changes nothing"
    );
    a.set_high_watermark_ratio(1.0).unwrap();
    assert!(a.set_low_watermark_ratio(1.5).is_err());
    a.set_low_watermark_ratio(0.5).unwrap();
    assert_eq!(a.low_watermark_headroom(), Some(32 * MIB as u64));
}

#[test]
fn low_watermark_collects_oldest_cached_segments_first() {
    let a = allocator_with(100 * MIB as u64, "low_watermark_ratio:0.5");
    let released = Arc::new(Mutex::new(Vec::new()));
    let r = released.clone();
    a.add_callback(Arc::new(move |ptr, _, ev| {
        if ev == AllocatorEvent::Released {
            r.lock().unwrap().push(ptr)
        }
    }));
    let ptrs: Vec<usize> = (0..3)
        .map(|_| a.raw_alloc(20 * MIB, stream(0)).unwrap())
        .collect();
    for &p in &ptrs {
        a.raw_free(p).unwrap(); // freed in order: ptrs[0] is the oldest
    }
    assert_eq!(a.reserved_bytes(), 60 * MIB as u64);
    // A 30 MiB request needs a new segment: 60 + 30 > 50, so the oldest cached go first.
    let q = a.raw_alloc(30 * MIB, stream(0)).unwrap();
    assert_eq!(a.reserved_bytes(), 50 * MIB as u64);
    assert_eq!(
        *released.lock().unwrap(),
        vec![ptrs[0], ptrs[1]],
        "oldest first, and no more than needed"
    );
    a.raw_free(q).unwrap();
}

#[test]
fn release_at_peak_gives_back_unusable_cache_before_growing_past_the_peak() {
    // (config, reserved peak after the sequence, device frees)
    let table = [
        ("", 60 * MIB as u64, 1),
        ("release_at_peak:false", 80 * MIB as u64, 0),
    ];
    for (conf, peak, frees) in table {
        let a = allocator_with(1 << 34, conf);
        let x = a.raw_alloc(20 * MIB, stream(0)).unwrap();
        let y = a.raw_alloc(20 * MIB, stream(0)).unwrap();
        a.raw_free(x).unwrap(); // 20 MiB cached, too small for what comes next
        let z = a.raw_alloc(40 * MIB, stream(0)).unwrap();
        let s = a.stats();
        assert_eq!(s.reserved_bytes_peak, peak, "{conf:?}");
        assert_eq!(s.counters.num_device_free, frees, "{conf:?}");
        // Below the peak, nothing is released: a steady loop does not churn.
        a.raw_free(z).unwrap();
        let again = a.raw_alloc(40 * MIB, stream(0)).unwrap();
        assert_eq!(
            a.stats().counters.num_device_free,
            frees,
            "{conf:?}: no churn below the peak"
        );
        a.raw_free(again).unwrap();
        a.raw_free(y).unwrap();
    }
}

#[test]
fn max_split_size_keeps_large_blocks_whole() {
    let a = allocator_with(1 << 34, "max_split_size_mb:64,release_at_peak:false");
    let big = a.raw_alloc(100 * MIB, stream(0)).unwrap();
    a.raw_free(big).unwrap();
    // A small-ish request must not carve up the 100 MiB cached block.
    let p = a.raw_alloc(30 * MIB, stream(0)).unwrap();
    assert_ne!(p, big);
    // A request close to it in size (within 20 MiB) may take it whole.
    let q = a.raw_alloc(90 * MIB, stream(0)).unwrap();
    assert_eq!(q, big);
    assert_eq!(a.block_size(q).unwrap(), 100 * MIB as u64, "not split");
    a.raw_free(p).unwrap();
    a.raw_free(q).unwrap();
}

#[test]
fn buffer_metadata() {
    let a = allocator();
    let b = a.allocate(1000, stream(0)).unwrap();
    let p = b.ptr();
    assert_eq!(a.requested_size(p).unwrap(), 1000);
    assert_eq!(a.block_size(p).unwrap(), 1024);
    assert_eq!(a.buffer_shape(p).unwrap(), Vec::<i64>::new());
    a.set_buffer_shape(p, &[10, 25]).unwrap();
    assert_eq!(a.buffer_shape(p).unwrap(), vec![10, 25]);
    let id = a.buffer_id(p).unwrap();
    assert_ne!(id, 0);
    assert!(a.is_shared_storage_supported());
    assert!(a.is_shared_buffer(p));
    assert_eq!(a.shared_host_ptr(p).unwrap() as usize, p);
    drop(b);
    assert!(a.buffer_shape(p).is_err(), "metadata goes with the buffer");
    let b2 = a.allocate(1000, stream(0)).unwrap();
    assert_ne!(a.buffer_id(b2.ptr()).unwrap(), id, "ids are not reused");
    assert_eq!(
        a.buffer_shape(b2.ptr()).unwrap(),
        Vec::<i64>::new(),
        "old shape does not leak to the reused block"
    );
    let s = a
        .alloc_scalar_with_value(&42u64.to_le_bytes(), stream(0))
        .unwrap();
    // SAFETY: host memory; `s` is a live 8-byte (at least) buffer written just above.
    assert_eq!(unsafe { (s as *const u64).read() }, 42);
    a.raw_free(s).unwrap();
}

#[test]
fn hostile_input_is_refused_and_changes_nothing() {
    let a = allocator();
    let p = a.raw_alloc(4096, stream(0)).unwrap();
    let before = a.stats();
    let other_device = Stream {
        device: Device {
            kind: DeviceType::Host,
            index: 3,
        },
        index: 0,
    };
    let cases: Vec<(&str, AllocError)> = vec![
        (
            "not from this allocator",
            a.raw_free(0xdead_0000).unwrap_err(),
        ),
        ("not from this allocator", a.raw_free(p + 512).unwrap_err()),
        (
            "requests are limited to",
            a.raw_alloc(usize::MAX, stream(0)).unwrap_err(),
        ),
        (
            "requests are limited to",
            a.raw_alloc(-1isize as usize, stream(0)).unwrap_err(),
        ),
        (
            "this allocator serves host:0, not host:3",
            a.raw_alloc(16, other_device).unwrap_err(),
        ),
        (
            "above the 4095 streams",
            a.raw_alloc(16, stream(100_000)).unwrap_err(),
        ),
        ("requested_size", a.requested_size(12345).unwrap_err()),
        (
            "not supported by the host backend",
            a.record_stream(p, stream(1)).unwrap_err(),
        ),
        (
            "memory fraction must be in [0, 1]",
            a.set_memory_fraction(f64::NAN).unwrap_err(),
        ),
    ];
    for (want, err) in cases {
        assert!(err.to_string().contains(want), "'{err}' lacks '{want}'");
    }
    assert_eq!(
        a.stats(),
        before,
        "refused calls leave the statistics as they were"
    );
    a.raw_free(p).unwrap();
    let err = a.raw_free(p).unwrap_err();
    assert!(err.to_string().contains("double free"), "{err}");
    a.raw_free(0).unwrap();
    assert_eq!(a.raw_alloc(0, stream(0)).unwrap(), 0);
    a.check_invariants().unwrap();
}

#[test]
fn error_in_buffer_drop_is_reported_at_the_next_call() {
    let a = allocator();
    let b = a.allocate(4096, stream(0)).unwrap();
    a.raw_free(b.ptr()).unwrap(); // freed behind the buffer's back
    drop(b); // the drop's free fails: kept for later
    let err = a.raw_alloc(16, stream(0)).unwrap_err();
    assert!(err.to_string().contains("double free"), "{err}");
    a.raw_alloc(16, stream(0))
        .map(|p| a.raw_free(p))
        .unwrap()
        .unwrap();
}

#[test]
fn provider_figures() {
    let mem = Arc::new(HostMemory::new(1 << 30));
    let config = AllocatorConfig::parse("expandable_segments:false").unwrap();
    let a = CachingAllocator::new(DEV, mem.clone(), None, config).unwrap();
    let b = a.allocate(5 * MIB, stream(0)).unwrap();
    assert_eq!(a.driver_allocated(), mem.driver_allocated());
    assert_eq!(a.reserved_bytes(), 20 * MIB as u64);
    assert_eq!(a.allocated_bytes(), 5 * MIB as u64);
    assert_eq!(a.recommended_max(), 1 << 30);
    drop(b);
}

#[test]
fn dropping_the_allocator_gives_all_memory_back() {
    // (config, what is left live at drop)
    for conf in ["expandable_segments:false", "expandable_segments:true"] {
        let mem = Arc::new(HostMemory::new(1 << 30));
        let mut config = AllocatorConfig::parse(conf).unwrap();
        config.debug_checks = true;
        let a = CachingAllocator::new(DEV, mem.clone(), None, config).unwrap();
        let _live = a.raw_alloc(3 * MIB, stream(0)).unwrap();
        let cached = a.raw_alloc(40 * MIB, stream(1)).unwrap();
        a.raw_free(cached).unwrap();
        assert!(mem.driver_allocated() > 0);
        drop(a);
        assert_eq!(mem.driver_allocated(), 0, "{conf}: memory left behind");
    }
}

#[test]
fn combined_peaks_are_exact_not_the_sum_of_the_pools() {
    let a = allocator();
    let small = a.raw_alloc(MIB, stream(0)).unwrap();
    a.raw_free(small).unwrap();
    let large = a.raw_alloc(30 * MIB, stream(0)).unwrap();
    a.raw_free(large).unwrap();
    let s = a.stats();
    assert_eq!(s.small_pool.allocated_bytes.peak, MIB as u64);
    assert_eq!(s.large_pool.allocated_bytes.peak, 30 * MIB as u64);
    // Never both live at once: the peak of the two together is the larger one, not the sum.
    assert_eq!(s.all().allocated_bytes.peak, 30 * MIB as u64);
    assert!(s.all().reserved_bytes.peak >= s.all().allocated_bytes.peak);
}

#[test]
fn expandable_free_space_is_not_inactive_split() {
    let config = AllocatorConfig {
        debug_checks: true,
        ..AllocatorConfig::default()
    };
    let a = CachingAllocator::new(DEV, Arc::new(HostMemory::new(1 << 30)), None, config).unwrap();
    assert!(a.is_expandable());
    let p = a.raw_alloc(5 * MIB, stream(0)).unwrap();
    // The rest of the reserved range is address space, not stranded memory.
    assert_eq!(a.stats().all().inactive_split_bytes.current, 0);
    a.raw_free(p).unwrap();
}
