//! Host streams: FIFO worker threads, asynchrony, pools, current streams, errors kept until
//! the next synchronize, and bad stream handles.

use crate::common;

use accelrt::DeviceError;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};

use accelrt::hooks::Backend;
use accelrt::{Device, DeviceType, Error, Stream, StreamPriority};
use common::{eventually, runtime, Gate, Log, PATIENCE};

#[test]
fn tasks_run_in_launch_order() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let log = Log::new();
    for i in 0..200 {
        rt.launch_host(s, log.task(i.to_string())).unwrap();
    }
    rt.stream_synchronize(s).unwrap();
    let want: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    assert_eq!(log.entries(), want);
    assert_eq!(rt.stream_query(s), Ok(true));
}

#[test]
fn launch_returns_before_the_work_runs() {
    let rt = runtime(1);
    let s = rt.default_stream(0).unwrap();
    assert_eq!(
        rt.stream_query(s),
        Ok(true),
        "an idle stream has no pending work"
    );
    let gate = Gate::new();
    let log = Log::new();
    rt.launch_host(s, gate.task()).unwrap();
    rt.launch_host(s, log.task("after gate")).unwrap();
    assert_eq!(rt.stream_query(s), Ok(false));
    assert!(
        log.entries().is_empty(),
        "work queued behind the gate has not run"
    );
    gate.open();
    rt.stream_synchronize(s).unwrap();
    assert_eq!(log.entries(), ["after gate"]);
    assert_eq!(rt.stream_query(s), Ok(true));
}

#[test]
fn streams_run_concurrently() {
    let rt = runtime(1);
    let a = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let b = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let (tx, rx) = mpsc::channel::<u32>();
    let rx = std::sync::Mutex::new(rx);
    let got = Arc::new(AtomicU32::new(0));
    let got2 = Arc::clone(&got);
    // `a` waits for a value that only a task on `b` sends: serialised streams would time out.
    rt.launch_host(
        a,
        Arc::new(move || {
            let v = rx.lock().unwrap().recv_timeout(PATIENCE).unwrap_or(0);
            got2.store(v, Ordering::SeqCst);
        }),
    )
    .unwrap();
    rt.launch_host(b, Arc::new(move || tx.send(42).unwrap()))
        .unwrap();
    rt.device_synchronize(0).unwrap();
    assert_eq!(got.load(Ordering::SeqCst), 42);
}

