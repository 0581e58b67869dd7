//! Memory snapshots: PyTorch's pickle read and written, imported as traces, recorded from a
//! replay, drawn; hostile files are errors that say where.

use accelrt::FormatError;
use std::path::{Path, PathBuf};
use std::process::Command;

use accelrt::alloc::TraceAction;
use accelrt::snapshot::pickle::PickleWriter;
use accelrt::snapshot::{self, HtmlOptions, Snapshot, Timeline};
use accelrt::trace::{self, ReplayOptions};
use serde_json::{json, Value};

/// Peak of live requested bytes of the shipped snapshot (traces/FORMAT.md).
const MLP_PEAK: u64 = 237_080_576;

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../traces/mlp_train.snapshot.pickle")
}

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(fixture_path()).expect("traces/mlp_train.snapshot.pickle is shipped")
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("snapshot_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn the_pytorch_fixture_imports_and_replays_to_its_recorded_peak() {
    let snap = snapshot::load(fixture_path()).unwrap();
    assert_eq!(snap.segments.len(), 16);
    assert_eq!(snap.device_traces.len(), 1);
    let entries = &snap.device_traces[0];
    assert_eq!(entries.len(), 374);
    let count = |a: TraceAction| entries.iter().filter(|e| e.action == a).count();
    assert_eq!(count(TraceAction::Alloc), 130);
    assert_eq!(count(TraceAction::FreeRequested), 114);
    assert_eq!(count(TraceAction::SegmentAlloc), 16);
    // Frames survive: the Python frames of the recorded script are there.
    let frames = entries[1]
        .frames
        .as_ref()
        .expect("the fixture recorded frames");
    assert!(frames
        .iter()
        .any(|f| f.filename == "snapshots.py" && f.name == "mlp_train"));
    assert_eq!(snap.allocator_settings["PYTORCH_CUDA_ALLOC_CONF"], "");
    assert_eq!(snap.external_annotations.len(), 20);

    let traces = snap
        .traces("mlp_train", "mlp_train.snapshot.pickle")
        .unwrap();
    assert_eq!(traces.len(), 1);
    let t = &traces[0];
    assert_eq!(t.trace.ops.len(), 130 + 114);
    assert_eq!(t.frames.len(), t.trace.ops.len());
    assert_eq!(trace::peak_live_bytes(&t.trace), MLP_PEAK);
    let torch = t.trace.torch.as_ref().unwrap();
    assert_eq!(torch.peak_allocated, Some(MLP_PEAK));
    assert_eq!(torch.conf.as_deref(), Some("native"));
    let segments: u64 = snap.segments.iter().map(|s| s.total_size).sum();
    assert!(torch.peak_reserved.unwrap() >= segments);

    let report = trace::replay(&t.trace, &ReplayOptions::default())
        .into_result()
        .unwrap();
    assert_eq!(report.peak_allocated_bytes, MLP_PEAK);
    assert!(report.peak_reserved_bytes >= MLP_PEAK);

    // The timeline reconstructed from the history agrees.
    let tl = Timeline::build(&snap, 0);
    assert_eq!(tl.peak_allocated.allocated, MLP_PEAK);
    assert_eq!(
        tl.initial,
        (0, 0),
        "the fixture's history starts with the run"
    );
    assert_eq!(Some(tl.peak_reserved.reserved), torch.peak_reserved);
}

