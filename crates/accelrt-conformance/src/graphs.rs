//! Checks of graphs: capture, replay, fork and join.

use std::sync::{Arc, Mutex};

use accelrt::hooks::{Backend, HostTask};
use accelrt::{DeviceError, Error, GraphId, MempoolId};

use crate::{fresh_stream, Log};

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
        b.device_allocator(0).unwrap().pool_use_count(handle),
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
