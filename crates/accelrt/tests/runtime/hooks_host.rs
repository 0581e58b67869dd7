//! The backend hooks on the host backend: registry, devices, per-thread current device,
//! properties, configuration, unavailable backends and bad input.

use crate::common;

use accelrt::{AllocError, DeviceError};
use std::sync::Arc;

use accelrt::backend::host::{HostDriver, HOST_DEVICES_ENV};
use accelrt::backend::UnavailableBackend;
use accelrt::hooks::Backend;
use accelrt::profiler::ProfilerMode;
use accelrt::runtime::{DeviceGuard, Runtime};
use accelrt::{Device, DeviceType, Error, EventId, GraphId, MempoolId, Stream, StreamPriority};
use common::runtime;

type Call = fn(&dyn Backend) -> Result<(), Error>;

#[test]
fn registry_lists_the_builtin_backends_first() {
    let kinds: Vec<DeviceType> = accelrt::registry::backends()
        .iter()
        .map(|b| b.device_type())
        .collect();
    assert_eq!(kinds[..2], DeviceType::ALL);
    assert!(
        kinds[2..].iter().all(|k| !k.is_builtin()),
        "registered backends follow: {kinds:?}"
    );
    let host = accelrt::backend(DeviceType::Host);
    assert!(host.is_available());
    assert!(host.is_built());
    assert!(host.device_count() >= 1);
    assert_eq!(host.unavailable_reason(), None);
    host.init().unwrap();
    // The registry hands out one static per kind.
    assert!(std::ptr::addr_eq(host, accelrt::backend(DeviceType::Host)));
    assert_eq!(
        accelrt::backend(DeviceType::Cuda).is_built(),
        cfg!(feature = "cuda")
    );
}

