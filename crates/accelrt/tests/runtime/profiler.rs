//! The profiler: a Chrome trace of event, task and allocator activity on the host backend.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use accelrt::alloc::HistoryConfig;
use accelrt::profiler::{Phase, ProfilerMode};
use accelrt::Backend;
use serde_json::Value;

#[test]
fn a_trace_records_events_tasks_and_allocations_as_chrome_json() {
    let rt = common::runtime(1);
    let alloc = rt.allocator(0).unwrap();
    let s0 = rt.default_stream(0).unwrap();
    let s1 = rt.new_stream(0, accelrt::StreamPriority::Normal).unwrap();

    rt.profiler_start_trace(ProfilerMode::ALL, true).unwrap();
    let e = rt
        .profiler_start_trace(ProfilerMode::ALL, false)
        .unwrap_err();
    assert!(e.to_string().contains("already running"), "{e}");
    let p = alloc.raw_alloc(3 << 20, s0).unwrap();
    let q = alloc.raw_alloc(4096, s1).unwrap();
    alloc.raw_free(p).unwrap();
    for _ in 0..3 {
        rt.launch_host(
            s1,
            Arc::new(|| std::thread::sleep(Duration::from_millis(2))),
        )
        .unwrap();
    }
    let ev = rt.event_acquire(0, false).unwrap();
    rt.event_record(ev, s1).unwrap();
    rt.event_wait(ev, s0).unwrap();
    rt.event_synchronize(ev).unwrap();
    // Still running when the trace stops: wait_until_completed puts it in the trace.
    rt.launch_host(
        s0,
        Arc::new(|| std::thread::sleep(Duration::from_millis(30))),
    )
    .unwrap();
    let trace = rt.profiler_stop_trace().unwrap();
    rt.event_release(ev).unwrap();
    alloc.raw_free(q).unwrap();

    let count = |name: &str| trace.events.iter().filter(|e| e.name == name).count();
    assert_eq!(count("host task"), 4, "every task, the last one too");
    assert_eq!(count("launch_host"), 4);
    assert_eq!(count("event_record"), 1);
    assert_eq!(count("event_wait"), 1);
    assert_eq!(count("event_synchronize"), 1);
    assert_eq!(
        count("device_synchronize"),
        1,
        "wait_until_completed synchronizes"
    );
    assert!(trace
        .events
        .iter()
        .any(|e| e.name == "alloc 3.00 MiB" && e.stream == Some(0)));
    assert!(trace
        .events
        .iter()
        .any(|e| e.name == "alloc 4.00 KiB" && e.stream == Some(s1.index)));
    // New memory shows as a segment (plain segments) or a mapping (expandable, the default).
    assert!(trace
        .events
        .iter()
        .any(|e| e.name.starts_with("segment_alloc") || e.name.starts_with("segment_map")));
    let last_task = trace
        .events
        .iter()
        .rev()
        .find(|e| e.name == "host task")
        .unwrap();
    match last_task.phase {
        Phase::Complete { dur_us } => assert!(dur_us >= 30_000.0, "{dur_us}"),
        ref other => panic!("a task is a slice, not {other:?}"),
    }
    assert!(
        trace.events.windows(2).all(|w| w[0].ts_us <= w[1].ts_us),
        "sorted by time"
    );

    // The Chrome JSON: every event has what Perfetto needs.
    let json = trace.to_chrome_json();
    let events = json["traceEvents"].as_array().unwrap();
    for e in events {
        let ph = e["ph"].as_str().unwrap();
        assert!(["X", "i", "C", "M"].contains(&ph), "{e}");
        assert!(
            e["pid"].is_u64() && e["tid"].is_u64() && e["name"].is_string(),
            "{e}"
        );
        if ph != "M" {
            assert!(e["ts"].as_f64().unwrap() >= 0.0, "{e}");
        }
        if ph == "X" {
            assert!(e["dur"].as_f64().unwrap() >= 0.0, "{e}");
        }
        if ph == "C" {
            assert!(
                e["args"]["allocated"].is_u64() && e["args"]["reserved"].is_u64(),
                "{e}"
            );
        }
    }
    let thread_names: Vec<&str> = events
        .iter()
        .filter(|e| e["name"] == "thread_name")
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    assert!(thread_names.contains(&"stream 0") && thread_names.contains(&"device"));
    let max_counter = events
        .iter()
        .filter(|e| e["ph"] == "C")
        .map(|e| e["args"]["allocated"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(max_counter, (3 << 20) + 4096);
    // It is written as one JSON document.
    let path = std::env::temp_dir().join(format!("accelrt_profile_{}.json", std::process::id()));
    trace.write_chrome_trace(&path).unwrap();
    let back: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(back["traceEvents"].as_array().unwrap().len(), events.len());
    std::fs::remove_file(&path).unwrap();

    // History was off before the trace: it is off and empty again.
    assert!(alloc.memory_history().is_empty());
    let e = rt.profiler_stop_trace().unwrap_err();
    assert!(
        e.to_string().contains("no profiler trace is running"),
        "{e}"
    );
}

#[test]
fn modes_select_what_is_recorded_and_a_users_history_is_kept() {
    let rt = common::runtime(1);
    let alloc = rt.allocator(0).unwrap();
    let s0 = rt.default_stream(0).unwrap();
    alloc.record_memory_history(Some(HistoryConfig::default()));
    let before = alloc.raw_alloc(1024, s0).unwrap();

    let only_events = ProfilerMode {
        events: true,
        tasks: false,
        allocations: false,
    };
    // (mode, expect tasks, expect allocations, expect events)
    let cases = [
        (only_events, false, false, true),
        (
            ProfilerMode {
                events: false,
                tasks: true,
                allocations: false,
            },
            true,
            false,
            false,
        ),
        (
            ProfilerMode {
                events: false,
                tasks: false,
                allocations: true,
            },
            false,
            true,
            false,
        ),
    ];
    for (mode, tasks, allocations, events) in cases {
        rt.profiler_start_trace(mode, false).unwrap();
        let p = alloc.raw_alloc(2048, s0).unwrap();
        alloc.raw_free(p).unwrap();
        rt.launch_host(s0, Arc::new(|| {})).unwrap();
        rt.stream_synchronize(s0).unwrap();
        let t = rt.profiler_stop_trace().unwrap();
        let has = |cat: &str| t.events.iter().any(|e| e.cat == cat);
        assert_eq!(has("task"), tasks, "{mode:?}");
        assert_eq!(has("alloc"), allocations, "{mode:?}");
        assert_eq!(has("sync"), events, "{mode:?}");
        // Entries from before the trace are not in it.
        assert!(
            !t.events.iter().any(|e| e.name == "alloc 1.00 KiB"),
            "{mode:?}"
        );
    }
    // The user was recording: recording goes on after the traces, with every entry kept.
    alloc.raw_free(before).unwrap();
    let h = alloc.memory_history();
    assert!(h
        .iter()
        .any(|e| e.size == 1024 && e.action == accelrt::alloc::TraceAction::FreeRequested));
    assert!(h.iter().any(|e| e.size == 2048));
}
