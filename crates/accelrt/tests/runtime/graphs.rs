//! Graph capture on the host backend: capture records launches instead of running them,
//! replay queues them again; the graph state machine rejects misuse with clear errors.

use crate::common;

use accelrt::DeviceError;
use std::sync::Arc;

use accelrt::hooks::Backend;
use accelrt::{Error, GraphId, MempoolId, StreamPriority};
use common::{runtime, Gate, Log};

#[test]
fn capture_records_without_running_and_replay_runs_again() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let log = Log::new();
    let g = rt.graph_create(0).unwrap();
    rt.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
    for step in ["a", "b", "c"] {
        rt.launch_host(s, log.task(step)).unwrap();
    }
    rt.graph_capture_end(g).unwrap();
    // Flush the stream: nothing captured has run.
    rt.stream_synchronize(s).unwrap();
    assert!(
        log.entries().is_empty(),
        "capture ran tasks: {:?}",
        log.entries()
    );

    // Without keep_graph, the capture was instantiated when it ended.
    assert_eq!(rt.graph_is_instantiated(g), Ok(true));
    rt.graph_replay(g).unwrap();
    rt.launch_host(s, log.task("between")).unwrap();
    rt.graph_replay(g).unwrap();
    rt.stream_synchronize(s).unwrap();
    assert_eq!(log.entries(), ["a", "b", "c", "between", "a", "b", "c"]);
}

#[test]
fn replay_without_explicit_instantiate_and_recapture_after_reset() {
    let rt = runtime(1);
    let s = rt.default_stream(0).unwrap();
    let log = Log::new();
    let g = rt.graph_create(0).unwrap();
    rt.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
    rt.launch_host(s, log.task("first")).unwrap();
    rt.graph_capture_end(g).unwrap();
    rt.graph_replay(g).unwrap();
    rt.stream_synchronize(s).unwrap();
    rt.graph_reset(g).unwrap();
    assert!(
        matches!(
            rt.graph_replay(g),
            Err(Error::Device(DeviceError::Graph(_)))
        ),
        "a reset graph has nothing to replay"
    );
    rt.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
    rt.launch_host(s, log.task("second")).unwrap();
    rt.graph_capture_end(g).unwrap();
    rt.graph_replay(g).unwrap();
    rt.stream_synchronize(s).unwrap();
    assert_eq!(log.entries(), ["first", "second"]);
    rt.graph_destroy(g).unwrap();
}

#[test]
fn an_empty_capture_replays_as_nothing() {
    let rt = runtime(1);
    let s = rt.default_stream(0).unwrap();
    let g = rt.graph_create(0).unwrap();
    rt.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
    rt.graph_capture_end(g).unwrap();
    rt.graph_replay(g).unwrap();
    assert_eq!(rt.stream_query(s), Ok(true));
}

#[test]
fn graph_pools_are_fresh_or_the_given_one() {
    let rt = runtime(1);
    let s = rt.default_stream(0).unwrap();
    let fresh = rt.graph_create(0).unwrap();
    let shared = rt.graph_create(0).unwrap();
    assert!(
        matches!(rt.graph_pool(fresh), Err(Error::Device(DeviceError::Graph(m))) if m.contains("assigned by graph_capture_begin"))
    );
    rt.graph_capture_begin(fresh, s, MempoolId::NONE).unwrap();
    rt.graph_capture_end(fresh).unwrap();
    let pool = rt.graph_pool(fresh).unwrap();
    assert!(!pool.is_none());
    rt.graph_capture_begin(shared, s, pool).unwrap();
    rt.graph_capture_end(shared).unwrap();
    assert_eq!(
        rt.graph_pool(shared),
        Ok(pool),
        "a graph can share another graph's pool"
    );
}

