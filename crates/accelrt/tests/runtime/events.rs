//! Events on the host backend: the pool (RAII and id API), record / query / synchronize /
//! wait across streams and threads, timing, notify, sync-record and misuse.

use crate::common;

use accelrt::DeviceError;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use accelrt::hooks::Backend;
use accelrt::{Error, EventId, StreamPriority};
use common::{runtime, Gate, Log, PATIENCE};

#[test]
fn a_never_recorded_event_is_complete() {
    let rt = runtime(1);
    for timing in [false, true] {
        let id = rt.event_acquire(0, timing).unwrap();
        assert_eq!(rt.event_query(id), Ok(true));
        rt.event_synchronize(id).unwrap();
        rt.event_wait(id, rt.default_stream(0).unwrap()).unwrap();
        rt.event_release(id).unwrap();
    }
}

#[test]
fn an_event_completes_when_its_stream_reaches_it() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    for timing in [false, true] {
        let gate = Gate::new();
        let before = rt.event_acquire(0, timing).unwrap();
        let after = rt.event_acquire(0, timing).unwrap();
        rt.event_record(before, s).unwrap();
        rt.launch_host(s, gate.task()).unwrap();
        rt.event_record(after, s).unwrap();
        rt.event_synchronize(before).unwrap();
        assert_eq!(rt.event_query(before), Ok(true), "recorded before the gate");
        assert_eq!(
            rt.event_query(after),
            Ok(false),
            "recorded behind the gate (timing {timing})"
        );
        gate.open();
        rt.event_synchronize(after).unwrap();
        assert_eq!(rt.event_query(after), Ok(true));
        for id in [before, after] {
            rt.event_release(id).unwrap();
        }
    }
}

#[test]
fn re_recording_moves_the_event() {
    let rt = runtime(1);
    let busy = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let idle = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let gate = Gate::new();
    rt.launch_host(busy, gate.task()).unwrap();
    let id = rt.event_acquire(0, false).unwrap();
    rt.event_record(id, busy).unwrap();
    assert_eq!(rt.event_query(id), Ok(false));
    rt.event_record(id, idle).unwrap();
    assert_eq!(rt.event_query(id), Ok(true), "now it marks the idle stream");
    rt.event_synchronize(id).unwrap();
    rt.event_record(id, busy).unwrap();
    assert_eq!(rt.event_query(id), Ok(false), "and back behind the gate");
    gate.open();
    rt.event_synchronize(id).unwrap();
    rt.event_release(id).unwrap();
}

#[test]
fn stream_wait_orders_work_across_streams() {
    let rt = runtime(1);
    let producer = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let consumer = rt.new_stream(0, StreamPriority::High).unwrap();
    let gate = Gate::new();
    let log = Log::new();
    rt.launch_host(producer, gate.task()).unwrap();
    rt.launch_host(producer, log.task("produce")).unwrap();
    let ready = rt.event_acquire(0, false).unwrap();
    rt.event_record(ready, producer).unwrap();
    rt.event_wait(ready, consumer).unwrap();
    rt.launch_host(consumer, log.task("consume")).unwrap();
    assert_eq!(
        rt.stream_query(consumer),
        Ok(false),
        "the consumer waits for the producer"
    );
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        log.entries().is_empty(),
        "nothing ran while the producer was held"
    );
    gate.open();
    rt.stream_synchronize(consumer).unwrap();
    assert_eq!(log.entries(), ["produce", "consume"]);
    // Waiting on an event already complete, or on the stream it was recorded on, adds nothing.
    rt.event_wait(ready, consumer).unwrap();
    rt.event_wait(ready, producer).unwrap();
    assert_eq!(rt.stream_query(consumer), Ok(true));
    rt.event_release(ready).unwrap();
}

#[test]
fn events_work_across_threads() {
    let rt = runtime(2);
    let gate = Gate::new();
    let s = rt.new_stream(1, StreamPriority::Normal).unwrap();
    let id = rt.event_acquire(1, false).unwrap();
    let (tx, rx) = mpsc::channel::<EventId>();
    std::thread::scope(|scope| {
        // One thread records, another synchronizes, a third releases.
        scope.spawn(|| {
            rt.launch_host(s, gate.task()).unwrap();
            rt.event_record(id, s).unwrap();
            tx.send(id).unwrap();
        });
        let rt = &rt;
        let waiter = scope.spawn(move || {
            let id = rx.recv_timeout(PATIENCE).unwrap();
            assert_eq!(rt.event_query(id), Ok(false));
            rt.event_synchronize(id).unwrap();
            rt.event_query(id)
        });
        std::thread::sleep(Duration::from_millis(10));
        gate.open();
        assert_eq!(waiter.join().unwrap(), Ok(true));
    });
    std::thread::spawn(move || rt.event_release(id))
        .join()
        .unwrap()
        .unwrap();
}

