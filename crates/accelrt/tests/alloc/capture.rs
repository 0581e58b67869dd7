//! While a graph capture routes allocations to a private pool, the allocator must not wait
//! for the device or record, query or wait on events: on CUDA any of these from any thread
//! invalidates a capture in the default (global) mode, and every later call on the stream
//! fails with "operation not permitted when stream is capturing". PyTorch's own tests
//! (`test_graph_capture_oom` and every graph test after it) found accelrt doing so on the
//! out-of-memory path. Here an event source fails the test for any such call while the test
//! says a capture is underway.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use accelrt::alloc::{AllocError, AllocatorConfig, CachingAllocator, StreamEvents, StreamFilter};
use accelrt::backend::host::HostMemory;
use accelrt::{MempoolId, Stream};

use crate::common::{host_stream as stream, HOST0 as DEV};

/// Events that complete at once, and a list of every call made while `capturing` is set.
#[derive(Default)]
struct CaptureWatch {
    capturing: AtomicBool,
    next: AtomicU64,
    records: AtomicU64,
    forbidden: Mutex<Vec<&'static str>>,
}

impl CaptureWatch {
    fn check(&self, call: &'static str) {
        if self.capturing.load(SeqCst) {
            self.forbidden.lock().unwrap().push(call);
        }
    }
}

impl StreamEvents for CaptureWatch {
    fn record(&self, _stream: Stream) -> Result<u64, AllocError> {
        self.check("record");
        self.records.fetch_add(1, SeqCst);
        Ok(self.next.fetch_add(1, SeqCst))
    }
    fn query(&self, _ticket: u64) -> Result<bool, AllocError> {
        self.check("query");
        Ok(true)
    }
    fn synchronize(&self, _ticket: u64) -> Result<(), AllocError> {
        self.check("synchronize");
        Ok(())
    }
    fn wait(&self, _stream: Stream, _ticket: u64) -> Result<(), AllocError> {
        self.check("wait");
        Ok(())
    }
    fn release(&self, _ticket: u64) {}
    fn synchronize_device(&self, _device: u32) -> Result<(), AllocError> {
        self.check("synchronize_device");
        Ok(())
    }
}

fn allocator(watch: &Arc<CaptureWatch>, config: AllocatorConfig) -> CachingAllocator {
    let events: Arc<dyn StreamEvents> = watch.clone();
    CachingAllocator::new(
        DEV,
        Arc::new(HostMemory::new(256 << 20)),
        Some(events),
        config,
    )
    .unwrap()
}

fn capture_makes_no_device_call(config: AllocatorConfig) {
    let watch = Arc::new(CaptureWatch::default());
    let a = allocator(&watch, config);
    // Before the capture: a block used on a second stream, and cached memory to give back.
    let shared = a.raw_alloc(1 << 20, stream(0)).unwrap();
    a.record_stream(shared, stream(1)).unwrap();
    let cached = a.raw_alloc(8 << 20, stream(0)).unwrap();
    a.raw_free(cached).unwrap();

    let pool = MempoolId(7, 1);
    a.begin_allocate_to_pool(pool, StreamFilter::Only(stream(0)))
        .unwrap();
    watch.capturing.store(true, SeqCst);
    let inside = a.raw_alloc(3 << 20, stream(0)).unwrap();
    // Out of memory during the capture: an error, without giving cached memory back first.
    let err = a.raw_alloc(1 << 30, stream(0)).unwrap_err();
    assert!(
        matches!(err, AllocError::OutOfMemory(_)),
        "an out-of-memory error, got {err}"
    );
    // A block used on another stream freed during the capture: its event waits.
    a.raw_free(shared).unwrap();
    a.raw_free(inside).unwrap();
    a.empty_cache().unwrap();
    watch.capturing.store(false, SeqCst);
    a.end_allocate_to_pool(pool).unwrap();
    assert_eq!(
        *watch.forbidden.lock().unwrap(),
        Vec::<&str>::new(),
        "device calls during the capture"
    );

    // After the capture the deferred event is recorded and the block comes back.
    let records = watch.records.load(SeqCst);
    a.release_pool(pool).unwrap();
    let again = a.raw_alloc(1 << 20, stream(0)).unwrap();
    assert!(
        watch.records.load(SeqCst) > records,
        "the deferred free's event was recorded after the capture"
    );
    a.raw_free(again).unwrap();
    a.empty_cache().unwrap();
    a.check_invariants().unwrap();
}

#[test]
fn expandable_segments_make_no_device_call_during_a_capture() {
    capture_makes_no_device_call(AllocatorConfig {
        debug_checks: true,
        ..AllocatorConfig::default()
    });
}

#[test]
fn plain_segments_make_no_device_call_during_a_capture() {
    capture_makes_no_device_call(AllocatorConfig {
        expandable_segments: false,
        debug_checks: true,
        ..AllocatorConfig::default()
    });
}

/// PyTorch accepts a memory fraction of 0 (nothing may be reserved) and reads it back as 0
/// (`test_allocator_memory_fraction_setting`); accelrt refused it and answered 1.0.
#[test]
fn a_memory_fraction_of_zero_is_kept_and_allows_nothing() {
    let config = AllocatorConfig::parse("per_process_memory_fraction:0.0").unwrap();
    let watch = Arc::new(CaptureWatch::default());
    let a = allocator(&watch, config);
    assert_eq!(a.memory_fraction(), Some(0.0));
    let err = a.raw_alloc(512, stream(0)).unwrap_err();
    assert!(matches!(err, AllocError::OutOfMemory(_)), "{err}");
    a.set_memory_fraction(1.0).unwrap();
    let p = a.raw_alloc(512, stream(0)).unwrap();
    a.raw_free(p).unwrap();
    a.set_memory_fraction(0.0).unwrap();
    assert_eq!(a.memory_fraction(), Some(0.0));
    assert!(a.set_memory_fraction(-0.5).is_err());
}
