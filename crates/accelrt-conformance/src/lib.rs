//! The conformance suite every accelrt backend runs: the calls of PyTorch's accelerator,
//! MPS and MTIA hooks, the MPS allocator interface and the MPS event pool, as accelrt's
//! [`Backend`] answers them, through the public API only.
//!
//! A backend's test file runs the whole suite, one `#[test]` per check:
//!
//! ```ignore
//! accelrt_conformance::conformance_tests!(Some(accelrt_fault::register().unwrap() as &dyn accelrt::Backend));
//! ```
//!
//! (`None` skips every check with a note: a GPU backend on a machine without a GPU.) The
//! host backend runs it in `accelrt/tests/conformance_host.rs`, the CUDA backend in
//! `accelrt/tests/cuda_conformance.rs` (skipped without a GPU), the out-of-tree `fault`
//! backend in `accelrt-fault/tests/conformance.rs`.
//!
//! What a check assumes of a backend: at least one device; streams run host tasks in order
//! ([`Backend::launch_host`]); a host task may block its stream (the checks hold streams with
//! gates, at most one at a time); graphs capture host tasks on streams from `new_stream`.
//! Checks of one process run one at a time ([`run_check`] serializes them): they share the
//! backend's device allocators and change limits for a moment.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use accelrt::alloc::{AllocatorEvent, HistoryConfig, StreamFilter, TraceAction};
use accelrt::hooks::{Backend, HostTask};
use accelrt::profiler::ProfilerMode;
use accelrt::runtime::{DeviceGuard, POOL_STREAMS_PER_PRIORITY};
use accelrt::{
    AllocError, Device, DeviceError, DeviceType, Error, EventId, GraphId, MempoolId, Stream,
    StreamPriority,
};

/// Longest a check waits for something that should happen at once; only reached on a bug.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A check: panics (with a message saying what differed) when the backend does not conform.
pub type Check = fn(&dyn Backend);

/// Every check, by name, in the order [`run_all`] runs them.
pub const CHECKS: &[(&str, Check)] = &[
    ("identity_and_devices", identity_and_devices),
    ("current_device", current_device),
    ("streams", streams),
    ("events", events),
    ("event_timing", event_timing),
    ("event_pool", event_pool),
    ("generators", generators),
    ("graphs", graphs),
    ("graph_fork_join", graph_fork_join),
    ("allocator_basics", allocator_basics),
    ("allocator_cross_stream", allocator_cross_stream),
    ("allocator_limits", allocator_limits),
    ("allocator_callbacks", allocator_callbacks),
    ("allocator_history", allocator_history),
    ("memory_queries", memory_queries),
    ("pinned_memory", pinned_memory),
    ("profiler", profiler),
];

/// One `#[test]` per check of the suite, in a module `conformance`, on the backend the
/// expression gives (`Option<&dyn Backend>`; `None` skips with a note).
#[macro_export]
macro_rules! conformance_tests {
    ($backend:expr) => {
        $crate::conformance_tests!(@each $backend;
            identity_and_devices, current_device, streams, events, event_timing, event_pool,
            generators, graphs, graph_fork_join, allocator_basics, allocator_cross_stream,
            allocator_limits, allocator_callbacks, allocator_history, memory_queries,
            pinned_memory, profiler);
    };
    (@each $backend:expr; $($check:ident),* $(,)?) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $check() {
                    $crate::run_check(stringify!($check), $crate::$check, $backend);
                }
            )*
        }
    };
}

/// Run one check on `backend`, after the checks running in other threads of the process
/// (they share its allocators); `None` skips with a note.
pub fn run_check(name: &str, check: Check, backend: Option<&dyn Backend>) {
    let _serial = serial();
    match backend {
        Some(b) => check(b),
        None => eprintln!("skipping conformance check {name}: the backend is not usable here"),
    }
}

/// Every check, in order (stops at the first that fails).
pub fn run_all(backend: &dyn Backend) {
    for (name, check) in CHECKS {
        run_check(name, *check, Some(backend));
    }
}

/// Checks of one process run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

// ---- helpers ----------------------------------------------------------------------------------

/// A gate host tasks wait on, to hold a stream at a known point.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    /// A task that blocks its stream until [`Gate::open`] (or [`PATIENCE`] passes).
    fn task(&self) -> HostTask {
        let gate = self.clone();
        Arc::new(move || {
            let (lock, cv) = &*gate.0;
            let open = lock.lock().unwrap_or_else(|p| p.into_inner());
            let _unused = cv.wait_timeout_while(open, PATIENCE, |open| !*open);
        })
    }

    fn open(&self) {
        let (lock, cv) = &*self.0;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }
}