#[test]
fn many_threads_share_the_pool() {
    let rt = runtime(2);
    let streams = [
        rt.new_stream(0, StreamPriority::Normal).unwrap(),
        rt.new_stream(1, StreamPriority::High).unwrap(),
    ];
    std::thread::scope(|scope| {
        for t in 0..4u32 {
            let rt = &rt;
            let stream = streams[(t % 2) as usize];
            scope.spawn(move || {
                for i in 0..500 {
                    let id = rt.event_acquire(t % 2, i % 3 == 0).unwrap();
                    rt.event_record(id, stream).unwrap();
                    rt.event_synchronize(id).unwrap();
                    assert_eq!(rt.event_query(id), Ok(true));
                    rt.event_release(id).unwrap();
                }
            });
        }
    });
    let pool = rt.event_pool().unwrap();
    assert_eq!(pool.in_use_count(), 0);
    assert!(
        pool.created_count() <= 16,
        "events were reused: {} created",
        pool.created_count()
    );
}

#[test]
fn timing_events_measure_plausible_monotonic_times() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let ids: Vec<EventId> = (0..4).map(|_| rt.event_acquire(0, true).unwrap()).collect();
    rt.event_record(ids[0], s).unwrap();
    rt.launch_host(
        s,
        Arc::new(|| std::thread::sleep(Duration::from_millis(20))),
    )
    .unwrap();
    rt.event_record(ids[1], s).unwrap();
    rt.event_record(ids[2], s).unwrap();
    rt.launch_host(s, Arc::new(|| std::thread::sleep(Duration::from_millis(2))))
        .unwrap();
    rt.event_record(ids[3], s).unwrap();
    rt.event_synchronize(ids[3]).unwrap();
    let slept = rt.event_elapsed_time(ids[0], ids[1]).unwrap();
    assert!(
        (15.0..500.0).contains(&slept),
        "a 20 ms sleep measured {slept} ms"
    );
    for pair in ids.windows(2) {
        let ms = rt.event_elapsed_time(pair[0], pair[1]).unwrap();
        assert!(ms >= 0.0, "{:?}: {ms}", pair);
    }
    let total = rt.event_elapsed_time(ids[0], ids[3]).unwrap();
    assert!(total >= slept);
    for id in ids {
        rt.event_release(id).unwrap();
    }
}

#[test]
fn elapsed_time_misuse_is_explained() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let plain = rt.event_acquire(0, false).unwrap();
    let timed = rt.event_acquire(0, true).unwrap();
    let timed2 = rt.event_acquire(0, true).unwrap();
    let unrecorded = rt.event_acquire(0, true).unwrap();
    rt.event_record(plain, s).unwrap();
    rt.event_record(timed, s).unwrap();
    rt.event_synchronize(timed).unwrap();
    rt.event_record(timed2, s).unwrap();
    rt.event_synchronize(timed2).unwrap();
    // (start, end, fragment of the message)
    let cases = [
        (plain, timed, "events were not created with enable_timing"),
        (timed, plain, "events were not created with enable_timing"),
        (plain, plain, "events were not created with enable_timing"),
        (timed, unrecorded, "was never recorded"),
        (unrecorded, timed, "was never recorded"),
        (timed2, timed, "was not recorded after"),
    ];
    for (start, end, fragment) in cases {
        let err = rt.event_elapsed_time(start, end).unwrap_err();
        assert!(
            matches!(err, Error::Device(DeviceError::Event(_))),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(fragment),
            "elapsed({start}, {end}): {err}"
        );
    }
    assert!(rt.event_elapsed_time(timed, timed2).unwrap() >= 0.0);

    // An end event the stream has not reached yet.
    let gate = Gate::new();
    rt.launch_host(s, gate.task()).unwrap();
    rt.event_record(unrecorded, s).unwrap();
    let err = rt.event_elapsed_time(timed, unrecorded).unwrap_err();
    assert!(err.to_string().contains("has not completed yet"), "{err}");
    gate.open();
    rt.event_synchronize(unrecorded).unwrap();
    assert!(rt.event_elapsed_time(timed, unrecorded).unwrap() >= 0.0);
}