#[test]
fn recorded_replays_round_trip_through_pickle_and_json() {
    let snap = snapshot::load(fixture_path()).unwrap();
    let t = snap.traces("mlp", "mlp").unwrap().remove(0);
    let rec = snapshot::replay_recorded(
        &t.trace,
        Some(&t.frames),
        &ReplayOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert!(rec.error.is_none());
    assert_eq!(rec.ops, t.trace.ops.len());
    let ours = rec.snapshot;
    // The snapshot is taken at the end, with the full history and the frames given.
    let h = &ours.device_traces[0];
    assert_eq!(
        h.iter().filter(|e| e.action == TraceAction::Alloc).count(),
        130
    );
    assert_ne!(
        h.last().unwrap().action,
        TraceAction::Snapshot,
        "a snapshot's own marker lands in the next snapshot"
    );
    assert!(h
        .iter()
        .filter(|e| e.action == TraceAction::Alloc)
        .all(|e| e.frames.is_some()));
    assert_eq!(Timeline::build(&ours, 0).peak_allocated.allocated, MLP_PEAK);

    let back = Snapshot::from_pickle("ours.pickle", &ours.to_pickle()).unwrap();
    // (compared without printing: the entries carry long stacks)
    assert!(
        back.segments == ours.segments,
        "segments differ after a pickle round trip"
    );
    assert!(
        back.device_traces == ours.device_traces,
        "history differs after a pickle round trip"
    );
    assert_eq!(back.allocator_settings, ours.allocator_settings);
    let back = Snapshot::from_json("ours.json", ours.to_json().as_bytes()).unwrap();
    assert!(back == ours, "snapshot differs after a JSON round trip");

    // An imported file exported again keeps PyTorch's raw stream handles and entries.
    let again = Snapshot::from_pickle("again", &snap.to_pickle()).unwrap();
    assert!(
        again.device_traces == snap.device_traces,
        "history differs after re-export"
    );
    assert!(
        again.segments == snap.segments,
        "segments differ after re-export"
    );
    assert_eq!(again.external_annotations, snap.external_annotations);
}

/// Python's own `pickle.load` reads what we write, with PyTorch's keys and our figures.
#[test]
fn python_reads_our_pickles() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("SKIPPED python_reads_our_pickles: python3 is not installed, so Python's pickle cannot be checked");
        return;
    }
    let tr = trace::parse_bytes("small", b"a 0 1000 0\na 1 3000000 1\nf 0\na 2 512 0\n").unwrap();
    let rec = snapshot::replay_recorded(&tr, None, &ReplayOptions::default(), &mut |_| {}).unwrap();
    let ours = scratch("small.pickle");
    rec.snapshot.save(&ours).unwrap();
    let exported = scratch("mlp_again.pickle");
    snapshot::load(fixture_path())
        .unwrap()
        .save(&exported)
        .unwrap();
    let script = r#"
import pickle, sys, json
d = pickle.load(open(sys.argv[1], "rb"))
assert set(d) == {"segments", "device_traces", "allocator_settings", "external_annotations"}, d.keys()
seg_keys = {"address", "total_size", "allocated_size", "active_size", "requested_size", "stream",
            "segment_type", "segment_pool_id", "is_expandable", "device", "frames", "blocks"}
for s in d["segments"]:
    assert set(s) - {"unmapped"} == seg_keys, set(s) ^ seg_keys  # accelrt adds "unmapped"
    assert s["segment_type"] in ("small", "large") and isinstance(s["segment_pool_id"], tuple)
    assert sum(b["size"] for b in s["blocks"]) == s["total_size"]
    for b in s["blocks"]:
        assert set(b) == {"address", "size", "requested_size", "state", "frames"}
entry_keys = {"action", "addr", "size", "stream", "time_us", "frames", "compile_context", "user_metadata"}
for e in d["device_traces"][0]:
    keys = set(e) - {"device_free"} | ({"addr"} if e["action"] == "oom" else set())
    assert keys == entry_keys, keys ^ entry_keys
live, peak = 0, 0
for e in d["device_traces"][0]:
    if e["action"] == "alloc": live += e["size"]; peak = max(peak, live)
    if e["action"] == "free_requested": live -= e["size"]
print(json.dumps({"segments": len(d["segments"]), "entries": len(d["device_traces"][0]), "peak": peak,
                  "streams": sorted({e["stream"] for e in d["device_traces"][0] if e["action"] == "alloc"})}))
"#;
    let run = |path: &Path| -> Value {
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "python3 failed on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = run(&ours);
    assert_eq!(v["segments"], rec.snapshot.segments.len());
    assert_eq!(v["entries"], rec.snapshot.device_traces[0].len());
    assert_eq!(v["peak"], 3_001_000u64);
    assert_eq!(v["streams"], json!([0, 1]));
    let v = run(&exported);
    assert_eq!(v["entries"], 374);
    assert_eq!(v["peak"], MLP_PEAK);
    // The original file, through the same script, gives the same figures.
    assert_eq!(run(&fixture_path()), v);
}

/// A minimal PyTorch-layout snapshot with the given device trace entries.
fn pickle_of(doc: &Value) -> Vec<u8> {
    let mut w = PickleWriter::new();
    w.json(doc);
    w.finish()
}

fn doc(entries: Value) -> Value {
    json!({"segments": [], "device_traces": [entries]})
}

fn alloc(addr: u64, size: Value) -> Value {
    json!({"action": "alloc", "addr": addr, "size": size, "stream": 0, "time_us": 1})
}

fn free(addr: u64) -> Value {
    json!({"action": "free_requested", "addr": addr, "size": 16, "stream": 0, "time_us": 2})
}