#[test]
fn graph_misuse_is_rejected_and_changes_nothing() {
    let rt = runtime(2);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let s1 = rt.default_stream(1).unwrap();
    let g = rt.graph_create(0).unwrap();
    let other = rt.graph_create(0).unwrap();
    let unknown = GraphId(9999);

    // Before any capture: (what, result, fragment of the message).
    let before: Vec<(&str, Result<(), Error>, &str)> = vec![
        ("capture_end", rt.graph_capture_end(g), "is not capturing"),
        (
            "instantiate",
            rt.graph_instantiate(g),
            "no finished capture",
        ),
        ("replay", rt.graph_replay(g), "no finished capture"),
        (
            "capture on another device's stream",
            rt.graph_capture_begin(g, s1, MempoolId::NONE),
            "capture it on a stream of that device",
        ),
        (
            "unknown capture_begin",
            rt.graph_capture_begin(unknown, s, MempoolId::NONE),
            "unknown graph id 9999",
        ),
        (
            "unknown replay",
            rt.graph_replay(unknown),
            "unknown graph id 9999",
        ),
        (
            "unknown reset",
            rt.graph_reset(unknown),
            "unknown graph id 9999",
        ),
        (
            "unknown destroy",
            rt.graph_destroy(unknown),
            "unknown graph id 9999",
        ),
        (
            "unknown pool",
            rt.graph_pool(unknown).map(drop),
            "unknown graph id 9999",
        ),
    ];
    for (what, result, fragment) in before {
        let err = result.expect_err(what);
        assert!(err.to_string().contains(fragment), "{what}: {err}");
    }
    assert!(matches!(
        rt.graph_create(2),
        Err(Error::Device(DeviceError::InvalidDevice { index: 2, .. }))
    ));

    rt.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
    let during: Vec<(&str, Result<(), Error>, &str)> = vec![
        (
            "begin again",
            rt.graph_capture_begin(g, s, MempoolId::NONE),
            "already capturing",
        ),
        (
            "second graph on the stream",
            rt.graph_capture_begin(other, s, MempoolId::NONE),
            "is already capturing graph",
        ),
        (
            "synchronize",
            rt.stream_synchronize(s),
            "while it is capturing graph",
        ),
        (
            "query",
            rt.stream_query(s).map(drop),
            "while it is capturing graph",
        ),
        (
            "device synchronize",
            rt.device_synchronize(0),
            "while it is capturing graph",
        ),
        (
            "reset",
            rt.graph_reset(g),
            "end the capture before resetting",
        ),
        (
            "destroy",
            rt.graph_destroy(g),
            "end the capture before destroying",
        ),
        (
            "wait for an event recorded outside the capture",
            {
                let id = rt.event_acquire(0, false).unwrap();
                let outside = rt.default_stream(0).unwrap();
                rt.event_record(id, outside).unwrap();
                let r = rt.event_wait(id, s);
                rt.event_release(id).unwrap();
                r
            },
            "cannot wait for an event recorded outside the capture",
        ),
        (
            "instantiate while capturing",
            rt.graph_instantiate(g),
            "no finished capture to instantiate",
        ),
    ];
    for (what, result, fragment) in during {
        let err = result.expect_err(what);
        assert!(
            matches!(err, Error::Device(DeviceError::Graph(_))),
            "{what}: {err:?}"
        );
        assert!(err.to_string().contains(fragment), "{what}: {err}");
    }
    // Other streams and devices are unaffected by the capture.
    rt.device_synchronize(1).unwrap();
    let log = Log::new();
    rt.launch_host(s, log.task("captured")).unwrap();
    rt.graph_capture_end(g).unwrap();
    rt.stream_synchronize(s).unwrap();
    assert!(log.entries().is_empty());

    // The failed calls left the graph intact.
    rt.graph_replay(g).unwrap();
    rt.stream_synchronize(s).unwrap();
    assert_eq!(log.entries(), ["captured"]);
    let err = rt.graph_capture_begin(g, s, MempoolId::NONE).unwrap_err();
    assert!(
        err.to_string()
            .contains("graph_reset it before capturing again"),
        "{err}"
    );
    rt.graph_destroy(g).unwrap();
    assert!(rt
        .graph_replay(g)
        .unwrap_err()
        .to_string()
        .contains("unknown graph id"));
}

#[test]
fn replayed_tasks_see_state_changes_between_replays() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = Arc::clone(&counter);
    let g = rt.graph_create(0).unwrap();
    rt.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
    rt.launch_host(
        s,
        Arc::new(move || {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }),
    )
    .unwrap();
    rt.graph_capture_end(g).unwrap();
    for _ in 0..10 {
        rt.graph_replay(g).unwrap();
    }
    rt.stream_synchronize(s).unwrap();
    assert_eq!(counter.load(std::sync::atomic::Ordering::SeqCst), 10);
}

