//! Replaying traces through the caching allocator: the shipped traces complete with
//! consistent figures, an undersized device stops with an OOM naming the line, the
//! allocator stays consistent either way, and the device model decides when memory used on
//! other streams can be reused.

use accelrt::FormatError;
use std::sync::Arc;

use accelrt::alloc::{AllocatorConfig, CachingAllocator, MemoryProvider};
use accelrt::backend::host::HostMemory;
use accelrt::snapshot::Timeline;
use accelrt::trace::{
    self, DeviceModel, ModelSource, ReplayInput, ReplayOptions, ResolvedModel, Trace, TraceOp,
    DEFAULT_LAG_EVENTS, DEFAULT_LAG_US,
};
use accelrt::{Device, DeviceType, Stream};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const DEVICE: Device = Device {
    kind: DeviceType::Host,
    index: 0,
};

fn shipped(name: &str) -> Trace {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../traces")
        .join(name);
    trace::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn allocator(capacity: u64, config: AllocatorConfig) -> CachingAllocator {
    let provider: Arc<dyn MemoryProvider> = Arc::new(HostMemory::new(capacity));
    CachingAllocator::new(DEVICE, provider, None, config).unwrap()
}

/// Sum of requested bytes still live at the end of the trace.
fn live_at_end(t: &Trace) -> u64 {
    let mut live = std::collections::HashMap::new();
    for op in &t.ops {
        match *op {
            TraceOp::Alloc { id, size, .. } => {
                live.insert(id, size);
            }
            TraceOp::Free { id } => {
                live.remove(&id);
            }
            TraceOp::RecordStream { .. } | TraceOp::Complete { .. } => {}
        }
    }
    live.values().sum()
}

/// The checks every completed replay must pass.
fn check_complete(t: &Trace, config: AllocatorConfig) {
    // Invariants are checked once at the end (per-call checks would make the large traces slow
    // in debug builds; `debug_checks_replay_small_trace` covers per-call checking).
    let config = AllocatorConfig {
        debug_checks: false,
        ..config
    };
    let conf = config.to_conf_string();
    let alloc = allocator(64 * GIB, config);
    let outcome = trace::replay_into(t, &alloc);
    assert!(
        outcome.error.is_none(),
        "{} [{conf}]: {:?}",
        t.name,
        outcome.error
    );
    let r = &outcome.report;
    assert!(r.completed(), "{} [{conf}]", t.name);
    assert_eq!(r.ops, t.ops.len() as u64);
    assert_eq!(r.trace, t.name);
    assert_eq!(r.config, conf);
    assert_eq!(
        r.peak_allocated_bytes,
        trace::peak_live_bytes(t),
        "{} [{conf}]",
        t.name
    );
    assert!(
        r.peak_reserved_bytes >= r.peak_allocated_bytes,
        "{} [{conf}]: {r:?}",
        t.name
    );
    assert!(
        r.device_allocs >= 1 && r.ooms == 0,
        "{} [{conf}]: {r:?}",
        t.name
    );
    assert!(r.ns_per_call > 0.0 && r.seconds > 0.0, "{r:?}");
    let ratio = r.ratio().unwrap();
    assert!(
        (1.0..3.0).contains(&ratio),
        "{} [{conf}]: ratio {ratio}",
        t.name
    );
    alloc
        .check_invariants()
        .unwrap_or_else(|e| panic!("{} [{conf}]: {e}", t.name));
    // What is still live at the end of the trace is still allocated.
    assert!(
        alloc.allocated_bytes() >= live_at_end(t),
        "{} [{conf}]",
        t.name
    );
    assert!(alloc.reserved_bytes() >= alloc.allocated_bytes());
    println!(
        "{:<20} [{conf}] peak allocated {} reserved {} ratio {ratio:.3} device allocs {} ns/call {:.0}",
        t.name, r.peak_allocated_bytes, r.peak_reserved_bytes, r.device_allocs, r.ns_per_call
    );
}

#[test]
fn shipped_traces_replay_to_the_end() {
    for name in [
        "resnet50_train.trace.gz",
        "gpt2_train.trace.gz",
        "gpt2_infer_varlen.trace.gz",
    ] {
        let t = shipped(name);
        check_complete(&t, AllocatorConfig::default());
    }
}

#[test]
fn shipped_traces_replay_under_other_configs() {
    let t = shipped("resnet50_train.trace.gz");
    for conf in [
        "max_split_size_mb:128",
        "roundup_power2_divisions:4",
        "expandable_segments:true",
    ] {
        check_complete(&t, AllocatorConfig::parse(conf).unwrap());
    }
}

#[test]
fn replay_builds_its_own_device() {
    let t = shipped("resnet50_train.trace.gz");
    let opts = ReplayOptions {
        config: AllocatorConfig {
            debug_checks: false,
            ..AllocatorConfig::default()
        },
        capacity: Some(16 * GIB),
        ..ReplayOptions::default()
    };
    let report = trace::replay(&t, &opts).into_result().unwrap();
    assert_eq!(report.peak_allocated_bytes, 3_192_592_912);
    assert!(report.peak_reserved_bytes >= report.peak_allocated_bytes);
    assert!(report.peak_reserved_bytes <= 16 * GIB);
}

#[test]
fn debug_checks_replay_small_trace() {
    // Invariants checked after every call (the allocator panics if one breaks).
    let mut ops = Vec::new();
    let mut live = Vec::new();
    let mut seed = 7u64;
    for id in 0..3_000u64 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = seed >> 33;
        if r % 3 == 0 && !live.is_empty() {
            let victim: u64 = live.swap_remove((r as usize / 3) % live.len());
            ops.push(TraceOp::Free { id: victim });
        }
        let size = match r % 5 {
            0 => r % 512,
            1 => r % MIB,
            2 => MIB + r % (9 * MIB),
            3 => 10 * MIB + r % (40 * MIB),
            _ => r % 8192,
        };
        ops.push(TraceOp::Alloc {
            id,
            size,
            stream: (r % 3) as u32,
        });
        live.push(id);
    }
    let t = Trace::from_ops("mixed", ops, None).unwrap();
    let alloc = allocator(
        64 * GIB,
        AllocatorConfig {
            debug_checks: true,
            ..AllocatorConfig::default()
        },
    );
    let outcome = trace::replay_into(&t, &alloc);
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    assert_eq!(
        outcome.report.peak_allocated_bytes,
        trace::peak_live_bytes(&t)
    );
    assert!(outcome.report.peak_reserved_bytes >= outcome.report.peak_allocated_bytes);
    alloc.check_invariants().unwrap();
}