/// Every hook that can fail, called with plausible arguments (device 0, stream 0, event 1,
/// graph 1), under the name an unavailable backend's error gives it.
const EVERY_CALL: &[(&str, Call)] = &[
    ("init", |b| b.init()),
    ("current_device", |b| b.current_device().map(drop)),
    ("set_device", |b| b.set_device(0)),
    ("exchange_device", |b| b.exchange_device(0).map(drop)),
    ("maybe_exchange_device", |b| {
        b.maybe_exchange_device(0).map(drop)
    }),
    ("device_synchronize", |b| b.device_synchronize(0)),
    ("device_properties", |b| b.device_properties(0).map(drop)),
    ("device_capability", |b| b.device_capability(0).map(drop)),
    ("runtime_version", |b| b.runtime_version().map(drop)),
    ("runtime_version_at_least", |b| {
        b.runtime_version_at_least(0, 1).map(drop)
    }),
    ("device_from_ptr", |b| b.device_from_ptr(0x1000).map(drop)),
    ("default_stream", |b| b.default_stream(0).map(drop)),
    ("current_stream", |b| b.current_stream(0).map(drop)),
    ("current_raw_stream", |b| b.current_raw_stream(0).map(drop)),
    ("set_current_stream", |b| {
        b.set_current_stream(stream_of(b, 0, 0))
    }),
    ("stream_from_pool", |b| {
        b.stream_from_pool(0, StreamPriority::High).map(drop)
    }),
    ("new_stream", |b| {
        b.new_stream(0, StreamPriority::Normal).map(drop)
    }),
    ("stream_native_handle", |b| {
        b.stream_native_handle(stream_of(b, 0, 0)).map(drop)
    }),
    ("wrap_external_stream", |b| {
        // SAFETY: only called on unavailable backends, which never use the handle.
        unsafe { b.wrap_external_stream(0, 0x1234) }.map(drop)
    }),
    ("stream_commit", |b| b.stream_commit(stream_of(b, 0, 0))),
    ("stream_synchronize", |b| {
        b.stream_synchronize(stream_of(b, 0, 0))
    }),
    ("stream_query", |b| {
        b.stream_query(stream_of(b, 0, 0)).map(drop)
    }),
    ("launch_host", |b| {
        b.launch_host(stream_of(b, 0, 0), Arc::new(|| {}))
    }),
    ("event_acquire", |b| b.event_acquire(0, false).map(drop)),
    ("event_release", |b| b.event_release(EventId(1))),
    ("event_record", |b| {
        b.event_record(EventId(1), stream_of(b, 0, 0))
    }),
    ("event_sync_record", |b| {
        b.event_sync_record(EventId(1), stream_of(b, 0, 0))
    }),
    ("event_wait", |b| {
        b.event_wait(EventId(1), stream_of(b, 0, 0))
    }),
    ("event_synchronize", |b| b.event_synchronize(EventId(1))),
    ("event_query", |b| b.event_query(EventId(1)).map(drop)),
    ("event_elapsed_time", |b| {
        b.event_elapsed_time(EventId(1), EventId(2)).map(drop)
    }),
    ("event_completion_time", |b| {
        b.event_completion_time(EventId(1)).map(drop)
    }),
    ("event_notify", |b| {
        b.event_notify(EventId(1), Box::new(|| {}))
    }),
    ("event_pool_empty_cache", |b| {
        b.event_pool_empty_cache().map(drop)
    }),
    ("pinned_allocator", |b| b.pinned_allocator().map(drop)),
    ("default_generator", |b| b.default_generator(0).map(drop)),
    ("new_generator", |b| b.new_generator(0).map(drop)),
    ("graph_create", |b| b.graph_create(0).map(drop)),
    ("graph_create_with", |b| {
        b.graph_create_with(0, true).map(drop)
    }),
    ("graph_capture_begin", |b| {
        b.graph_capture_begin(GraphId(1), stream_of(b, 0, 0), MempoolId::NONE)
    }),
    ("graph_capture_end", |b| b.graph_capture_end(GraphId(1))),
    ("graph_instantiate", |b| b.graph_instantiate(GraphId(1))),
    ("graph_is_instantiated", |b| {
        b.graph_is_instantiated(GraphId(1)).map(drop)
    }),
    ("graph_replay", |b| b.graph_replay(GraphId(1))),
    ("graph_reset", |b| b.graph_reset(GraphId(1))),
    ("graph_destroy", |b| b.graph_destroy(GraphId(1))),
    ("graph_pool", |b| b.graph_pool(GraphId(1)).map(drop)),
    ("graph_pool_handle", |b| b.graph_pool_handle(0).map(drop)),
    ("device_allocator", |b| b.device_allocator(0).map(drop)),
    ("memory_provider", |b| b.memory_provider(0).map(drop)),
    ("empty_cache", |b| b.empty_cache(0)),
    ("memory_stats", |b| b.memory_stats(0).map(drop)),
    ("reset_peak_memory_stats", |b| b.reset_peak_memory_stats(0)),
    ("set_memory_fraction", |b| b.set_memory_fraction(0, 0.5)),
    ("current_allocated_memory", |b| {
        b.current_allocated_memory(0).map(drop)
    }),
    ("driver_allocated_memory", |b| {
        b.driver_allocated_memory(0).map(drop)
    }),
    ("recommended_max_memory", |b| {
        b.recommended_max_memory(0).map(drop)
    }),
    ("alloc_scalar_with_value", |b| {
        b.alloc_scalar_with_value(stream_of(b, 0, 0), &[1])
            .map(drop)
    }),
    ("can_device_access_peer", |b| {
        b.can_device_access_peer(0, 0).map(drop)
    }),
    ("enable_peer_access", |b| b.enable_peer_access(0, 0)),
    ("is_peer_access_enabled", |b| {
        b.is_peer_access_enabled(0, 0).map(drop)
    }),
    ("memcpy_async", |b| {
        b.memcpy_async(0x1000, 0, 0x2000, 0, 16, stream_of(b, 0, 0))
    }),
    ("profiler_start_trace", |b| {
        b.profiler_start_trace(ProfilerMode::ALL, false)
    }),
    ("profiler_stop_trace", |b| b.profiler_stop_trace().map(drop)),
];