#[test]
fn notify_runs_the_callback_once_the_event_completes() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let (tx, rx) = mpsc::channel::<&'static str>();

    let never = rt.event_acquire(0, false).unwrap();
    let tx1 = tx.clone();
    rt.event_notify(never, Box::new(move || tx1.send("never recorded").unwrap()))
        .unwrap();
    assert_eq!(rx.try_recv(), Ok("never recorded"), "runs at once");

    let gate = Gate::new();
    rt.launch_host(s, gate.task()).unwrap();
    let pending = rt.event_acquire(0, false).unwrap();
    rt.event_record(pending, s).unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    for label in ["first", "second"] {
        let (tx, calls) = (tx.clone(), Arc::clone(&calls));
        rt.event_notify(
            pending,
            Box::new(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                tx.send(label).unwrap();
            }),
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "not before the event completes"
    );
    gate.open();
    assert_eq!(rx.recv_timeout(PATIENCE), Ok("first"));
    assert_eq!(
        rx.recv_timeout(PATIENCE),
        Ok("second"),
        "callbacks run in registration order"
    );
    rt.stream_synchronize(s).unwrap();
    rt.launch_host(s, Arc::new(|| {})).unwrap();
    rt.stream_synchronize(s).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "each callback runs once");

    rt.event_notify(pending, Box::new(move || tx.send("complete").unwrap()))
        .unwrap();
    assert_eq!(
        rx.try_recv(),
        Ok("complete"),
        "an already completed event runs the callback at once"
    );
    for id in [never, pending] {
        rt.event_release(id).unwrap();
    }
}

#[test]
fn a_panicking_callback_is_reported_at_the_next_synchronize() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let gate = Gate::new();
    rt.launch_host(s, gate.task()).unwrap();
    let id = rt.event_acquire(0, false).unwrap();
    rt.event_record(id, s).unwrap();
    rt.event_notify(id, Box::new(|| panic!("callback boom")))
        .unwrap();
    gate.open();
    let err = rt.stream_synchronize(s).unwrap_err();
    assert!(err.to_string().contains("callback boom"), "{err}");
    rt.event_release(id).unwrap();
}

#[test]
fn sync_record_completes_without_further_work() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let log = Log::new();
    rt.launch_host(s, log.task("work")).unwrap();
    for timing in [false, true] {
        let id = rt.event_acquire(0, timing).unwrap();
        rt.event_sync_record(id, s).unwrap();
        rt.event_synchronize(id).unwrap();
        assert_eq!(rt.event_query(id), Ok(true));
        rt.event_release(id).unwrap();
    }
    assert_eq!(log.entries(), ["work"]);
}

#[test]
fn unknown_released_and_double_released_ids_fail_and_change_nothing() {
    let rt = runtime(1);
    let s = rt.default_stream(0).unwrap();
    let live = rt.event_acquire(0, false).unwrap();
    let released = rt.event_acquire(0, true).unwrap();
    rt.event_release(released).unwrap();
    let pool = rt.event_pool().unwrap();
    let snapshot = || {
        (
            pool.in_use_count(),
            pool.free_count(0, false),
            pool.free_count(0, true),
            pool.created_count(),
        )
    };
    let before = snapshot();
    assert_eq!(before, (1, 0, 1, 2));

    type Call = fn(&dyn Backend, EventId, accelrt::Stream) -> Result<(), Error>;
    let calls: &[(&str, Call)] = &[
        ("event_release", |b, id, _| b.event_release(id)),
        ("event_record", |b, id, s| b.event_record(id, s)),
        ("event_sync_record", |b, id, s| b.event_sync_record(id, s)),
        ("event_wait", |b, id, s| b.event_wait(id, s)),
        ("event_synchronize", |b, id, _| b.event_synchronize(id)),
        ("event_query", |b, id, _| b.event_query(id).map(drop)),
        ("event_notify", |b, id, _| {
            b.event_notify(id, Box::new(|| {}))
        }),
        ("elapsed (start)", |b, id, _| {
            b.event_elapsed_time(id, EventId(1)).map(drop)
        }),
    ];
    for bad in [
        released,
        EventId(0),
        EventId(u64::MAX),
        EventId(live.0 + 1000),
    ] {
        for (name, call) in calls {
            let err = call(&rt, bad, s).expect_err(name);
            assert_eq!(
                err,
                Error::Device(DeviceError::UnknownEvent { id: bad.0 }),
                "{name}({bad})"
            );
            assert!(err
                .to_string()
                .contains("was never acquired from this pool or was already released"));
        }
        assert_eq!(snapshot(), before, "pool unchanged after bad id {bad}");
    }
    assert_eq!(
        rt.event_elapsed_time(live, released),
        Err(Error::Device(DeviceError::UnknownEvent { id: released.0 }))
    );
    rt.event_release(live).unwrap();
    assert_eq!(
        rt.event_release(live),
        Err(Error::Device(DeviceError::UnknownEvent { id: live.0 })),
        "double release"
    );
    assert_eq!(snapshot(), (0, 1, 1, 2));
}

