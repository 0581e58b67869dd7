//! The fault backend through accelrt's public API: registered and found by name like the
//! built-in backends; each injected fault fails one call, naming it; failed allocations
//! drive the allocator's retry and out-of-memory paths; stream errors surface at the next
//! synchronize; delayed completion holds events, waits and pending frees.

use accelrt::DeviceError;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use accelrt::alloc::{AllocatorConfig, AllocatorEvent, CachingAllocator};
use accelrt::backend::host::HostDriver;
use accelrt::runtime::Runtime;
use accelrt::{Backend, Device, DeviceType, Error, EventId, Stream, StreamPriority};
use accelrt_fault::{Fault, FaultDriver, Faults, FAULTS_ENV, KIND};

/// A fault backend of its own over `devices` host devices, and its faults.
fn backend(devices: u32) -> (Runtime<FaultDriver<HostDriver>>, Arc<Faults>) {
    let faults = Arc::new(Faults::new());
    let driver = FaultDriver::new(
        HostDriver::with_devices(devices).unwrap(),
        Arc::clone(&faults),
    );
    (Runtime::with_driver(driver), faults)
}

#[test]
fn registered_once_and_found_like_the_builtin_backends() {
    let fault = accelrt_fault::register().unwrap();
    assert!(
        std::ptr::eq(fault, accelrt_fault::register().unwrap()),
        "idempotent"
    );
    let by_name = accelrt::registry::backend_by_name("fault").unwrap();
    assert!(std::ptr::addr_eq(by_name, fault));
    assert!(std::ptr::addr_eq(accelrt::backend(KIND), fault));
    assert_eq!(DeviceType::from_str("fault").unwrap(), KIND);
    assert!(accelrt::registry::backends()
        .iter()
        .any(|b| b.device_type() == KIND));
    assert!(fault.is_available(), "{:?}", fault.unavailable_reason());
    let name = fault.device_properties(0).unwrap().name;
    assert!(name.ends_with("(fault injection over host)"), "{name}");
    assert!(fault.show_config().contains(FAULTS_ENV));
    let stream = fault.default_stream(0).unwrap();
    assert_eq!(stream.device.kind, KIND);
}

/// A call of each fault kind, on a fresh backend's device 0 (`s`, `t`: two streams; `ev`: an
/// event recorded on `s`).
type Call = fn(&dyn Backend, Stream, Stream, EventId) -> Result<(), Error>;

#[test]
fn each_injected_fault_fails_one_call_and_names_it() {
    let cases: &[(Fault, Call)] = &[
        (Fault::StreamCreate, |b, _, _, _| {
            b.new_stream(0, StreamPriority::Normal).map(drop)
        }),
        (Fault::StreamSynchronize, |b, s, _, _| {
            b.stream_synchronize(s)
        }),
        (Fault::StreamQuery, |b, s, _, _| b.stream_query(s).map(drop)),
        (Fault::LaunchHost, |b, s, _, _| {
            b.launch_host(s, Arc::new(|| {}))
        }),
        (Fault::EventCreate, |b, _, _, _| {
            // Past the pool's free lists, so the driver is asked for an event.
            b.event_pool_empty_cache()?;
            let id = b.event_acquire(0, true)?;
            b.event_release(id)
        }),
        (Fault::EventRecord, |b, s, _, ev| b.event_record(ev, s)),
        (Fault::EventQuery, |b, _, _, ev| b.event_query(ev).map(drop)),
        (Fault::EventSynchronize, |b, _, _, ev| {
            b.event_synchronize(ev)
        }),
        (Fault::EventWait, |b, _, t, ev| b.event_wait(ev, t)),
    ];
    let (b, faults) = backend(1);
    let (s, t) = (
        b.new_stream(0, StreamPriority::Normal).unwrap(),
        b.new_stream(0, StreamPriority::Normal).unwrap(),
    );
    let ev = b.event_acquire(0, false).unwrap();
    b.event_record(ev, s).unwrap();
    for (fault, call) in cases {
        call(&b, s, t, ev).unwrap_or_else(|e| panic!("{fault} before injecting: {e}"));
        faults.fail_next(*fault, 1);
        let err = call(&b, s, t, ev).expect_err(fault.name());
        match &err {
            Error::Device(DeviceError::Driver { call, message, .. }) => {
                assert_eq!(*call, fault.name());
                assert!(message.contains("injected by accelrt-fault"), "{message}");
            }
            other => panic!("{fault}: {other:?}"),
        }
        assert_eq!((faults.pending(*fault), faults.injected(*fault)), (0, 1));
        call(&b, s, t, ev).unwrap_or_else(|e| panic!("{fault} after the fault: {e}"));
    }
    b.device_synchronize(0).unwrap();
}

fn plain_allocator(b: &dyn Backend) -> CachingAllocator {
    let config = AllocatorConfig {
        expandable_segments: false,
        ..AllocatorConfig::default()
    };
    let device = Device {
        kind: KIND,
        index: 0,
    };
    CachingAllocator::new(device, b.memory_provider(0).unwrap(), None, config).unwrap()
}