#[test]
fn undersized_device_stops_with_an_oom_naming_the_line() {
    let t = shipped("resnet50_train.trace.gz");
    let capacity = GIB;
    let alloc = allocator(
        capacity,
        AllocatorConfig {
            debug_checks: false,
            ..AllocatorConfig::default()
        },
    );
    let outcome = trace::replay_into(&t, &alloc);
    let r = outcome.report.clone();
    assert!(!r.completed(), "{r:?}");
    assert!(r.ops > 0 && r.ops < t.ops.len() as u64, "{r:?}");
    assert!(outcome.is_out_of_memory(), "{:?}", outcome.cause);
    assert!(r.ooms >= 1, "{r:?}");
    assert!(r.peak_reserved_bytes <= capacity);
    assert!(r.peak_allocated_bytes <= capacity);
    // The stop is at an allocation, reported at its source line.
    let failed = r.ops as usize;
    let TraceOp::Alloc { id, size, stream } = t.ops[failed] else {
        panic!("stopped at a free: {:?}", t.ops[failed]);
    };
    // The allocator's failure, located: not a parse error (the input was fine).
    match outcome.error.as_ref().unwrap() {
        FormatError::Replay {
            file,
            line,
            message,
            cause,
        } => {
            assert!(cause.is_out_of_memory(), "{cause:?}");
            assert_eq!(file, &t.source);
            assert_eq!(*line, t.line_of(failed));
            assert_eq!(
                *line,
                failed as u64 + 3,
                "two header lines precede the events"
            );
            assert!(
                message.contains(&format!("a {id} {size} {stream}")),
                "{message}"
            );
            assert!(message.contains("out of memory"), "{message}");
        }
        other => panic!("expected a located error, got {other:?}"),
    }
    let shown = outcome.error.as_ref().unwrap().to_string();
    assert!(
        shown.starts_with(&format!(
            "{}:{}: replay stopped at event {}",
            t.source,
            failed + 3,
            failed + 1
        )),
        "{shown}"
    );
    // The allocator is still consistent and usable after the failure.
    alloc.check_invariants().unwrap();
    let s = Stream {
        device: DEVICE,
        index: 0,
    };
    let p = alloc.raw_alloc(4096, s).unwrap();
    alloc.raw_free(p).unwrap();
    alloc.empty_cache().unwrap();
    alloc.check_invariants().unwrap();

    // The same through `replay` with a capacity (instant: the allocator above has no
    // device model either).
    let opts = ReplayOptions {
        config: AllocatorConfig {
            debug_checks: false,
            ..AllocatorConfig::default()
        },
        capacity: Some(capacity),
        device_model: DeviceModel::Instant,
        ..ReplayOptions::default()
    };
    let again = trace::replay(&t, &opts);
    assert!(again.is_out_of_memory());
    assert_eq!(again.report.ops, r.ops, "replays are deterministic");
    assert!(again.into_result().is_err());
}