#[test]
fn ids_are_unique_and_never_reused() {
    let rt = runtime(2);
    let mut seen = std::collections::HashSet::new();
    for round in 0..50u32 {
        let id = rt.event_acquire(round % 2, round % 3 == 0).unwrap();
        assert!(seen.insert(id), "{id} handed out twice");
        rt.event_release(id).unwrap();
    }
    assert!(
        rt.event_pool().unwrap().created_count() <= 4,
        "the events themselves were reused"
    );
}

#[test]
fn an_event_cannot_be_recorded_on_another_devices_stream() {
    let rt = runtime(2);
    let id = rt.event_acquire(0, false).unwrap();
    let other = rt.default_stream(1).unwrap();
    let err = rt.event_record(id, other).unwrap_err();
    assert!(
        err.to_string().contains("a stream of another device"),
        "{err}"
    );
    assert_eq!(rt.event_query(id), Ok(true), "still unrecorded");
    // Waiting across devices is allowed.
    rt.event_record(id, rt.default_stream(0).unwrap()).unwrap();
    rt.event_wait(id, other).unwrap();
    rt.stream_synchronize(other).unwrap();
    rt.event_release(id).unwrap();
}

#[test]
fn raii_events_return_to_the_pool() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let pool_free = || rt.event_pool().unwrap().free_count(0, true);
    {
        let start = rt.event(0, true).unwrap();
        let end = rt.event(0, true).unwrap();
        assert!(start.timing() && end.timing());
        assert_eq!(start.device(), 0);
        assert_eq!(start.query(), Ok(true));
        start.record(s).unwrap();
        rt.launch_host(s, Arc::new(|| std::thread::sleep(Duration::from_millis(5))))
            .unwrap();
        end.record(s).unwrap();
        end.synchronize().unwrap();
        assert!(start.elapsed_ms(&end).unwrap() >= 4.0);
        let (tx, rx) = mpsc::channel();
        end.notify(move || tx.send(()).unwrap()).unwrap();
        rx.recv_timeout(PATIENCE).unwrap();
        end.wait(s).unwrap();
        start.sync_record(s).unwrap();
        assert_eq!(pool_free(), 0);
    }
    assert_eq!(pool_free(), 2, "both handles returned their events");
    let reused = rt.event(0, true).unwrap();
    assert_eq!(reused.query(), Ok(true), "a reused event starts unrecorded");
    let id = reused.into_id();
    assert_eq!(rt.event_query(id), Ok(true));
    assert_eq!(pool_free(), 1);
    rt.event_release(id).unwrap();
    assert_eq!(pool_free(), 2);
    let plain = rt.event(0, false).unwrap();
    let err = plain.elapsed_ms(&plain).unwrap_err();
    assert!(
        err.to_string()
            .contains("events were not created with enable_timing"),
        "{err}"
    );
    assert!(rt.event(3, false).is_err());
}

#[test]
fn a_callback_may_synchronize_and_query_the_event_that_fired_it() {
    let rt = Arc::new(runtime(1));
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let gate = Gate::new();
    rt.launch_host(s, gate.task()).unwrap();
    let id = rt.event_acquire(0, false).unwrap();
    rt.event_record(id, s).unwrap();
    let (tx, rx) = mpsc::channel();
    let rt2 = Arc::clone(&rt);
    rt.event_notify(
        id,
        Box::new(move || {
            let seen = (
                rt2.event_synchronize(id),
                rt2.event_query(id),
                rt2.stream_synchronize(s).is_err(),
            );
            tx.send(seen).unwrap();
        }),
    )
    .unwrap();
    gate.open();
    // On the stream's own worker: the event is complete, but waiting for the whole stream
    // from there would wait for itself.
    assert_eq!(rx.recv_timeout(PATIENCE), Ok((Ok(()), Ok(true), true)));
    rt.stream_synchronize(s).unwrap();
    rt.event_release(id).unwrap();
}