/// A log tasks append to, to see the order work ran in.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn task(&self, entry: &str) -> HostTask {
        let (log, entry) = (self.clone(), entry.to_string());
        Arc::new(move || log.0.lock().unwrap().push(entry.clone()))
    }

    fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// A stream of its own on device 0.
fn fresh_stream(b: &dyn Backend) -> Stream {
    b.new_stream(0, StreamPriority::Normal)
        .expect("new_stream(0)")
}

/// Whether `f` returns within a second (run on another thread).
fn returns_promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(1)).ok()
}

fn sleep_task(ms: u64) -> HostTask {
    Arc::new(move || std::thread::sleep(Duration::from_millis(ms)))
}

fn device(b: &dyn Backend, index: u32) -> Device {
    Device {
        kind: b.device_type(),
        index,
    }
}

// ---- identity, devices ---------------------------------------------------------------------

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
        ("allocator", |b, d| b.allocator(d).map(drop)),
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

// ---- events --------------------------------------------------------------------------------

/// acquireEvent, recordEvent, queryEvent, synchronizeEvent, waitForEvent, releaseEvent,
/// sync-record, notify; ids unique and never reused.
pub fn events(b: &dyn Backend) {
    let (s1, s2) = (fresh_stream(b), fresh_stream(b));
    let id = b.event_acquire(0, false).unwrap();
    assert_eq!(b.event_query(id), Ok(true), "never recorded: complete");
    b.event_synchronize(id).unwrap();

    // Recorded behind a gate: incomplete until it opens; s2 waits for it on the device.
    let (gate, log) = (Gate::default(), Log::default());
    b.launch_host(s1, gate.task()).unwrap();
    b.launch_host(s1, log.task("s1")).unwrap();
    b.event_record(id, s1).unwrap();
    b.event_wait(id, s2).unwrap();
    b.launch_host(s2, log.task("s2 after the wait")).unwrap();
    let (tx, notified) = mpsc::channel();
    b.event_notify(id, Box::new(move || tx.send(()).unwrap()))
        .unwrap();
    assert_eq!(b.event_query(id), Ok(false));
    assert!(
        notified.recv_timeout(Duration::from_millis(50)).is_err(),
        "notify waits for the event"
    );
    gate.open();
    b.event_synchronize(id).unwrap();
    assert_eq!(b.event_query(id), Ok(true));
    notified
        .recv_timeout(PATIENCE)
        .expect("the callback runs once the event completes");
    b.stream_synchronize(s2).unwrap();
    assert_eq!(log.entries(), ["s1", "s2 after the wait"]);
    // A notify on a completed event runs at once (or soon, on the backend's thread).
    let (tx, now) = mpsc::channel();
    b.event_notify(id, Box::new(move || tx.send(()).unwrap()))
        .unwrap();
    now.recv_timeout(PATIENCE)
        .expect("notify on a completed event");

    // Sync-record: completes without further work being queued.
    b.event_sync_record(id, s2).unwrap();
    b.event_synchronize(id).unwrap();
    assert_eq!(b.event_query(id), Ok(true));

    // Ids are unique, never reused; a released id is unknown.
    b.event_release(id).unwrap();
    assert_eq!(
        b.event_release(id),
        Err(Error::Device(DeviceError::UnknownEvent { id: id.0 }))
    );
    assert_eq!(
        b.event_query(id),
        Err(Error::Device(DeviceError::UnknownEvent { id: id.0 })),
        "a released id is unknown"
    );
    let again = b.event_acquire(0, false).unwrap();
    assert_ne!(again, id);
    b.event_release(again).unwrap();
    assert!(matches!(
        b.event_record(EventId(u64::MAX), s1),
        Err(Error::Device(DeviceError::UnknownEvent { .. }))
    ));
    if b.device_count() > 1 {
        let other = b.event_acquire(1, false).unwrap();
        let err = b.event_record(other, s1).unwrap_err();
        assert!(err.to_string().contains("another device"), "{err}");
        b.event_release(other).unwrap();
    }
}