#[test]
fn failed_allocations_retry_then_report_an_out_of_memory() {
    let (b, faults) = backend(1);
    let stream = b.default_stream(0).unwrap();
    let a = plain_allocator(&b);
    let refused = Arc::new(AtomicU64::new(0));
    let r = Arc::clone(&refused);
    a.add_callback(Arc::new(move |_, _, ev| {
        if ev == AllocatorEvent::AllocationFailed {
            r.fetch_add(1, Ordering::SeqCst);
        }
    }));
    // One refusal: the allocator frees its cache, retries, and succeeds.
    faults.fail_next(Fault::Allocation, 1);
    let p = a.raw_alloc(1 << 20, stream).unwrap();
    let counters = a.stats().counters;
    assert_eq!((counters.num_alloc_retries, counters.num_ooms), (1, 0));
    assert_eq!(refused.load(Ordering::SeqCst), 1);
    // Refused on the retry too: an out-of-memory, and nothing changed.
    faults.fail_next(Fault::Allocation, 2);
    let err = a.raw_alloc(64 << 20, stream).unwrap_err();
    assert!(err.is_out_of_memory(), "{err}");
    assert_eq!(a.stats().counters.num_ooms, 1);
    assert_eq!(faults.injected(Fault::Allocation), 3);
    assert_eq!(
        a.requested_size(p),
        Ok(1 << 20),
        "live buffers are untouched"
    );
    // Then the device answers again.
    let q = a.raw_alloc(64 << 20, stream).unwrap();
    for ptr in [p, q] {
        a.raw_free(ptr).unwrap();
    }
    a.empty_cache().unwrap();

    // The backend's own allocator (expandable segments by default: pages are refused).
    let own = b.allocator(0).unwrap();
    faults.fail_next(Fault::Allocation, 1_000);
    let err = own.raw_alloc(8 << 20, stream).unwrap_err();
    assert!(err.is_out_of_memory(), "{err}");
    faults.clear();
    let ok = own.raw_alloc(8 << 20, stream).unwrap();
    own.raw_free(ok).unwrap();
}

#[test]
fn stream_errors_surface_at_the_next_synchronize_once() {
    let (b, faults) = backend(1);
    let (s, t) = (
        b.new_stream(0, StreamPriority::Normal).unwrap(),
        b.new_stream(0, StreamPriority::Normal).unwrap(),
    );
    faults.inject_stream_error(b.stream_native_handle(s).unwrap(), "illegal address");
    b.stream_synchronize(t).unwrap();
    let err = b.stream_synchronize(s).unwrap_err().to_string();
    assert!(err.contains("illegal address"), "{err}");
    b.stream_synchronize(s).unwrap();
    // A device synchronize reports the errors of every stream of the device.
    faults.inject_stream_error(b.stream_native_handle(t).unwrap(), "launch failed");
    let err = b.device_synchronize(0).unwrap_err().to_string();
    assert!(err.contains("launch failed"), "{err}");
    b.device_synchronize(0).unwrap();
}

#[test]
fn delayed_completion_holds_events_waits_and_pending_frees() {
    let (b, faults) = backend(1);
    let delay = Duration::from_millis(80);
    let (s, t) = (
        b.new_stream(0, StreamPriority::Normal).unwrap(),
        b.new_stream(0, StreamPriority::Normal).unwrap(),
    );
    faults.set_completion_delay(delay);
    let ev = b.event_acquire(0, true).unwrap();
    let recorded = Instant::now();
    let recorded_ms = accelrt::event::clock_ms();
    b.event_record(ev, s).unwrap();
    b.stream_synchronize(s).unwrap();
    assert_eq!(
        b.event_query(ev),
        Ok(false),
        "the stream passed, the event waits"
    );
    // A stream that waits for the event waits for the delay too.
    let ran_after = Arc::new(AtomicU64::new(0));
    let r = Arc::clone(&ran_after);
    b.event_wait(ev, t).unwrap();
    b.launch_host(
        t,
        Arc::new(move || r.store(recorded.elapsed().as_millis() as u64, Ordering::SeqCst)),
    )
    .unwrap();
    b.event_synchronize(ev).unwrap();
    assert!(
        recorded.elapsed() >= delay,
        "synchronize waited for the delay"
    );
    assert_eq!(b.event_query(ev), Ok(true));
    assert!(b.event_completion_time(ev).unwrap() >= recorded_ms + delay.as_millis() as f64);
    b.stream_synchronize(t).unwrap();
    assert!(
        ran_after.load(Ordering::SeqCst) >= delay.as_millis() as u64,
        "the waiting stream ran {} ms after the record",
        ran_after.load(Ordering::SeqCst)
    );
    b.event_release(ev).unwrap();

    // A free of memory used on another stream stays pending for the delay.
    let a = b.allocator(0).unwrap();
    let p = a.raw_alloc(1 << 20, s).unwrap();
    a.record_stream(p, t).unwrap();
    a.raw_free(p).unwrap();
    let active = || a.stats().all().active_bytes.current;
    let pending = active();
    b.stream_synchronize(t).unwrap();
    a.free_inactive_buffers().unwrap();
    assert_eq!(active(), pending, "still pending while the delay runs");
    std::thread::sleep(delay + Duration::from_millis(20));
    a.free_inactive_buffers().unwrap();
    assert!(active() < pending, "completed after the delay");
    faults.clear();
}
