//! Checks of identity, devices, streams, generators and the profiler.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use accelrt::hooks::Backend;
use accelrt::profiler::ProfilerMode;
use accelrt::runtime::{DeviceGuard, POOL_STREAMS_PER_PRIORITY};
use accelrt::{Device, DeviceError, DeviceType, Error, Stream, StreamPriority};

use crate::{device, fresh_stream, sleep_task, Gate, Log, PATIENCE};

/// isBuilt, isAvailable, init, deviceCount, getDeviceProperties, getDeviceCapability,
/// showConfig, isOnMacOSorNewer; invalid indices are errors naming the count.
pub fn identity_and_devices(b: &dyn Backend) {
    let kind = b.device_type();
    assert!(b.is_built(), "{kind}: a usable backend is built");
    assert!(b.is_available(), "{kind}: {:?}", b.unavailable_reason());
    assert_eq!(b.unavailable_reason(), None);
    b.init().expect("init");
    b.init().expect("init is idempotent");
    let n = b.device_count();
    assert!(n >= 1, "{kind} has devices");
    assert_eq!(
        accelrt::registry::backend_by_name(kind.name())
            .map(|r| r.device_type())
            .ok(),
        Some(kind),
        "the registry finds {kind} by its name"
    );
    for d in 0..n {
        let p = b.device_properties(d).expect("device_properties");
        assert!(!p.name.is_empty(), "{kind}:{d} has a name");
        assert!(p.total_memory > 0);
        assert!(
            p.recommended_max_memory > 0 && p.recommended_max_memory <= p.total_memory,
            "{kind}:{d}: recommended {} of {}",
            p.recommended_max_memory,
            p.total_memory
        );
        assert!(p.multiprocessor_count >= 1 && p.max_threads_per_group >= 1);
        assert_eq!(b.device_capability(d), Ok(p.capability));
    }
    let (major, minor) = b.runtime_version().expect("runtime_version");
    assert_eq!(b.runtime_version_at_least(major, minor), Ok(true));
    assert_eq!(b.runtime_version_at_least(major + 1, 0), Ok(false));
    let config = b.show_config();
    for needle in [
        format!("backend: {kind} (available)"),
        format!("devices: {n}"),
        "ACCELRT_ALLOC_CONF".to_string(),
    ] {
        assert!(
            config.contains(&needle),
            "{needle:?} missing from:\n{config}"
        );
    }
    type DeviceCall = fn(&dyn Backend, u32) -> Result<(), Error>;
    let calls: &[(&str, DeviceCall)] = &[
        ("device_properties", |b, d| b.device_properties(d).map(drop)),
        ("set_device", |b, d| b.set_device(d)),
        ("maybe_exchange_device", |b, d| {
            b.maybe_exchange_device(d).map(drop)
        }),
        ("device_synchronize", |b, d| b.device_synchronize(d)),
        ("default_stream", |b, d| b.default_stream(d).map(drop)),
        ("event_acquire", |b, d| b.event_acquire(d, false).map(drop)),
        ("graph_create", |b, d| b.graph_create(d).map(drop)),
        ("graph_pool_handle", |b, d| b.graph_pool_handle(d).map(drop)),
        ("new_generator", |b, d| b.new_generator(d).map(drop)),
        ("device_allocator", |b, d| b.device_allocator(d).map(drop)),
        ("recommended_max_memory", |b, d| {
            b.recommended_max_memory(d).map(drop)
        }),
    ];
    for (name, call) in calls {
        assert_eq!(
            call(b, n),
            Err(Error::Device(DeviceError::InvalidDevice {
                backend: kind,
                index: n,
                count: n
            })),
            "{name}({n})"
        );
    }
    assert!(
        !b.has_primary_context(n),
        "an invalid device has no context"
    );
}

/// setCurrentDevice, getCurrentDevice, exchangeDevice, maybeExchangeDevice: per thread;
/// invalid indices are errors that change nothing.
pub fn current_device(b: &dyn Backend) {
    let n = b.device_count();
    let last = n - 1;
    b.set_device(0).expect("set_device(0)");
    assert_eq!(b.current_device(), Ok(0));
    assert_eq!(b.exchange_device(last), Ok(0));
    assert_eq!(b.maybe_exchange_device(0), Ok(last));
    assert!(b.maybe_exchange_device(n).is_err());
    assert!(b.exchange_device(n).is_err());
    assert_eq!(b.current_device(), Ok(0), "failed calls changed nothing");
    {
        let guard = DeviceGuard::new(b, last).expect("guard");
        assert_eq!(guard.previous(), 0);
        assert_eq!(b.current_device(), Ok(last));
    }
    assert_eq!(b.current_device(), Ok(0), "the guard restores");
    b.set_device(last).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(b.current_device(), Ok(0), "a new thread starts on 0"));
    });
    assert_eq!(b.current_device(), Ok(last));
    b.set_device(0).unwrap();
}

// ---- streams ------------------------------------------------------------------------------