/// elapsedTimeOfEvents and the events' completion times (MPSEvent's getCompletionTime).
pub fn event_timing(b: &dyn Backend) {
    let s = fresh_stream(b);
    let (start, end, plain) = (
        b.event_acquire(0, true).unwrap(),
        b.event_acquire(0, true).unwrap(),
        b.event_acquire(0, false).unwrap(),
    );
    let before = accelrt::event::clock_ms();
    b.event_record(start, s).unwrap();
    b.launch_host(s, sleep_task(25)).unwrap();
    b.event_record(end, s).unwrap();
    b.event_record(plain, s).unwrap();
    b.event_synchronize(end).unwrap();
    let after = accelrt::event::clock_ms();
    let elapsed = b.event_elapsed_time(start, end).unwrap();
    assert!(
        (20.0..2000.0).contains(&elapsed),
        "a 25 ms task measured {elapsed} ms"
    );
    let (t0, t1) = (
        b.event_completion_time(start).unwrap(),
        b.event_completion_time(end).unwrap(),
    );
    // Completion times are on accelrt's clock; devices read against it to within ~1 ms.
    let slack = 1.0;
    assert!(
        before - slack <= t0 && t0 <= t1 && t1 <= after + slack,
        "{before} <= {t0} <= {t1} <= {after}"
    );
    assert!(
        (t1 - t0 - elapsed).abs() < slack,
        "completion times {t0}, {t1} vs elapsed {elapsed}"
    );
    // Timing needs timing events.
    for err in [
        b.event_elapsed_time(start, plain).unwrap_err(),
        b.event_completion_time(plain).unwrap_err(),
    ] {
        assert!(err.to_string().contains("enable_timing"), "{err}");
    }
    for id in [start, end, plain] {
        b.event_release(id).unwrap();
    }
}

/// The pool reuses released events; emptyCache destroys the free ones and keeps those in use.
pub fn event_pool(b: &dyn Backend) {
    let s = fresh_stream(b);
    let held = b.event_acquire(0, true).unwrap();
    let ids: Vec<EventId> = (0..4).map(|_| b.event_acquire(0, false).unwrap()).collect();
    for id in &ids {
        b.event_release(*id).unwrap();
    }
    let destroyed = b.event_pool_empty_cache().unwrap();
    assert!(
        destroyed >= 4,
        "the 4 released events were destroyed ({destroyed})"
    );
    assert_eq!(b.event_pool_empty_cache(), Ok(0), "nothing left to destroy");
    // The held event still works and returns to the pool.
    b.event_record(held, s).unwrap();
    b.event_synchronize(held).unwrap();
    b.event_release(held).unwrap();
    assert_eq!(b.event_pool_empty_cache(), Ok(1));
    let fresh = b.event_acquire(0, false).unwrap();
    b.event_record(fresh, s).unwrap();
    b.event_synchronize(fresh).unwrap();
    b.event_release(fresh).unwrap();
}

// ---- generators ----------------------------------------------------------------------------

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

// ---- graphs ------------------------------------------------------------------------------------

/// The MTIA graph API: create (with and without keep_graph), capture begin / end,
/// instantiate, replay, reset, destroy, pool, graphPoolHandle.
pub fn graphs(b: &dyn Backend) {
    let s = fresh_stream(b);
    let log = Log::default();
    for keep in [false, true] {
        let g = b.graph_create_with(0, keep).unwrap();
        assert!(b.graph_replay(g).is_err(), "nothing captured yet");
        b.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
        b.launch_host(s, log.task("x")).unwrap();
        b.launch_host(s, log.task("y")).unwrap();
        b.graph_capture_end(g).unwrap();
        b.stream_synchronize(s).unwrap();
        assert!(
            log.entries().is_empty(),
            "keep={keep}: capture runs nothing"
        );
        assert_eq!(b.graph_is_instantiated(g), Ok(!keep), "keep={keep}");
        if keep {
            b.graph_instantiate(g).unwrap();
        }
        assert!(b.graph_instantiate(g).is_err(), "instantiated once");
        for _ in 0..3 {
            b.graph_replay(g).unwrap();
        }
        b.stream_synchronize(s).unwrap();
        assert_eq!(log.entries(), ["x", "y"].repeat(3), "keep={keep}");
        log.0.lock().unwrap().clear();
        let pool = b.graph_pool(g).unwrap();
        assert!(!pool.is_none());
        // Reset: the graph captures again; destroy: it is gone.
        b.graph_reset(g).unwrap();
        assert!(b.graph_replay(g).is_err());
        b.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
        b.launch_host(s, log.task("z")).unwrap();
        b.graph_capture_end(g).unwrap();
        b.graph_replay(g).unwrap();
        b.stream_synchronize(s).unwrap();
        assert_eq!(log.entries(), ["z"]);
        log.0.lock().unwrap().clear();
        b.graph_destroy(g).unwrap();
        assert!(b.graph_replay(g).is_err());
    }
    // Graphs can share a pool from graphPoolHandle.
    let handle = b.graph_pool_handle(0).unwrap();
    assert_ne!(
        b.graph_pool_handle(0).unwrap(),
        handle,
        "a new pool each time"
    );
    let (g1, g2) = (b.graph_create(0).unwrap(), b.graph_create(0).unwrap());
    for g in [g1, g2] {
        b.graph_capture_begin(g, s, handle).unwrap();
        b.graph_capture_end(g).unwrap();
        assert_eq!(b.graph_pool(g), Ok(handle));
    }
    assert_eq!(
        b.allocator(0).unwrap().pool_use_count(handle),
        Some(2),
        "both graphs use the pool"
    );
    for g in [g1, g2] {
        b.graph_destroy(g).unwrap();
    }
    assert!(matches!(
        b.graph_reset(GraphId(u64::MAX)),
        Err(Error::Device(DeviceError::Graph(_)))
    ));
}