/// The calls that cannot fail, and what an unavailable backend answers.
fn assert_infallible_calls_say_unavailable(b: &dyn Backend) {
    assert!(!b.is_available());
    assert_eq!(b.device_count(), 0);
    assert!(!b.has_primary_context(0));
    assert!(!b.is_pinned_ptr(0x1000));
    let reason = b
        .unavailable_reason()
        .expect("an unavailable backend says why");
    assert!(b.show_config().contains(&reason), "{}", b.show_config());
}

/// Every fallible call of an unavailable backend: `NeedsBackend` naming the call, in
/// PyTorch's words ("Cannot execute init() without MPS backend.").
fn assert_every_call_names_itself(b: &dyn Backend) {
    let reason = b
        .unavailable_reason()
        .expect("an unavailable backend says why");
    let kind = b.device_type();
    for (name, call) in EVERY_CALL {
        let err = call(b).expect_err(name);
        assert_eq!(
            err,
            Error::Device(DeviceError::NeedsBackend {
                call: name,
                needs: kind,
                reason: reason.clone()
            }),
            "{name}"
        );
        assert_eq!(
            err.to_string(),
            format!("cannot execute {name}() without the {kind} backend: {reason}"),
            "{name}"
        );
    }
}

fn stream_of(b: &dyn Backend, device: u32, index: u32) -> Stream {
    Stream {
        device: Device {
            kind: b.device_type(),
            index: device,
        },
        index,
    }
}

#[test]
fn cuda_is_registered_but_unavailable_with_the_reason_on_every_call() {
    let cuda = accelrt::backend(DeviceType::Cuda);
    if cuda.is_available() {
        eprintln!("skipping: the cuda backend is available here (a GPU machine)");
        return;
    }
    // Built without the backend, or built with it on a machine without a usable driver.
    let reason = cuda
        .unavailable_reason()
        .expect("an unavailable backend says why");
    if !cfg!(feature = "cuda") {
        assert_eq!(
            reason,
            "accelrt was built without the cuda backend (feature `cuda`)"
        );
    }
    assert_infallible_calls_say_unavailable(cuda);
    assert_every_call_names_itself(cuda);
}

#[test]
fn a_runtime_whose_probe_fails_is_unavailable_and_every_call_says_so() {
    let rt: Runtime<HostDriver> = Runtime::with_probe(|| Err("no host today".to_string()));
    assert_eq!(rt.unavailable_reason().as_deref(), Some("no host today"));
    assert!(rt.is_built(), "built in, just unusable");
    assert_infallible_calls_say_unavailable(&rt);
    assert_every_call_names_itself(&rt);
    // The stand-in used for backends not compiled in answers the same way.
    let stand_in = UnavailableBackend::unavailable(DeviceType::Host, "why not");
    assert_infallible_calls_say_unavailable(&stand_in);
    assert_every_call_names_itself(&stand_in);
    assert!(!UnavailableBackend::not_compiled(DeviceType::Cuda).is_built());
    assert_eq!(
        stand_in.init().unwrap_err().to_string(),
        "cannot execute init() without the host backend: why not"
    );
}

#[test]
fn current_device_is_per_thread_and_per_runtime() {
    let a = runtime(3);
    let b = runtime(3);
    assert_eq!(a.current_device(), Ok(0));
    a.set_device(2).unwrap();
    assert_eq!(a.current_device(), Ok(2));
    assert_eq!(
        b.current_device(),
        Ok(0),
        "another runtime keeps its own current device"
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(a.current_device(), Ok(0), "a new thread starts on device 0");
            a.set_device(1).unwrap();
            assert_eq!(a.current_device(), Ok(1));
        });
    });
    assert_eq!(
        a.current_device(),
        Ok(2),
        "another thread's set_device does not leak"
    );
    assert_eq!(a.exchange_device(1), Ok(2));
    assert_eq!(a.current_device(), Ok(1));
}