#[test]
fn keep_graph_defers_instantiation_until_asked_or_replayed() {
    let rt = runtime(1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let log = Log::new();
    // (keep_graph, instantiate explicitly before the first replay)
    for (keep, explicit) in [(true, true), (true, false), (false, false)] {
        let g = rt.graph_create_with(0, keep).unwrap();
        assert_eq!(rt.graph_is_instantiated(g), Ok(false), "keep={keep}: empty");
        rt.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
        rt.launch_host(s, log.task(format!("keep={keep} explicit={explicit}")))
            .unwrap();
        rt.graph_capture_end(g).unwrap();
        assert_eq!(
            rt.graph_is_instantiated(g),
            Ok(!keep),
            "keep={keep}: after capture end"
        );
        if explicit {
            rt.graph_instantiate(g).unwrap();
            assert_eq!(rt.graph_is_instantiated(g), Ok(true));
        }
        rt.graph_replay(g).unwrap();
        assert_eq!(
            rt.graph_is_instantiated(g),
            Ok(true),
            "a replay instantiates"
        );
        // Instantiating twice is refused, with the reason for graphs without keep_graph.
        let err = rt.graph_instantiate(g).unwrap_err().to_string();
        let expected = if keep {
            "is already instantiated"
        } else {
            "graph_instantiate is for graphs created with keep_graph"
        };
        assert!(err.contains(expected), "keep={keep}: {err}");
        // A reset graph has no executable form; a new capture starts over.
        rt.graph_reset(g).unwrap();
        assert_eq!(rt.graph_is_instantiated(g), Ok(false));
        rt.graph_destroy(g).unwrap();
    }
    rt.stream_synchronize(s).unwrap();
    assert_eq!(
        log.entries(),
        [
            "keep=true explicit=true",
            "keep=true explicit=false",
            "keep=false explicit=false"
        ]
    );
}

#[test]
fn graph_pool_handles_are_fresh_and_shareable() {
    let rt = runtime(2);
    let s = rt.new_stream(1, StreamPriority::Normal).unwrap();
    let a = rt.graph_pool_handle(1).unwrap();
    let b = rt.graph_pool_handle(1).unwrap();
    assert!(!a.is_none() && !b.is_none());
    assert_ne!(a, b, "each handle is a new pool");
    // Two graphs captured into the handle's pool share it.
    let graphs = [rt.graph_create(1).unwrap(), rt.graph_create(1).unwrap()];
    for g in graphs {
        rt.graph_capture_begin(g, s, a).unwrap();
        rt.graph_capture_end(g).unwrap();
        assert_eq!(rt.graph_pool(g), Ok(a));
    }
    assert_eq!(rt.allocator(1).unwrap().pool_use_count(a), Some(2));
    assert!(matches!(
        rt.graph_pool_handle(2),
        Err(Error::Device(DeviceError::InvalidDevice { index: 2, .. }))
    ));
}

/// A capture that forks onto a second stream and joins back (PyTorch's multi-stream CUDA
/// graph capture): the second stream's work is captured too, nothing runs during the
/// capture, and each replay runs everything again in an order that keeps the dependencies.
#[test]
fn a_capture_forks_onto_another_stream_and_joins_back() {
    let rt = runtime(1);
    let (main, side) = (
        rt.new_stream(0, StreamPriority::Normal).unwrap(),
        rt.new_stream(0, StreamPriority::Normal).unwrap(),
    );
    let log = Log::new();
    let (fork, join) = (
        rt.event_acquire(0, false).unwrap(),
        rt.event_acquire(0, false).unwrap(),
    );
    let g = rt.graph_create(0).unwrap();
    rt.graph_capture_begin(g, main, MempoolId::NONE).unwrap();
    rt.launch_host(main, log.task("main: before fork")).unwrap();
    rt.event_record(fork, main).unwrap();
    // A captured event marks a point of the graph, not of the device.
    let err = rt.event_query(fork).unwrap_err().to_string();
    assert!(err.contains("inside the graph"), "{err}");
    rt.event_wait(fork, side).unwrap(); // side joins the capture
    let err = rt.stream_synchronize(side).unwrap_err().to_string();
    assert!(err.contains("while it is capturing graph"), "{err}");
    // Allocations on the joined stream come from the graph's pool too.
    let allocator = rt.allocator(0).unwrap();
    let ptr = allocator.raw_alloc(4096, side).unwrap();
    rt.launch_host(side, log.task("side: after fork")).unwrap();
    rt.event_record(join, side).unwrap();
    rt.event_wait(join, main).unwrap(); // join back
    rt.launch_host(main, log.task("main: after join")).unwrap();
    rt.graph_capture_end(g).unwrap();
    let pool = rt.graph_pool(g).unwrap();
    let in_pool = allocator.memory_snapshot().segments.iter().any(|seg| {
        seg.segment_pool_id == (pool.0, pool.1)
            && seg.blocks.iter().any(|b| b.address == ptr as u64)
    });
    assert!(in_pool, "the joined stream allocated from the graph's pool");
    allocator.raw_free(ptr).unwrap();

    // Nothing ran during the capture, and both streams are free again.
    rt.stream_synchronize(side).unwrap();
    rt.stream_synchronize(main).unwrap();
    assert!(log.entries().is_empty(), "{:?}", log.entries());
    let outside = rt.event_acquire(0, false).unwrap();
    rt.event_record(outside, side).unwrap();
    assert_eq!(
        rt.event_query(outside),
        Ok(true),
        "side is a plain stream again"
    );

    for _ in 0..2 {
        rt.graph_replay(g).unwrap();
    }
    rt.stream_synchronize(main).unwrap();
    let once = ["main: before fork", "side: after fork", "main: after join"];
    assert_eq!(log.entries(), [once, once].concat());
    for id in [fork, join, outside] {
        rt.event_release(id).unwrap();
    }
}

#[test]
fn fork_and_join_misuse_is_refused() {
    let rt = runtime(2);
    let s = |d| rt.new_stream(d, StreamPriority::Normal).unwrap();
    let (a, b, c, other_device) = (s(0), s(0), s(0), s(1));
    let (ga, gb) = (rt.graph_create(0).unwrap(), rt.graph_create(0).unwrap());
    let ev = |d| rt.event_acquire(d, false).unwrap();
    let (in_a, in_b) = (ev(0), ev(0));
    rt.graph_capture_begin(ga, a, MempoolId::NONE).unwrap();
    rt.graph_capture_begin(gb, b, MempoolId::NONE).unwrap();
    rt.event_record(in_a, a).unwrap();
    rt.event_record(in_b, b).unwrap();
    // (what, result, fragment)
    let cases: Vec<(&str, Result<(), Error>, &str)> = vec![
        (
            "a stream of another capture waits for this one's event",
            rt.event_wait(in_a, b),
            "cannot wait for an event recorded in the capture of graph",
        ),
        (
            "a stream of another device joins",
            rt.event_wait(in_a, other_device),
            "cannot join the capture of graph",
        ),
        (
            "synchronize a captured event",
            rt.event_synchronize(in_a),
            "inside the graph",
        ),
        (
            "notify on a captured event",
            rt.event_notify(in_a, Box::new(|| {})),
            "inside the graph",
        ),
    ];
    for (what, result, fragment) in cases {
        let err = result.expect_err(what);
        assert!(err.to_string().contains(fragment), "{what}: {err}");
    }
    rt.graph_capture_end(ga).unwrap();
    rt.graph_capture_end(gb).unwrap();
    // After the capture ended, its events cannot be joined any more.
    let err = rt.event_wait(in_a, c).unwrap_err().to_string();
    assert!(err.contains("no longer capturing"), "{err}");
    rt.stream_synchronize(c).unwrap();
    // Re-recording outside a capture makes an event a device event again.
    let gate = Gate::new();
    rt.launch_host(a, gate.task()).unwrap();
    rt.event_record(in_a, a).unwrap();
    assert_eq!(rt.event_query(in_a), Ok(false));
    gate.open();
    rt.event_synchronize(in_a).unwrap();
    assert_eq!(rt.event_query(in_a), Ok(true));
}
