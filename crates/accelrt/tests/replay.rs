//! Replaying traces through the caching allocator: the shipped traces complete with
//! consistent figures, an undersized device stops with an OOM naming the line, and the
//! allocator stays consistent either way.

use std::sync::Arc;

use accelrt::alloc::{AllocatorConfig, CachingAllocator, MemoryProvider};
use accelrt::backend::host::HostMemory;
use accelrt::trace::{self, ReplayOptions, Trace, TraceOp};
use accelrt::{Device, DeviceType, Error, Stream};

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
    match outcome.error.as_ref().unwrap() {
        Error::Parse {
            file,
            line,
            message,
        } => {
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

    // The same through `replay` with a capacity.
    let opts = ReplayOptions {
        config: AllocatorConfig {
            debug_checks: false,
            ..AllocatorConfig::default()
        },
        capacity: Some(capacity),
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
fn a_hand_built_invalid_trace_is_refused_before_replay() {
    // Built without `Trace::from_ops`, so never validated.
    let t = Trace {
        name: "bad".into(),
        ops: vec![
            TraceOp::Alloc {
                id: 1,
                size: 10,
                stream: 0,
            },
            TraceOp::Free { id: 2 },
        ],
        torch: None,
        lines: vec![5, 9],
        source: "bad.trace".into(),
    };
    let alloc = allocator(GIB, AllocatorConfig::default());
    let outcome = trace::replay_into(&t, &alloc);
    assert_eq!(outcome.report.ops, 0, "nothing is replayed");
    match outcome.error {
        Some(Error::Parse {
            file,
            line,
            message,
        }) => {
            assert_eq!((file.as_str(), line), ("bad.trace", 9));
            assert!(message.contains("free of unknown id 2"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(alloc.stats().counters.num_device_alloc, 0);

    // A stream the allocator does not serve stops the replay at that line.
    let t = Trace {
        name: "wide".into(),
        ops: vec![TraceOp::Alloc {
            id: 1,
            size: 10,
            stream: 5000,
        }],
        torch: None,
        lines: vec![],
        source: "wide.trace".into(),
    };
    let outcome = trace::replay_into(&t, &alloc);
    match outcome.error {
        Some(Error::Parse { line, .. }) => assert_eq!(line, 1),
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(outcome.cause, Some(Error::InvalidStream { .. })),
        "{:?}",
        outcome.cause
    );
    alloc.check_invariants().unwrap();
}
