//! Checks of events and the event pool.

use std::sync::mpsc;
use std::time::Duration;

use accelrt::hooks::Backend;
use accelrt::{DeviceError, Error, EventId};

use crate::{fresh_stream, sleep_task, Gate, Log, PATIENCE};

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