#[test]
fn maybe_exchange_refuses_invalid_devices_and_creates_no_device_state() {
    let rt = runtime(2);
    // (device asked, returned, current afterwards), applied in order; `None`: refused.
    let cases = [
        (1, Some(0), 1),
        (7, None, 1),
        (0, Some(1), 0),
        (u32::MAX, None, 0),
        (1, Some(0), 1),
    ];
    for (ask, returned, after) in cases {
        match returned {
            Some(previous) => assert_eq!(
                rt.maybe_exchange_device(ask),
                Ok(previous),
                "maybe_exchange_device({ask})"
            ),
            None => assert_eq!(
                rt.maybe_exchange_device(ask),
                Err(Error::Device(DeviceError::InvalidDevice {
                    backend: DeviceType::Host,
                    index: ask,
                    count: 2
                })),
                "maybe_exchange_device({ask})"
            ),
        }
        assert_eq!(
            rt.current_device(),
            Ok(after),
            "after maybe_exchange_device({ask})"
        );
    }
    assert!(
        !rt.has_primary_context(0) && !rt.has_primary_context(1),
        "switching devices set none up"
    );
}

#[test]
fn invalid_device_indices_are_clear_errors_and_change_nothing() {
    let rt = runtime(2);
    rt.set_device(1).unwrap();
    type DeviceCall = fn(&dyn Backend, u32) -> Result<(), Error>;
    let calls: &[(&str, DeviceCall)] = &[
        ("set_device", |b, d| b.set_device(d)),
        ("exchange_device", |b, d| b.exchange_device(d).map(drop)),
        ("device_synchronize", |b, d| b.device_synchronize(d)),
        ("device_properties", |b, d| b.device_properties(d).map(drop)),
        ("device_capability", |b, d| b.device_capability(d).map(drop)),
        ("default_stream", |b, d| b.default_stream(d).map(drop)),
        ("current_stream", |b, d| b.current_stream(d).map(drop)),
        ("stream_from_pool", |b, d| {
            b.stream_from_pool(d, StreamPriority::Normal).map(drop)
        }),
        ("new_stream", |b, d| {
            b.new_stream(d, StreamPriority::High).map(drop)
        }),
        ("event_acquire", |b, d| b.event_acquire(d, true).map(drop)),
        ("default_generator", |b, d| b.default_generator(d).map(drop)),
        ("graph_create", |b, d| b.graph_create(d).map(drop)),
        ("graph_pool_handle", |b, d| b.graph_pool_handle(d).map(drop)),
        ("new_generator", |b, d| b.new_generator(d).map(drop)),
        ("current_raw_stream", |b, d| {
            b.current_raw_stream(d).map(drop)
        }),
        ("maybe_exchange_device", |b, d| {
            b.maybe_exchange_device(d).map(drop)
        }),
        ("device_allocator", |b, d| b.device_allocator(d).map(drop)),
        ("allocator", |b, d| b.allocator(d).map(drop)),
        ("memory_provider", |b, d| b.memory_provider(d).map(drop)),
        ("current_allocated_memory", |b, d| {
            b.current_allocated_memory(d).map(drop)
        }),
        ("driver_allocated_memory", |b, d| {
            b.driver_allocated_memory(d).map(drop)
        }),
        ("recommended_max_memory", |b, d| {
            b.recommended_max_memory(d).map(drop)
        }),
    ];
    for bad in [2, 3, u32::MAX] {
        for (name, call) in calls {
            let err = call(&rt, bad).expect_err(name);
            assert_eq!(
                err,
                Error::Device(DeviceError::InvalidDevice {
                    backend: DeviceType::Host,
                    index: bad,
                    count: 2
                }),
                "{name}({bad})"
            );
            assert!(
                err.to_string().contains("it has 2 device(s)"),
                "{name}: {err}"
            );
        }
    }
    assert_eq!(
        rt.current_device(),
        Ok(1),
        "failed calls left the current device alone"
    );
    assert!(!rt.has_primary_context(2));
    assert_eq!(
        rt.event_pool().unwrap().in_use_count(),
        0,
        "no event was handed out"
    );
}

#[test]
fn device_guard_sets_and_restores() {
    let rt = runtime(3);
    rt.set_device(1).unwrap();
    {
        let guard = DeviceGuard::new(&rt, 2).unwrap();
        assert_eq!(guard.previous(), 1);
        assert_eq!(rt.current_device(), Ok(2));
        {
            let _inner = DeviceGuard::new(&rt, 0).unwrap();
            assert_eq!(rt.current_device(), Ok(0));
        }
        assert_eq!(rt.current_device(), Ok(2));
        let err = DeviceGuard::new(&rt, 9).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Device(DeviceError::InvalidDevice { index: 9, .. })
            ),
            "{err}"
        );
        assert_eq!(rt.current_device(), Ok(2), "a failed guard changes nothing");
    }
    assert_eq!(rt.current_device(), Ok(1));
}

