//! Checks of the caching allocator and the memory queries.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use accelrt::alloc::{AllocatorEvent, HistoryConfig, StreamFilter, TraceAction};
use accelrt::hooks::Backend;
use accelrt::{AllocError, Device, Error};

use crate::{device, fresh_stream, returns_promptly, Gate, PATIENCE};

/// Allocate / free, metadata (unaligned size, id, shape), stats, emptyCache, scalar
/// buffers, shared buffers (or the documented refusal).
pub fn allocator_basics(b: &dyn Backend) {
    let a = b.device_allocator(0).unwrap();
    assert!(
        Arc::ptr_eq(&a, &b.device_allocator(0).unwrap()),
        "one per device"
    );
    assert_eq!(a.device(), device(b, 0));
    let (s1, s2) = (fresh_stream(b), fresh_stream(b));
    let before = a.stats().all().allocation.current;
    let p = a.raw_alloc(1000, s1).unwrap();
    assert_eq!(a.requested_size(p), Ok(1000));
    assert!(a.block_size(p).unwrap() >= 1000);
    assert_eq!(a.stats().all().allocation.current, before + 1);
    assert_eq!(
        b.memory_stats(0).unwrap().all().allocation.current,
        before + 1
    );
    a.set_buffer_shape(p, &[10, 100]).unwrap();
    assert_eq!(a.buffer_shape(p), Ok(vec![10, 100]));
    // Buffer ids are unique across streams and private pools.
    let mut ptrs = vec![p];
    for s in [s1, s2, s1] {
        ptrs.push(a.raw_alloc(4096, s).unwrap());
    }
    // Routing to a private pool is the concrete allocator's (graph capture's, through the
    // runtime); the interface sees the pool's blocks like any other.
    let routes = b.allocator(0).unwrap();
    let pool = routes.new_pool_id();
    routes
        .begin_allocate_to_pool(pool, StreamFilter::Only(s1))
        .unwrap();
    for _ in 0..3 {
        ptrs.push(a.raw_alloc(4096, s1).unwrap());
    }
    routes.end_allocate_to_pool(pool).unwrap();
    let ids: HashSet<u64> = ptrs.iter().map(|&q| a.buffer_id(q).unwrap()).collect();
    assert_eq!(ids.len(), ptrs.len(), "buffer ids are unique");
    assert!(!ids.contains(&0));
    for q in ptrs {
        a.raw_free(q).unwrap();
    }
    assert!(a.buffer_shape(p).is_err(), "metadata goes with the buffer");
    assert!(matches!(
        a.raw_free(p),
        Err(AllocError::InvalidPointer { .. })
    ));
    assert_eq!(a.stats().all().allocation.current, before);
    a.release_pool(pool).unwrap();

    // Scalar buffers: written in stream order.
    let value = 0x0102_0304_0506_0708u64.to_le_bytes();
    let scalar = b.alloc_scalar_with_value(s1, &value).unwrap();
    assert_eq!(a.requested_size(scalar), Ok(8));
    b.stream_synchronize(s1).unwrap();
    if a.is_shared_storage_supported() {
        assert!(a.is_shared_buffer(scalar));
        let host = a.shared_host_ptr(scalar).unwrap();
        // SAFETY: host-visible memory; `scalar` is a live 8-byte buffer, written by the
        // stream just synchronized.
        let read = unsafe { std::slice::from_raw_parts(host, 8) };
        assert_eq!(read, value);
    } else {
        assert!(!a.is_shared_buffer(scalar));
        let err = a.shared_host_ptr(scalar).unwrap_err();
        assert!(
            matches!(err, AllocError::Unsupported { .. })
                && err.to_string().contains("shared_host_ptr"),
            "{err}"
        );
        let err = a.alloc_scalar_with_value(&value, s1).unwrap_err();
        assert!(
            err.to_string().contains("Backend::alloc_scalar_with_value"),
            "{err}"
        );
    }
    a.raw_free(scalar).unwrap();
    b.empty_cache(0).unwrap();
    b.reset_peak_memory_stats(0).unwrap();
    let stats = a.stats().all();
    assert_eq!(stats.allocated_bytes.peak, stats.allocated_bytes.current);
}