#[test]
fn completion_times_are_on_accelrts_clock_and_agree_with_elapsed_time() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let (start, end) = (
        rt.event_acquire(0, true).unwrap(),
        rt.event_acquire(0, true).unwrap(),
    );
    let before = accelrt::event::clock_ms();
    rt.event_record(start, s).unwrap();
    rt.launch_host(
        s,
        Arc::new(|| std::thread::sleep(Duration::from_millis(20))),
    )
    .unwrap();
    rt.event_record(end, s).unwrap();
    rt.event_synchronize(end).unwrap();
    let after = accelrt::event::clock_ms();
    let (t0, t1) = (
        rt.event_completion_time(start).unwrap(),
        rt.event_completion_time(end).unwrap(),
    );
    assert!(
        before <= t0 && t0 <= t1 && t1 <= after,
        "{before} <= {t0} <= {t1} <= {after}"
    );
    assert!(
        t1 - t0 >= 15.0,
        "a 20 ms sleep lies between them: {}",
        t1 - t0
    );
    let elapsed = rt.event_elapsed_time(start, end).unwrap();
    assert!((t1 - t0 - elapsed).abs() < 1e-3, "{t1} - {t0} vs {elapsed}");
    // The RAII handle answers too.
    let ev = rt.event(0, true).unwrap();
    ev.record(s).unwrap();
    ev.synchronize().unwrap();
    assert!(ev.completion_time_ms().unwrap() >= t1);
    for id in [start, end] {
        rt.event_release(id).unwrap();
    }
}

#[test]
fn completion_time_misuse_is_explained() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let plain = rt.event_acquire(0, false).unwrap();
    let unrecorded = rt.event_acquire(0, true).unwrap();
    let pending = rt.event_acquire(0, true).unwrap();
    rt.event_record(plain, s).unwrap();
    let gate = Gate::new();
    rt.launch_host(s, gate.task()).unwrap();
    rt.event_record(pending, s).unwrap();
    // (event, fragment of the message)
    let cases = [
        (plain, "was not created with enable_timing=true"),
        (unrecorded, "was never recorded"),
        (pending, "has not completed yet"),
    ];
    for (id, fragment) in cases {
        let err = rt.event_completion_time(id).unwrap_err();
        assert!(
            matches!(err, Error::Device(DeviceError::Event(_))),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains(fragment) && text.contains(&id.to_string()),
            "{id}: {text}"
        );
    }
    gate.open();
    rt.event_synchronize(pending).unwrap();
    assert!(rt.event_completion_time(pending).is_ok());
    assert!(matches!(
        rt.event_completion_time(EventId(999_999)),
        Err(Error::Device(DeviceError::UnknownEvent { id: 999_999 }))
    ));
}

#[test]
fn empty_cache_gives_free_events_back_and_keeps_those_in_use() {
    let rt = runtime(2);
    let pool = rt.event_pool().unwrap();
    let held = rt.event_acquire(1, true).unwrap();
    let ids: Vec<EventId> = (0..6)
        .map(|i| rt.event_acquire(i % 2, i % 3 == 0).unwrap())
        .collect();
    for id in &ids {
        rt.event_release(*id).unwrap();
    }
    let free = |d, t| pool.free_count(d, t);
    let cached = free(0, false) + free(0, true) + free(1, false) + free(1, true);
    assert_eq!(cached, 6);
    let created = pool.created_count();
    assert_eq!(rt.event_pool_empty_cache(), Ok(6));
    assert_eq!(
        free(0, false) + free(0, true) + free(1, false) + free(1, true),
        0
    );
    assert_eq!(pool.destroyed_count(), 6);
    // The event in use still works, and returns to the pool as usual.
    let s = rt.default_stream(1).unwrap();
    rt.event_record(held, s).unwrap();
    rt.event_synchronize(held).unwrap();
    rt.event_release(held).unwrap();
    assert_eq!(free(1, true), 1);
    // Emptied lists refill by creating events again.
    let again = rt.event_acquire(0, false).unwrap();
    assert_eq!(pool.created_count(), created + 1);
    rt.event_release(again).unwrap();
    assert_eq!(rt.event_pool_empty_cache(), Ok(2));
}