#[test]
fn host_device_properties_describe_the_machine() {
    let rt = runtime(2);
    let cores = std::thread::available_parallelism().unwrap().get() as u32;
    for d in 0..2 {
        let p = rt.device_properties(d).unwrap();
        assert!(!p.name.is_empty());
        assert!(p.total_memory > 0);
        assert!(p.recommended_max_memory > 0 && p.recommended_max_memory <= p.total_memory);
        assert_eq!(p.multiprocessor_count, cores);
        assert_eq!(p.max_threads_per_group, 1, "a host task runs on one thread");
        assert_eq!(p.capability, (0, 0));
        assert!(p.host_visible_memory);
        assert_eq!(rt.device_capability(d), Ok((0, 0)));
    }
    let version = rt.runtime_version().unwrap();
    assert_eq!(rt.runtime_version_at_least(version.0, version.1), Ok(true));
    assert_eq!(rt.runtime_version_at_least(version.0 + 1, 0), Ok(false));
}

#[test]
fn primary_context_is_created_on_first_use() {
    let rt = runtime(2);
    assert!(!rt.has_primary_context(0));
    rt.init().unwrap();
    assert!(
        !rt.has_primary_context(0),
        "init alone creates no device state"
    );
    rt.default_stream(1).unwrap();
    assert!(rt.has_primary_context(1));
    assert!(!rt.has_primary_context(0));
}

#[test]
fn show_config_lists_version_devices_env_and_allocator() {
    let rt = runtime(2);
    let text = rt.show_config();
    for needle in [
        format!("accelrt {}", env!("CARGO_PKG_VERSION")),
        "backend: host (available)".into(),
        "devices: 2".into(),
        "host:1:".into(),
        HOST_DEVICES_ENV.into(),
        "ACCELRT_ALLOC_CONF".into(),
        "allocator: ".into(),
    ] {
        assert!(text.contains(&needle), "{needle:?} missing from:\n{text}");
    }
}

#[test]
fn generators_are_per_device_and_shared() {
    let rt = runtime(2);
    let g0 = rt.default_generator(0).unwrap();
    let g1 = rt.default_generator(1).unwrap();
    assert!(Arc::ptr_eq(&g0, &rt.default_generator(0).unwrap()));
    assert!(!Arc::ptr_eq(&g0, &g1));
    g0.set_seed(5);
    assert_eq!(rt.default_generator(0).unwrap().seed(), 5);
    assert_ne!(g1.seed(), 5);
}

#[test]
fn allocators_are_per_device_and_created_once() {
    let rt = runtime(2);
    let a0 = rt.allocator(0).unwrap();
    assert!(Arc::ptr_eq(&a0, &rt.allocator(0).unwrap()));
    let a1 = rt.allocator(1).unwrap();
    assert!(!Arc::ptr_eq(&a0, &a1));
    // The hooks hand out the same allocator through its interface, and the concrete one
    // comes back from a `dyn Backend` too.
    let b: &dyn Backend = &rt;
    let interface = b.device_allocator(0).unwrap();
    assert!(std::ptr::addr_eq(Arc::as_ptr(&interface), Arc::as_ptr(&a0)));
    assert!(Arc::ptr_eq(&b.allocator(0).unwrap(), &a0));
    assert_eq!(
        a0.device(),
        Device {
            kind: DeviceType::Host,
            index: 0
        }
    );
    assert_eq!(
        a1.device(),
        Device {
            kind: DeviceType::Host,
            index: 1
        }
    );
    let s = rt.default_stream(1).unwrap();
    let ptr = a1.raw_alloc(4096, s).unwrap();
    assert_eq!(rt.memory_stats(1).unwrap(), a1.stats());
    a1.raw_free(ptr).unwrap();
    rt.empty_cache(1).unwrap();
}