/// recordStream, recordEvents / waitForEvents, freeInactiveBuffers: memory used on another
/// stream is not reused before that stream has passed, and finishing such frees waits for
/// nothing.
pub fn allocator_cross_stream(b: &dyn Backend) {
    let a = b.device_allocator(0).unwrap();
    let (own, other) = (fresh_stream(b), fresh_stream(b));
    let size = 3 << 20;
    let gate = Gate::default();
    b.launch_host(other, gate.task()).unwrap();
    let p = a.raw_alloc(size, own).unwrap();
    let block = a.block_size(p).unwrap();
    a.record_stream(p, other).unwrap();
    a.raw_free(p).unwrap();
    let active = || a.stats().all().active_bytes.current;
    let active_pending = active();
    // While `other` is held, the block is not handed out again.
    let q = a.raw_alloc(size, own).unwrap();
    assert_ne!(q, p, "a block other streams may still use is not reused");
    a.raw_free(q).unwrap();
    let a2 = Arc::clone(&a);
    let finished = returns_promptly(move || a2.free_inactive_buffers());
    assert!(
        matches!(finished, Some(Ok(()))),
        "free_inactive_buffers waits for nothing: {finished:?}"
    );
    assert_eq!(active(), active_pending, "the free is still pending");
    gate.open();
    b.stream_synchronize(other).unwrap();
    a.free_inactive_buffers().unwrap();
    assert_eq!(active(), active_pending - block, "the free completed");

    // recordEvents / waitForEvents.
    let gate = Gate::default();
    b.launch_host(other, gate.task()).unwrap();
    let r = a.raw_alloc(4096, own).unwrap();
    a.record_events(&[r], other).unwrap();
    let a3 = Arc::clone(&a);
    let (tx, waited) = mpsc::channel();
    std::thread::spawn(move || tx.send(a3.wait_for_events(&[r])).unwrap());
    assert!(
        waited.recv_timeout(Duration::from_millis(100)).is_err(),
        "wait_for_events waits for the held stream"
    );
    gate.open();
    let result = waited
        .recv_timeout(PATIENCE)
        .expect("wait_for_events returns");
    assert_eq!(result, Ok(()));
    a.raw_free(r).unwrap();
    b.stream_synchronize(own).unwrap();
}

/// Watermark ratios and their limits in bytes, the signed low-watermark value, an
/// out-of-memory at the high watermark reported to the OOM observers.
pub fn allocator_limits(b: &dyn Backend) {
    let a = b.device_allocator(0).unwrap();
    let s = fresh_stream(b);
    let recommended = a.recommended_max();
    assert!(recommended > 0);
    a.set_high_watermark_ratio(1.5).unwrap();
    a.set_low_watermark_ratio(0.5).unwrap();
    assert_eq!(
        a.high_watermark_limit(),
        Some((recommended as f64 * 1.5) as u64)
    );
    let low = (recommended as f64 * 0.5) as u64;
    assert_eq!(a.low_watermark_limit(), Some(low));
    assert_eq!(
        a.low_watermark_value(),
        Some(low as i64 - a.reserved_bytes() as i64)
    );
    assert!(a.set_low_watermark_ratio(1.6).is_err(), "low above high");
    a.set_low_watermark_ratio(0.0).unwrap();
    // A high watermark below what is asked: an out-of-memory, told to the observers.
    let observed = Arc::new(AtomicUsize::new(0));
    let o = Arc::clone(&observed);
    a.attach_oom_observer(Arc::new(move |_| {
        o.fetch_add(1, Ordering::SeqCst);
    }));
    let tiny_ratio = 0.001;
    a.set_high_watermark_ratio(tiny_ratio).unwrap();
    let too_much = ((recommended as f64 * tiny_ratio) as usize + (64 << 20)).max(256 << 20);
    let err = a.raw_alloc(too_much, s).unwrap_err();
    a.set_high_watermark_ratio(0.0).unwrap();
    assert!(err.is_out_of_memory(), "{err}");
    assert!(err.to_string().contains("high_watermark_ratio"), "{err}");
    assert!(
        observed.load(Ordering::SeqCst) >= 1,
        "the observer was told"
    );
    assert_eq!(
        (
            a.low_watermark_limit(),
            a.high_watermark_limit(),
            a.low_watermark_value()
        ),
        (None, None, None)
    );
    // The allocator works on.
    let p = a.raw_alloc(1 << 20, s).unwrap();
    a.raw_free(p).unwrap();
}