/// A capture forks onto a second stream (which waits for an event recorded in the capture)
/// and joins back; replays run both streams' captured work in dependency order.
pub fn graph_fork_join(b: &dyn Backend) {
    let (main, side) = (fresh_stream(b), fresh_stream(b));
    let (fork, join) = (
        b.event_acquire(0, false).unwrap(),
        b.event_acquire(0, false).unwrap(),
    );
    let order = Arc::new(Mutex::new(Vec::new()));
    let step = |name: &'static str| -> HostTask {
        let order = Arc::clone(&order);
        Arc::new(move || order.lock().unwrap().push(name))
    };
    let g = b.graph_create(0).unwrap();
    b.graph_capture_begin(g, main, MempoolId::NONE).unwrap();
    b.launch_host(main, step("fork")).unwrap();
    b.event_record(fork, main).unwrap();
    assert!(
        b.event_query(fork).is_err(),
        "a captured event is a graph point"
    );
    b.event_wait(fork, side).unwrap();
    assert!(b.stream_query(side).is_err(), "side is capturing now");
    b.launch_host(side, step("side")).unwrap();
    b.event_record(join, side).unwrap();
    b.event_wait(join, main).unwrap();
    b.launch_host(main, step("join")).unwrap();
    b.graph_capture_end(g).unwrap();
    b.stream_synchronize(side).unwrap();
    b.stream_synchronize(main).unwrap();
    assert!(
        order.lock().unwrap().is_empty(),
        "nothing ran during capture"
    );
    for _ in 0..2 {
        b.graph_replay(g).unwrap();
    }
    b.stream_synchronize(main).unwrap();
    // Each replay: fork before side before join.
    assert_eq!(
        *order.lock().unwrap(),
        ["fork", "side", "join", "fork", "side", "join"]
    );
    b.graph_destroy(g).unwrap();
    for id in [fork, join] {
        b.event_release(id).unwrap();
    }
}

// ---- the caching allocator ----------------------------------------------------------------

/// Allocate / free, metadata (unaligned size, id, shape), stats, emptyCache, scalar
/// buffers, shared buffers (or the documented refusal).
pub fn allocator_basics(b: &dyn Backend) {
    let a = b.allocator(0).unwrap();
    assert!(Arc::ptr_eq(&a, &b.allocator(0).unwrap()), "one per device");
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
    let pool = a.new_pool_id();
    a.begin_allocate_to_pool(pool, StreamFilter::Only(s1))
        .unwrap();
    for _ in 0..3 {
        ptrs.push(a.raw_alloc(4096, s1).unwrap());
    }
    a.end_allocate_to_pool(pool).unwrap();
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
    let a = b.allocator(0).unwrap();
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
    let a = b.allocator(0).unwrap();
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
    let a = b.allocator(0).unwrap();
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
    let a = b.allocator(0).unwrap();
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
    let history = a.memory_history();
    a.record_memory_history(None);
    a.clear_memory_history();
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
    let a = b.allocator(0).unwrap();
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
    let a = b.allocator(0).unwrap();
    let d = a.raw_alloc(1 << 16, fresh_stream(b)).unwrap();
    assert!(!b.is_pinned_ptr(d), "device memory is not pinned memory");
    a.raw_free(d).unwrap();
    pinned.free(p).unwrap();
}

/// profilerStartTrace / profilerStopTrace.
pub fn profiler(b: &dyn Backend) {
    let s = fresh_stream(b);
    assert!(b.profiler_stop_trace().is_err(), "no trace runs");
    b.profiler_start_trace(ProfilerMode::ALL, true).unwrap();
    assert!(
        b.profiler_start_trace(ProfilerMode::ALL, false).is_err(),
        "one at a time"
    );
    let ev = b.event_acquire(0, false).unwrap();
    b.launch_host(s, sleep_task(1)).unwrap();
    b.event_record(ev, s).unwrap();
    b.event_synchronize(ev).unwrap();
    let a = b.allocator(0).unwrap();
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
        "allocations are in the trace: {names:?}"
    );
    let json = trace.to_chrome_json();
    assert!(json["traceEvents"]
        .as_array()
        .is_some_and(|e| !e.is_empty()));
}