#[test]
fn hostile_snapshots_are_errors_that_say_where() {
    let huge = 1u64 << 60;
    // (case, document, where, what the message says)
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "size is a string",
            doc(json!([alloc(4096, json!("12"))])),
            "device_traces[0][0].size",
            "found str '12'",
        ),
        (
            "negative size",
            doc(json!([alloc(4096, json!(-5))])),
            "device_traces[0][0].size",
            "negative",
        ),
        (
            "huge size",
            doc(json!([alloc(4096, json!(huge))])),
            "device_traces[0][0].size",
            "2^48",
        ),
        (
            "negative address",
            doc(json!([{"action": "alloc", "addr": -1, "size": 1}])),
            "device_traces[0][0].addr",
            "negative",
        ),
        (
            "free of an unknown address",
            doc(json!([alloc(4096, json!(16)), free(8192)])),
            "device_traces[0][1]",
            "no earlier alloc entry",
        ),
        (
            "double free",
            doc(json!([alloc(4096, json!(16)), free(4096), free(4096)])),
            "device_traces[0][2]",
            "double free",
        ),
        (
            "alloc of a live address",
            doc(json!([alloc(4096, json!(16)), alloc(4096, json!(16))])),
            "device_traces[0][1]",
            "still live",
        ),
        (
            "unknown action",
            doc(json!([{"action": "malloc", "addr": 1, "size": 1}])),
            "device_traces[0][0].action",
            "unknown action 'malloc'",
        ),
        (
            "action is a number",
            doc(json!([{"action": 3, "addr": 1, "size": 1}])),
            "device_traces[0][0].action",
            "expected a string",
        ),
        (
            "entry is a list",
            doc(json!([[1, 2]])),
            "device_traces[0][0]",
            "expected a dict",
        ),
        (
            "no allocation",
            doc(json!([])),
            "device_traces",
            "no 'alloc' entry",
        ),
        (
            "missing device_traces",
            json!({"segments": []}),
            "top level",
            "missing key 'device_traces'",
        ),
        (
            "top level is a list",
            json!([1, 2, 3]),
            "top level",
            "expected a dict",
        ),
        (
            "frames are a string",
            doc(json!([{"action": "alloc", "addr": 1, "size": 1, "frames": "x"}])),
            "device_traces[0][0].frames",
            "expected a list",
        ),
        (
            "unknown block state",
            json!({"segments": [{"address": 0, "total_size": 1024, "blocks": [{"size": 1024, "state": "busy"}]}], "device_traces": [[alloc(1, json!(1))]]}),
            "segments[0].blocks[0].state",
            "unknown block state 'busy'",
        ),
        (
            "block outside its segment",
            json!({"segments": [{"address": 0, "total_size": 1024, "blocks": [{"address": 512, "size": 1024, "state": "inactive"}]}], "device_traces": [[alloc(1, json!(1))]]}),
            "segments[0].blocks[0]",
            "outside its segment",
        ),
        (
            "segment size is a float",
            json!({"segments": [{"address": 0, "total_size": 1.5}], "device_traces": []}),
            "segments[0].total_size",
            "found float 1.5",
        ),
    ];
    for (case, document, at, what) in cases {
        let bytes = pickle_of(&document);
        let result = Snapshot::from_pickle("hostile.pickle", &bytes)
            .and_then(|s| s.traces("t", "hostile.pickle"));
        match result {
            Err(FormatError::Snapshot {
                file,
                at: got_at,
                message,
            }) => {
                assert_eq!(file, "hostile.pickle", "{case}");
                assert_eq!(got_at, at, "{case}: {message}");
                assert!(
                    message.contains(what),
                    "{case}: wanted '{what}' in: {message}"
                );
            }
            other => panic!("{case}: expected a snapshot error, got {other:?}"),
        }
    }
}

#[test]
fn damaged_files_are_errors_never_panics() {
    let good = fixture_bytes();
    // (case, bytes, what the message says)
    let mut cases: Vec<(String, Vec<u8>, &str)> = vec![
        ("empty".into(), Vec::new(), "not a memory snapshot"),
        (
            "garbage".into(),
            b"this is not a snapshot\n".to_vec(),
            "not a memory snapshot",
        ),
        (
            "pickle of a class".into(),
            b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x8c\x04eval\x93."
                .to_vec(),
            "STACK_GLOBAL refused",
        ),
        (
            "bad JSON".into(),
            b"{\"format\": ".to_vec(),
            "not a valid accelrt JSON snapshot",
        ),
        (
            "JSON of another format".into(),
            br#"{"format": "x", "version": 1, "segments": [], "device_traces": []}"#.to_vec(),
            "format 'x'",
        ),
    ];
    for cut in (1..good.len()).step_by(good.len() / 40) {
        cases.push((
            format!("truncated at byte {cut}"),
            good[..cut].to_vec(),
            "truncated",
        ));
    }
    for (case, bytes, what) in cases {
        match snapshot::parse_bytes("damaged", &bytes) {
            Err(e @ FormatError::Snapshot { .. }) => {
                assert!(e.to_string().starts_with("damaged: "), "{case}: {e}");
                assert!(
                    e.to_string().contains(what),
                    "{case}: wanted '{what}' in: {e}"
                );
            }
            other => panic!(
                "{case}: expected a snapshot error, got {:?}",
                other.map(|s| s.segments.len())
            ),
        }
    }
}