#[test]
fn pinned_pointers_are_recognised() {
    let rt = runtime(1);
    assert!(!rt.is_pinned_ptr(0x1000), "no pinned allocator yet");
    let pinned = rt.pinned_allocator().unwrap();
    assert!(Arc::ptr_eq(&pinned, &rt.pinned_allocator().unwrap()));
    let stream = rt.default_stream(0).unwrap();
    let ptr = pinned.allocate(1 << 16).unwrap();
    assert!(rt.is_pinned_ptr(ptr));
    let device_ptr = rt.allocator(0).unwrap().raw_alloc(1 << 16, stream).unwrap();
    assert!(
        !rt.is_pinned_ptr(device_ptr),
        "device memory is not pinned memory"
    );
    pinned.free(ptr).unwrap();
    rt.allocator(0).unwrap().raw_free(device_ptr).unwrap();
}

#[test]
fn generators_new_ones_are_independent_of_the_default() {
    let rt = runtime(2);
    let default = rt.default_generator(1).unwrap();
    let a = rt.new_generator(1).unwrap();
    let b = rt.new_generator(1).unwrap();
    assert!(!Arc::ptr_eq(&a, &b) && !Arc::ptr_eq(&a, &default));
    assert_eq!(
        a.seed(),
        default.seed(),
        "new generators start from the default seed"
    );
    // Drawing from one moves none of the others.
    let default_offset = default.offset();
    a.set_seed(11);
    b.set_seed(11);
    let draws: Vec<u32> = (0..4).map(|_| a.next_u32()).collect();
    assert_eq!(default.offset(), default_offset);
    assert_eq!(b.offset(), 0);
    assert_eq!(
        (0..4).map(|_| b.next_u32()).collect::<Vec<_>>(),
        draws,
        "same seed, same numbers"
    );
}

#[test]
fn memory_figures_and_pointer_devices() {
    let rt = runtime(2);
    let s = rt.default_stream(1).unwrap();
    let a = rt.allocator(1).unwrap();
    let before = rt.current_allocated_memory(1).unwrap();
    let ptr = a.raw_alloc(1 << 20, s).unwrap();
    assert_eq!(rt.current_allocated_memory(1), Ok(before + (1 << 20)));
    assert_eq!(rt.current_allocated_memory(1), Ok(a.allocated_bytes()));
    // The host's driver figures are its memory provider's.
    let provider = rt.memory_provider(1).unwrap();
    assert_eq!(
        rt.driver_allocated_memory(1),
        Ok(provider.driver_allocated())
    );
    assert!(provider.driver_allocated() >= 1 << 20);
    assert_eq!(rt.recommended_max_memory(1), Ok(provider.recommended_max()));
    assert_eq!(
        rt.device_properties(1).unwrap().recommended_max_memory,
        provider.recommended_max()
    );
    // Pointers: the device whose allocator holds them (live or cached), else an error.
    let host1 = Device {
        kind: DeviceType::Host,
        index: 1,
    };
    assert_eq!(rt.device_from_ptr(ptr), Ok(host1));
    assert_eq!(
        rt.device_from_ptr(ptr + 4096),
        Ok(host1),
        "inside the block"
    );
    a.raw_free(ptr).unwrap();
    assert_eq!(
        rt.device_from_ptr(ptr),
        Ok(host1),
        "cached memory is still the device's"
    );
    let on_the_stack = 0u64;
    let err = rt
        .device_from_ptr(&on_the_stack as *const u64 as usize)
        .unwrap_err();
    assert!(
        matches!(err, Error::Alloc(AllocError::InvalidPointer { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("device_from_ptr"), "{err}");
    // The current stream's native handle.
    let pooled = rt.stream_from_pool(1, StreamPriority::Normal).unwrap();
    rt.set_current_stream(pooled).unwrap();
    assert_eq!(rt.current_raw_stream(1), rt.stream_native_handle(pooled));
    assert_eq!(
        rt.current_raw_stream(0),
        rt.stream_native_handle(rt.default_stream(0).unwrap())
    );
}
