//! Graph capture on the host backend: capture records launches instead of running them,
//! replay queues them again; the graph state machine rejects misuse with clear errors.

mod common;

use std::sync::Arc;

use accelrt::hooks::Backend;
use accelrt::{Error, GraphId, MempoolId, StreamPriority};
use common::{runtime, Log};

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

    rt.graph_instantiate(g).unwrap();
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
        matches!(rt.graph_replay(g), Err(Error::Graph(_))),
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
        matches!(rt.graph_pool(fresh), Err(Error::Graph(m)) if m.contains("assigned by graph_capture_begin"))
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
        Err(Error::InvalidDevice { index: 2, .. })
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
            "record",
            {
                let id = rt.event_acquire(0, false).unwrap();
                let r = rt.event_record(id, s);
                rt.event_release(id).unwrap();
                r
            },
            "while it is capturing graph",
        ),
    ];
    for (what, result, fragment) in during {
        let err = result.expect_err(what);
        assert!(matches!(err, Error::Graph(_)), "{what}: {err:?}");
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