#[test]
fn the_page_is_self_contained_and_carries_the_figures() {
    let snap = snapshot::load(fixture_path()).unwrap();
    let html = snapshot::render_html(
        &snap,
        &HtmlOptions {
            title: "mlp <train>".into(),
            subtitle: vec!["fixture".into()],
            ..HtmlOptions::default()
        },
    )
    .unwrap();
    assert!(html.starts_with("<!doctype html>"));
    assert!(html.contains("<title>mlp &lt;train&gt; · accelrt memory</title>"));
    for remote in ["http://", "https://", "<link", "src="] {
        assert!(
            !html.contains(remote),
            "the page must not fetch anything ({remote})"
        );
    }
    let start = html
        .find(r#"<script id="data" type="application/json">"#)
        .unwrap();
    let body = &html[start..];
    let json_text = &body[body.find('>').unwrap() + 1..body.find("</script>").unwrap()];
    let data: Value = serde_json::from_str(json_text).unwrap();
    assert_eq!(data["peak_alloc"][1], MLP_PEAK);
    assert_eq!(data["events"], 374);
    assert_eq!(data["allocs"], 130);
    assert_eq!(data["map"]["allocated"], MLP_PEAK);
    // The map at the peak: allocated ranges add up to the live bytes.
    let allocated: u64 = data["map"]["segments"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["r"].as_array().unwrap().iter())
        .filter(|r| r[2] == 0)
        .map(|r| r[1].as_u64().unwrap())
        .sum();
    assert_eq!(allocated, MLP_PEAK);
    let e = snapshot::render_html(
        &snap,
        &HtmlOptions {
            device: Some(3),
            ..HtmlOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("device 3 is not in the snapshot"),
        "{e}"
    );
}

#[test]
fn long_histories_are_downsampled_keeping_the_peak() {
    let tr = trace::load(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../traces/resnet50_train.trace.gz"),
    )
    .unwrap();
    let rec = snapshot::replay_recorded(&tr, None, &ReplayOptions::default(), &mut |_| {}).unwrap();
    let html = snapshot::render_html(
        &rec.snapshot,
        &HtmlOptions {
            columns: 300,
            bands: 50,
            ..HtmlOptions::default()
        },
    )
    .unwrap();
    let start =
        html.find(r#"type="application/json">"#).unwrap() + r#"type="application/json">"#.len();
    let data: Value =
        serde_json::from_str(&html[start..start + html[start..].find("</script>").unwrap()])
            .unwrap();
    assert_eq!(data["cols"]["n"], 300);
    let max = data["cols"]["alloc"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(
        max,
        trace::peak_live_bytes(&tr),
        "the column maxima keep the peak"
    );
    assert_eq!(data["bands"].as_array().unwrap().len(), 50);
    assert!(html.len() < 400_000, "{} bytes", html.len());
}

/// Every allocation a replay makes is in the history it records (the importer, and
/// PyTorch's visualiser, pair each `free_requested` with an earlier `alloc`).
#[test]
fn recorded_history_pairs_every_free_with_an_alloc() {
    let tr = trace::load(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../traces/resnet50_train.trace.gz"),
    )
    .unwrap();
    let rec = snapshot::replay_recorded(&tr, None, &ReplayOptions::default(), &mut |_| {}).unwrap();
    let h = &rec.snapshot.device_traces[0];
    let allocs = h.iter().filter(|e| e.action == TraceAction::Alloc).count();
    assert_eq!(
        allocs,
        tr.alloc_count(),
        "the allocator's history misses {} of the trace's {} allocations (an allocation path \
         that does not record history)",
        tr.alloc_count() - allocs.min(tr.alloc_count()),
        tr.alloc_count()
    );
    let imported = rec.snapshot.traces("resnet", "recorded").unwrap();
    assert_eq!(imported[0].trace.ops.len(), tr.ops.len());
    assert_eq!(
        trace::peak_live_bytes(&imported[0].trace),
        trace::peak_live_bytes(&tr)
    );
}