#[test]
fn streams_map_to_separate_pools_and_cache_is_reused() {
    // PyTorch's behaviour: every segment stays cached until empty_cache or an OOM.
    let pytorch_like = AllocatorConfig {
        release_at_peak: false,
        ..AllocatorConfig::default()
    };

    // Same stream: the second allocation reuses the cached block.
    let same = trace::parse_bytes("same", b"a 0 1000 0\nf 0\na 1 1000 0\n").unwrap();
    for config in [AllocatorConfig::default(), pytorch_like.clone()] {
        let alloc = allocator(GIB, config);
        let r = trace::replay_into(&same, &alloc).into_result().unwrap();
        assert_eq!(r.device_allocs, 1);
        assert_eq!(r.peak_allocated_bytes, 1000);
        assert_eq!(
            r.peak_reserved_bytes,
            2 * MIB,
            "small requests come from 2 MiB segments"
        );
        alloc.check_invariants().unwrap();
    }

    // Another stream: its own pool, so the cached block of stream 0 cannot serve it.
    let other = trace::parse_bytes("other", b"a 0 1000 0\nf 0\na 1 1000 7\n").unwrap();
    let alloc = allocator(GIB, pytorch_like);
    let r = trace::replay_into(&other, &alloc).into_result().unwrap();
    assert_eq!(r.device_allocs, 2);
    assert_eq!(r.peak_reserved_bytes, 4 * MIB, "both segments held");
    alloc.check_invariants().unwrap();
    // With release_at_peak, stream 0's idle segment is given back first...
    let plain = AllocatorConfig {
        expandable_segments: false,
        ..AllocatorConfig::default()
    };
    let alloc = allocator(GIB, plain);
    let r = trace::replay_into(&other, &alloc).into_result().unwrap();
    assert_eq!(r.device_allocs, 2);
    assert_eq!(r.peak_reserved_bytes, 2 * MIB);
    alloc.check_invariants().unwrap();
    // ...and with expandable segments (the default) its idle page moves to stream 7.
    let alloc = allocator(GIB, AllocatorConfig::default());
    let r = trace::replay_into(&other, &alloc).into_result().unwrap();
    assert_eq!(r.device_allocs, 1);
    assert_eq!(r.peak_reserved_bytes, 2 * MIB);
    alloc.check_invariants().unwrap();
}

#[test]
fn zero_byte_allocations_replay() {
    let t = trace::parse_bytes("zero", b"a 0 0 0\na 1 0 1\nf 0\nf 1\n").unwrap();
    let alloc = allocator(GIB, AllocatorConfig::default());
    let r = trace::replay_into(&t, &alloc).into_result().unwrap();
    assert_eq!(r.ops, 4);
    assert_eq!(r.peak_allocated_bytes, 0);
    assert_eq!(r.ratio(), None);
    alloc.check_invariants().unwrap();
}