/// Allocator callbacks, per allocator and process-wide (MPSAllocatorCallbacksRegistry).
pub fn allocator_callbacks(b: &dyn Backend) {
    let a = b.device_allocator(0).unwrap();
    let s = fresh_stream(b);
    let own: Arc<Mutex<Vec<(usize, AllocatorEvent)>>> = Arc::default();
    let global: Arc<Mutex<Vec<(Device, usize, AllocatorEvent)>>> = Arc::default();
    let o = Arc::clone(&own);
    let own_id = a.add_callback(Arc::new(move |ptr, _, ev| {
        o.lock().unwrap().push((ptr, ev))
    }));
    let g = Arc::clone(&global);
    let global_id = accelrt::registry::add_allocator_callback(Arc::new(move |d, ptr, _, ev| {
        g.lock().unwrap().push((d, ptr, ev))
    }));
    let p = a.raw_alloc(8192, s).unwrap();
    a.raw_free(p).unwrap();
    let q = a.raw_alloc(8192, s).unwrap();
    assert_eq!(q, p, "the cached block comes back on the same stream");
    a.raw_free(q).unwrap();
    let mine = |events: Vec<(usize, AllocatorEvent)>| -> Vec<AllocatorEvent> {
        events
            .into_iter()
            .filter(|(ptr, ev)| *ptr == p && *ev != AllocatorEvent::Allocated)
            .map(|(_, ev)| ev)
            .collect()
    };
    let expected = [
        AllocatorEvent::Freed,
        AllocatorEvent::Recycled,
        AllocatorEvent::Freed,
    ];
    assert_eq!(mine(own.lock().unwrap().clone()), expected);
    let seen_globally: Vec<(usize, AllocatorEvent)> = global
        .lock()
        .unwrap()
        .iter()
        .filter(|(d, _, _)| *d == device(b, 0))
        .map(|&(_, ptr, ev)| (ptr, ev))
        .collect();
    assert_eq!(mine(seen_globally), expected);
    assert!(a.remove_callback(own_id));
    assert!(accelrt::registry::remove_allocator_callback(global_id));
    own.lock().unwrap().clear();
    global.lock().unwrap().clear();
    let r = a.raw_alloc(8192, s).unwrap();
    a.raw_free(r).unwrap();
    assert!(own.lock().unwrap().is_empty() && global.lock().unwrap().is_empty());
}

/// recordMemoryHistory and memorySnapshot (MTIA hooks).
pub fn allocator_history(b: &dyn Backend) {
    let a = b.device_allocator(0).unwrap();
    let s = fresh_stream(b);
    a.record_memory_history(Some(HistoryConfig::default()));
    let p = a.raw_alloc(5000, s).unwrap();
    let snapshot = a.memory_snapshot();
    let live = snapshot
        .segments
        .iter()
        .flat_map(|seg| &seg.blocks)
        .any(|block| block.address == p as u64 && block.requested_size == 5000);
    assert!(live, "the snapshot holds the live block");
    a.raw_free(p).unwrap();
    let history = a.memory_snapshot().history;
    a.record_memory_history(None);
    // Forgetting what was recorded is the concrete allocator's.
    b.allocator(0).unwrap().clear_memory_history();
    let actions: Vec<TraceAction> = history
        .iter()
        .filter(|e| e.addr == p as u64)
        .map(|e| e.action)
        .collect();
    assert!(
        actions.contains(&TraceAction::Alloc) && actions.contains(&TraceAction::FreeRequested),
        "{actions:?}"
    );
}

/// getCurrentAllocatedMemory, getDriverAllocatedMemory, getRecommendedMaxMemory,
/// getDeviceFromPtr.
pub fn memory_queries(b: &dyn Backend) {
    let a = b.device_allocator(0).unwrap();
    let s = fresh_stream(b);
    let p = a.raw_alloc(2 << 20, s).unwrap();
    assert_eq!(b.current_allocated_memory(0), Ok(a.allocated_bytes()));
    assert!(a.allocated_bytes() >= 2 << 20);
    let driver = b.driver_allocated_memory(0).unwrap();
    assert!(
        driver >= a.reserved_bytes(),
        "the driver counts at least what accelrt holds: {driver} < {}",
        a.reserved_bytes()
    );
    let recommended = b.recommended_max_memory(0).unwrap();
    let total = b.device_properties(0).unwrap().total_memory;
    assert!(
        recommended > 0 && recommended <= total,
        "{recommended} of {total}"
    );
    assert_eq!(b.device_from_ptr(p), Ok(device(b, 0)));
    assert_eq!(b.device_from_ptr(p + 4096), Ok(device(b, 0)));
    a.raw_free(p).unwrap();
    let local = 0u8;
    let err = b.device_from_ptr(&local as *const u8 as usize).unwrap_err();
    assert!(
        matches!(err, Error::Alloc(AllocError::InvalidPointer { .. })),
        "{err}"
    );
}

/// isPinnedPtr and getPinnedMemoryAllocator.
pub fn pinned_memory(b: &dyn Backend) {
    let pinned = b.pinned_allocator().unwrap();
    assert!(Arc::ptr_eq(&pinned, &b.pinned_allocator().unwrap()));
    let p = pinned.allocate(1 << 16).unwrap();
    assert!(b.is_pinned_ptr(p));
    let a = b.device_allocator(0).unwrap();
    let d = a.raw_alloc(1 << 16, fresh_stream(b)).unwrap();
    assert!(!b.is_pinned_ptr(d), "device memory is not pinned memory");
    a.raw_free(d).unwrap();
    pinned.free(p).unwrap();
}