#[test]
fn device_synchronize_waits_for_every_stream_of_the_device() {
    let rt = runtime(2);
    let counter = Arc::new(AtomicU32::new(0));
    let mut streams = vec![rt.default_stream(0).unwrap()];
    streams.push(rt.new_stream(0, StreamPriority::High).unwrap());
    streams.push(rt.stream_from_pool(0, StreamPriority::Normal).unwrap());
    for s in &streams {
        for _ in 0..50 {
            let c = Arc::clone(&counter);
            rt.launch_host(
                *s,
                Arc::new(move || {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    c.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();
        }
    }
    // Device 1 has nothing to do with device 0's work.
    let gate = Gate::new();
    rt.launch_host(rt.default_stream(1).unwrap(), gate.task())
        .unwrap();
    rt.device_synchronize(0).unwrap();
    assert_eq!(counter.load(Ordering::SeqCst), 150);
    assert_eq!(rt.stream_query(rt.default_stream(1).unwrap()), Ok(false));
    gate.open();
    rt.device_synchronize(1).unwrap();
}

#[test]
fn pooled_streams_round_robin_per_priority() {
    let rt = runtime(1);
    let normal: Vec<Stream> = (0..8)
        .map(|_| rt.stream_from_pool(0, StreamPriority::Normal).unwrap())
        .collect();
    let high: Vec<Stream> = (0..8)
        .map(|_| rt.stream_from_pool(0, StreamPriority::High).unwrap())
        .collect();
    for pool in [&normal, &high] {
        let first: std::collections::BTreeSet<u32> = pool[..4].iter().map(|s| s.index).collect();
        assert_eq!(first.len(), 4, "four distinct pooled streams: {pool:?}");
        assert_eq!(pool[..4], pool[4..], "then the same four again");
        assert!(pool.iter().all(|s| !s.is_default()));
    }
    assert!(
        normal
            .iter()
            .all(|n| high.iter().all(|h| h.index != n.index)),
        "priorities do not share streams"
    );
    let fresh = rt.new_stream(0, StreamPriority::Normal).unwrap();
    assert!(normal.iter().chain(&high).all(|s| s.index != fresh.index));
    let handles: std::collections::BTreeSet<u64> = normal[..4]
        .iter()
        .chain(&high[..4])
        .chain([&fresh])
        .map(|s| rt.stream_native_handle(*s).unwrap())
        .collect();
    assert_eq!(handles.len(), 9, "every stream has its own native handle");
}

#[test]
fn current_stream_is_per_thread_and_per_device() {
    let rt = runtime(2);
    let d0 = rt.default_stream(0).unwrap();
    assert!(d0.is_default());
    assert_eq!(
        d0.device,
        Device {
            kind: DeviceType::Host,
            index: 0
        }
    );
    assert_eq!(rt.current_stream(0), Ok(d0));
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    rt.set_current_stream(s).unwrap();
    assert_eq!(rt.current_stream(0), Ok(s));
    assert_eq!(
        rt.current_stream(1),
        Ok(rt.default_stream(1).unwrap()),
        "device 1 keeps its default"
    );
    std::thread::scope(|sc| {
        sc.spawn(|| {
            assert_eq!(
                rt.current_stream(0),
                Ok(d0),
                "another thread starts on the default stream"
            )
        });
    });
    rt.set_current_stream(d0).unwrap();
    assert_eq!(rt.current_stream(0), Ok(d0));
}

#[test]
fn a_panicking_task_is_reported_at_the_next_synchronize_and_the_stream_goes_on() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let log = Log::new();
    rt.launch_host(s, Arc::new(|| panic!("boom in a task")))
        .unwrap();
    rt.launch_host(s, log.task("still runs")).unwrap();
    let err = rt.stream_synchronize(s).unwrap_err();
    match &err {
        Error::Device(DeviceError::Driver { message, .. }) => {
            assert!(message.contains("panicked: boom in a task"), "{message}")
        }
        other => panic!("expected a driver error, got {other:?}"),
    }
    assert_eq!(log.entries(), ["still runs"]);
    assert_eq!(
        rt.stream_synchronize(s),
        Ok(()),
        "an error is reported once"
    );
    rt.launch_host(s, Arc::new(|| panic!("second"))).unwrap();
    let err = rt.device_synchronize(0).unwrap_err();
    assert!(err.to_string().contains("second"), "{err}");
    rt.launch_host(s, log.task("later")).unwrap();
    rt.stream_synchronize(s).unwrap();
    assert_eq!(log.entries(), ["still runs", "later"]);
}

#[test]
fn synchronizing_a_stream_from_its_own_task_is_an_error_not_a_deadlock() {
    let rt = Arc::new(runtime(1));
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let rt2 = Arc::clone(&rt);
    rt.launch_host(
        s,
        Arc::new(move || tx.lock().unwrap().send(rt2.stream_synchronize(s)).unwrap()),
    )
    .unwrap();
    let inner = rx.recv_timeout(PATIENCE).expect("the task finished");
    let err = inner.unwrap_err();
    assert!(err.to_string().contains("would wait for itself"), "{err}");
    rt.stream_synchronize(s).unwrap();
}

#[test]
fn bad_stream_handles_are_rejected() {
    let rt = runtime(2);
    let host = |device, index| Stream {
        device: Device {
            kind: DeviceType::Host,
            index: device,
        },
        index,
    };
    let cuda = Stream {
        device: Device {
            kind: DeviceType::Cuda,
            index: 0,
        },
        index: 0,
    };
    // (stream, fragment of the message)
    let cases = [
        (host(0, 7), "has 1 stream(s)"),
        (host(1, u32::MAX), "has 1 stream(s)"),
        (cuda, "it is a cuda stream, not a host one"),
    ];
    type Call = fn(&dyn Backend, Stream) -> Result<(), Error>;
    let calls: &[(&str, Call)] = &[
        ("set_current_stream", |b, s| b.set_current_stream(s)),
        ("stream_native_handle", |b, s| {
            b.stream_native_handle(s).map(drop)
        }),
        ("stream_commit", |b, s| b.stream_commit(s)),
        ("stream_synchronize", |b, s| b.stream_synchronize(s)),
        ("stream_query", |b, s| b.stream_query(s).map(drop)),
        ("launch_host", |b, s| b.launch_host(s, Arc::new(|| {}))),
    ];
    for (stream, fragment) in cases {
        for (name, call) in calls {
            let err = call(&rt, stream).expect_err(name);
            assert!(
                matches!(err, Error::Device(DeviceError::InvalidStream { .. })),
                "{name}({stream}): {err:?}"
            );
            assert!(
                err.to_string().contains(fragment),
                "{name}({stream}): {err}"
            );
        }
    }
    let missing_device = host(5, 0);
    assert!(matches!(
        rt.stream_query(missing_device),
        Err(Error::Device(DeviceError::InvalidDevice {
            index: 5,
            count: 2,
            ..
        }))
    ));
    assert_eq!(
        rt.current_stream(0),
        Ok(host(0, 0)),
        "failed set_current_stream changed nothing"
    );
}

#[test]
fn a_dropped_runtime_lets_its_workers_finish_queued_work() {
    let log = Log::new();
    {
        let rt = runtime(1);
        let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
        for i in 0..20 {
            rt.launch_host(s, log.task(format!("{i}"))).unwrap();
        }
    }
    assert!(
        eventually(|| log.entries().len() == 20),
        "queued tasks still ran: {:?}",
        log.entries()
    );
}