#[test]
fn a_hand_built_invalid_trace_stops_at_the_bad_event() {
    // Built without `Trace::from_ops`, so never validated: the replay checks as it goes and
    // stops at the bad event, after replaying the ones before it.
    let cases = [
        (
            vec![
                TraceOp::Alloc {
                    id: 1,
                    size: 10,
                    stream: 0,
                },
                TraceOp::Free { id: 2 },
            ],
            vec![5, 9],
            (9, 1, "free of unknown id 2"),
        ),
        (
            vec![TraceOp::Alloc {
                id: 1,
                size: 10,
                stream: 5000,
            }],
            vec![],
            (1, 0, "stream 5000 is over 4095"),
        ),
    ];
    for (ops, lines, (want_line, want_ops, want)) in cases {
        let t = Trace {
            name: "bad".into(),
            ops,
            torch: None,
            lines,
            source: "bad.trace".into(),
            header: trace::Header::default(),
            times: Vec::new(),
        };
        let alloc = allocator(GIB, AllocatorConfig::default());
        let outcome = trace::replay_into(&t, &alloc);
        assert_eq!(outcome.report.ops, want_ops, "{want}");
        assert!(!outcome.report.completed);
        match &outcome.error {
            Some(FormatError::Parse {
                file,
                line,
                message,
            }) => {
                assert_eq!((file.as_str(), *line), ("bad.trace", want_line));
                assert!(message.contains(want), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            outcome.cause.is_none(),
            "an input error, not the allocator's"
        );
        alloc.check_invariants().unwrap();
    }
}

const BIG: u64 = 64 * MIB;

/// A block used on a second stream (`u`), freed, then wanted again on its own stream:
/// whether the second allocation can take it depends on whether the device has passed the
/// second stream's use, i.e. on the device model. Plain segments, as PyTorch's allocator:
/// reuse keeps one segment, no reuse takes a second.
fn cross_stream(marker: Option<u64>, second_at: u64) -> Trace {
    let mut text = format!("#accelrt-trace v2\na 1 {BIG} 0 0\nu 1 1 10\nf 1 20\n");
    if let Some(t) = marker {
        text.push_str(&format!("c 1 {t}\n"));
    }
    text.push_str(&format!("a 2 {BIG} 0 {second_at}\n"));
    trace::parse_bytes("cross", text.as_bytes()).unwrap()
}

#[test]
fn the_device_model_decides_when_a_cross_stream_free_is_reusable() {
    let plain = AllocatorConfig::parse("expandable_segments:false,release_at_peak:false").unwrap();
    let lag = |us| DeviceModel::Lag {
        us: Some(us),
        events: None,
    };
    // (model, marker time, time of the second allocation, capacity, segments of BIG reserved)
    let cases = [
        // No device model: the use on stream 1 is not waited for.
        (DeviceModel::Instant, None, 30, None, 1),
        // Markers: only a marker that came due by the second allocation frees the block.
        (DeviceModel::Markers, None, 30, None, 2),
        (DeviceModel::Markers, Some(25), 30, None, 1),
        (DeviceModel::Markers, Some(30), 30, None, 1),
        (DeviceModel::Markers, Some(40), 30, None, 2),
        // The default model of a timed trace without markers=all is the lag.
        (DeviceModel::Auto, None, 20 + DEFAULT_LAG_US, None, 1),
        (DeviceModel::Auto, None, 20 + DEFAULT_LAG_US - 1, None, 2),
        // Lag: the free's event completes L microseconds after the free.
        (lag(5), None, 30, None, 1),
        (lag(50), None, 30, None, 2),
        (lag(50), Some(21), 30, None, 1),
        // At the device's limit the allocator waits for the pending free (the CPU
        // synchronizes) and reuses the block instead of failing.
        (DeviceModel::Markers, None, 30, Some(BIG + BIG / 2), 1),
    ];
    for (model, marker, second_at, capacity, segments) in cases {
        let t = cross_stream(marker, second_at);
        let opts = ReplayOptions {
            config: plain.clone(),
            device_model: model,
            capacity,
            ..ReplayOptions::default()
        };
        let what = format!("{model} marker {marker:?} second at {second_at} capacity {capacity:?}");
        let r = trace::replay(&t, &opts)
            .into_result()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.peak_reserved_bytes, segments * BIG, "{what}: {r:?}");
        assert_eq!(r.ooms, 0, "{what}");
        assert_eq!(
            (r.record_streams, r.markers),
            (1, u64::from(marker.is_some())),
            "{what}"
        );
        if model != DeviceModel::Instant {
            let calls = r.device_calls.unwrap();
            assert_eq!(
                calls.records, 1,
                "{what}: one event on stream 1 at the free"
            );
            assert_eq!(
                calls.synchronizes >= 1,
                capacity.is_some(),
                "{what}: the CPU waits only at the limit: {calls:?}"
            );
        }
    }
}

#[test]
fn instant_is_the_replay_without_a_device() {
    // `instant` gives the allocator no event source: the same figures as replaying on an
    // allocator built without one.
    for name in ["resnet50_train.trace.gz", "gpt2_train.trace.gz"] {
        let t = shipped(name);
        for conf in ["", "expandable_segments:false", "release_at_peak:false"] {
            let config = AllocatorConfig::parse(conf).unwrap();
            let opts = ReplayOptions {
                config: config.clone(),
                capacity: Some(64 * GIB),
                device_model: DeviceModel::Instant,
                ..ReplayOptions::default()
            };
            let a = trace::replay(&t, &opts).into_result().unwrap();
            let b = trace::replay_into(&t, &allocator(64 * GIB, config))
                .into_result()
                .unwrap();
            assert_eq!(a.device_model, ResolvedModel::Instant);
            assert!(a.device_calls.is_none());
            assert_eq!(
                (
                    a.peak_reserved_bytes,
                    a.peak_allocated_bytes,
                    a.device_allocs
                ),
                (
                    b.peak_reserved_bytes,
                    b.peak_allocated_bytes,
                    b.device_allocs
                ),
                "{name} [{conf}]"
            );
        }
    }
}

#[test]
fn the_model_used_is_reported() {
    let v1 = trace::parse_bytes("v1", b"a 0 10 0\nf 0\n").unwrap();
    let v2 = trace::parse_bytes("v2", b"#accelrt-trace v2\na 0 10 0 0\nf 0 5\n").unwrap();
    let marked = trace::parse_bytes(
        "marked",
        b"#accelrt-trace v2\n#! markers=all\na 0 10 0 0\nf 0 5\nc 0 9\n",
    )
    .unwrap();
    let lag = DeviceModel::Lag {
        us: Some(700),
        events: Some(9),
    };
    // (trace, asked, reported model, source)
    let default_events = format!("lag:{DEFAULT_LAG_EVENTS}ev");
    let default_us = format!("lag:{DEFAULT_LAG_US}us");
    let cases = [
        (
            &v1,
            DeviceModel::Auto,
            default_events.as_str(),
            ModelSource::Default,
        ),
        (
            &v2,
            DeviceModel::Auto,
            default_us.as_str(),
            ModelSource::Default,
        ),
        (&marked, DeviceModel::Auto, "markers", ModelSource::Trace),
        (&v1, lag, "lag:9ev", ModelSource::Asked),
        (&v2, lag, "lag:700us", ModelSource::Asked),
        (&marked, DeviceModel::Instant, "instant", ModelSource::Asked),
    ];
    for (t, asked, model, source) in cases {
        let opts = ReplayOptions {
            device_model: asked,
            ..ReplayOptions::default()
        };
        let r = trace::replay(t, &opts).into_result().unwrap();
        assert_eq!(
            (r.device_model.to_string().as_str(), r.device_model_source),
            (model, source),
            "{} asked {asked}",
            t.name
        );
        assert_eq!(r.total_ops, Some(t.ops.len() as u64));
    }
}

#[test]
fn history_comes_from_the_same_replay() {
    let t = shipped("resnet50_train.trace.gz");
    let input = ReplayInput::from_trace(t.clone(), None);
    for history in [false, true] {
        let opts = ReplayOptions {
            history,
            ..ReplayOptions::default()
        };
        let outcome = input.replay(&opts, &mut |_| {});
        let r = &outcome.report;
        assert!(r.completed && r.history == history, "{r:?}");
        match (&outcome.snapshot, history) {
            (None, false) => {}
            (Some(snap), true) => {
                let tl = Timeline::build(snap, 0);
                assert_eq!(tl.peak_allocated.allocated, r.peak_allocated_bytes);
                assert_eq!(tl.peak_reserved.reserved, r.peak_reserved_bytes);
                assert_eq!(
                    snap.allocator_settings["device_model"],
                    r.device_model.to_string()
                );
            }
            (s, h) => panic!("history {h}: snapshot {}", s.is_some()),
        }
    }
}