/// getDefaultStream, getCurrentStream, setCurrentStream, getCurrentRawStream, the stream
/// pool, commitStream, synchronize and query; host tasks run in launch order.
pub fn streams(b: &dyn Backend) {
    let default = b.default_stream(0).expect("default_stream");
    assert!(default.is_default() && default.device == device(b, 0));
    let fresh = fresh_stream(b);
    assert_ne!(fresh, default);
    assert_ne!(
        b.stream_native_handle(fresh),
        b.stream_native_handle(default),
        "distinct streams have distinct handles"
    );
    // The current stream is per thread, the default one until set.
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(b.current_stream(0), Ok(default));
            b.set_current_stream(fresh).unwrap();
            assert_eq!(b.current_stream(0), Ok(fresh));
            assert_eq!(b.current_raw_stream(0), b.stream_native_handle(fresh));
        });
        s.spawn(|| assert_eq!(b.current_stream(0), Ok(default)));
    });
    // The pool hands out a fixed set per priority, round robin.
    for priority in [StreamPriority::Normal, StreamPriority::High] {
        let drawn: Vec<Stream> = (0..2 * POOL_STREAMS_PER_PRIORITY)
            .map(|_| b.stream_from_pool(0, priority).unwrap())
            .collect();
        let distinct: HashSet<Stream> = drawn.iter().copied().collect();
        assert_eq!(distinct.len(), POOL_STREAMS_PER_PRIORITY, "{priority:?}");
        assert!(!distinct.contains(&default));
    }
    // Work runs in launch order, after launch returns.
    let (log, gate) = (Log::default(), Gate::default());
    b.launch_host(fresh, gate.task()).unwrap();
    for step in ["a", "b", "c"] {
        b.launch_host(fresh, log.task(step)).unwrap();
    }
    b.stream_commit(fresh).unwrap();
    assert_eq!(b.stream_query(fresh), Ok(false), "held by the gate");
    assert!(log.entries().is_empty());
    gate.open();
    b.stream_synchronize(fresh).unwrap();
    assert_eq!(b.stream_query(fresh), Ok(true));
    assert_eq!(log.entries(), ["a", "b", "c"]);
    // Handles of another backend or of streams that do not exist are refused.
    let kind = b.device_type();
    let foreign_kind = if kind == DeviceType::Host {
        DeviceType::Cuda
    } else {
        DeviceType::Host
    };
    let foreign = Stream {
        device: Device {
            kind: foreign_kind,
            index: 0,
        },
        index: 0,
    };
    let unknown = Stream {
        index: 1_000_000,
        ..default
    };
    for bad in [foreign, unknown] {
        let err = b.stream_synchronize(bad).unwrap_err();
        assert!(
            matches!(err, Error::Device(DeviceError::InvalidStream { .. })),
            "{bad}: {err}"
        );
    }
}

/// getDefaultGenerator (one per device, shared), getNewGenerator (independent).
pub fn generators(b: &dyn Backend) {
    let default = b.default_generator(0).unwrap();
    assert!(Arc::ptr_eq(&default, &b.default_generator(0).unwrap()));
    let (x, y) = (b.new_generator(0).unwrap(), b.new_generator(0).unwrap());
    assert!(!Arc::ptr_eq(&x, &y) && !Arc::ptr_eq(&x, &default));
    x.set_seed(42);
    y.set_seed(42);
    let offset = default.offset();
    let draws: Vec<u32> = (0..8).map(|_| x.next_u32()).collect();
    assert_eq!((0..8).map(|_| y.next_u32()).collect::<Vec<_>>(), draws);
    assert_eq!(
        default.offset(),
        offset,
        "the default generator did not move"
    );
}

/// profilerStartTrace / profilerStopTrace.
pub fn profiler(b: &dyn Backend) {
    let s = fresh_stream(b);
    assert!(
        b.profiler_stop_trace().is_err(),
        "no profile is being recorded"
    );
    b.profiler_start_trace(ProfilerMode::ALL, true).unwrap();
    assert!(
        b.profiler_start_trace(ProfilerMode::ALL, false).is_err(),
        "one at a time"
    );
    let ev = b.event_acquire(0, false).unwrap();
    b.launch_host(s, sleep_task(1)).unwrap();
    b.event_record(ev, s).unwrap();
    b.event_synchronize(ev).unwrap();
    let a = b.device_allocator(0).unwrap();
    let p = a.raw_alloc(1 << 20, s).unwrap();
    a.raw_free(p).unwrap();
    let started = Instant::now();
    let trace = b.profiler_stop_trace().unwrap();
    assert!(started.elapsed() < PATIENCE);
    b.event_release(ev).unwrap();
    assert_eq!(trace.device_type, b.device_type());
    let names: HashSet<&str> = trace.events.iter().map(|e| e.name.as_str()).collect();
    for name in ["event_record", "event_synchronize", "host task"] {
        assert!(names.contains(name), "{name} missing: {names:?}");
    }
    assert!(
        trace.events.iter().any(|e| e.cat == "alloc"),
        "allocations are in the profile: {names:?}"
    );
    let json = trace.to_chrome_json();
    assert!(json["traceEvents"]
        .as_array()
        .is_some_and(|e| !e.is_empty()));
}
