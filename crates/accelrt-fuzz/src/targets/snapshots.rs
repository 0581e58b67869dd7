//! Snapshots: pickle and JSON.

use std::time::Duration;

use accelrt::alloc::AllocatorConfig;
use accelrt::snapshot::{self, HtmlOptions, Snapshot};
use accelrt::trace::{self, ReplayOptions};

use crate::{repo_root, Outcome, Target};

/// A small real snapshot: the shipped one cut to its first entries and segments.
fn small_real_snapshot() -> Option<Snapshot> {
    let path = repo_root().join("traces/mlp_train.snapshot.pickle");
    let mut snap = snapshot::load(path).ok()?;
    for t in &mut snap.device_traces {
        t.truncate(40);
    }
    snap.segments.truncate(4);
    Some(snap)
}

/// A snapshot accelrt records itself, with expandable segments (segment_map entries).
fn recorded_snapshot() -> Option<Snapshot> {
    let t = trace::parse_bytes(
        "seed",
        b"a 0 1048576 0\na 1 512 0\na 2 3145728 1\nf 1\nf 0\na 3 2048 0\n",
    )
    .ok()?;
    let opts = ReplayOptions {
        config: AllocatorConfig::default(),
        capacity: Some(64 << 20),
        ..ReplayOptions::default()
    };
    snapshot::replay_recorded(&t, None, &opts, &mut |_| {})
        .ok()
        .map(|r| r.snapshot)
}

fn snapshot_seeds(json: bool) -> Vec<Vec<u8>> {
    let snaps: Vec<Snapshot> = [small_real_snapshot(), recorded_snapshot()]
        .into_iter()
        .flatten()
        .collect();
    let mut seeds: Vec<Vec<u8>> = snaps
        .iter()
        .map(|s| {
            if json {
                s.to_json().into_bytes()
            } else {
                s.to_pickle()
            }
        })
        .collect();
    if !json {
        // Code-running pickles: refused.
        seeds.push(b"\x80\x04cos\nsystem\n\x8c\x02id\x85R.".to_vec());
        seeds.push(b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x02id\x85R.".to_vec());
        // Deep nesting.
        let mut deep = b"\x80\x04".to_vec();
        deep.extend(std::iter::repeat_n(b"](".as_slice(), 600).flatten());
        deep.push(b'.');
        seeds.push(deep);
        let path = repo_root().join("traces/mlp_train.snapshot.pickle");
        if let Ok(full) = std::fs::read(path) {
            seeds.push(full[..full.len().min(6000)].to_vec()); // truncated
        }
    }
    seeds
}

/// What must hold for any snapshot input: an error names the file; a snapshot that reads
/// renders, yields traces or a reason, and what accelrt writes of it reads back.
fn check_snapshot(bytes: &[u8]) -> Outcome {
    let snap = match snapshot::parse_bytes("fuzz.snapshot", bytes) {
        Ok(s) => s,
        Err(e) => {
            let text = e.to_string();
            if !text.contains("fuzz.snapshot") {
                return Err(format!("a snapshot error does not name the file: {text}"));
            }
            if text.contains("Failed(") || text.contains("Some(") {
                return Err(format!("debug formatting in a message: {text}"));
            }
            return Ok(format!("read error: {text}"));
        }
    };
    let entries: usize = snap.device_traces.iter().map(Vec::len).sum();
    let traces = match snap.traces("fuzz", "fuzz.snapshot") {
        Ok(t) => format!("{} trace(s)", t.len()),
        Err(e) => format!("no traces: {e}"),
    };
    if entries <= 20_000 {
        for device in snap.devices().into_iter().take(2) {
            let opts = HtmlOptions {
                device: Some(device),
                columns: 200,
                ..HtmlOptions::default()
            };
            snapshot::render_html(&snap, &opts)
                .map_err(|e| format!("rendering a readable snapshot failed: {e}"))?;
        }
    }
    let pickle = snap.to_pickle();
    let back = Snapshot::from_pickle("written.pickle", &pickle)
        .map_err(|e| format!("accelrt's own pickle does not read back: {e}"))?;
    if back.device_traces.len() != snap.device_traces.len()
        || back.segments.len() != snap.segments.len()
    {
        return Err("accelrt's own pickle reads back with other contents".into());
    }
    let json = snap.to_json();
    Snapshot::from_json("written.json", json.as_bytes())
        .map_err(|e| format!("accelrt's own JSON does not read back: {e}"))?;
    Ok(format!(
        "read: {traces}, {} device(s), {} segment(s), 2^{} entries",
        snap.device_traces.len().min(9),
        snap.segments.len().min(9),
        usize::BITS - entries.leading_zeros()
    ))
}

/// Snapshot pickles: `accelrt replay|snapshot render|snapshot convert` on a pickle.
pub const SNAPSHOT_PICKLE: Target = Target {
    name: "snapshot_pickle",
    about: "PyTorch snapshot pickles: read, render, import as traces, write and read back",
    seeds: || snapshot_seeds(false),
    run: check_snapshot,
    max_len: 256 << 10,
    dictionary: &[
        b"(",
        b".",
        b"0",
        b"1",
        b"2",
        b"N",
        b"J",
        b"K",
        b"M",
        b"X",
        b"a",
        b"d",
        b"}",
        b"e",
        b"h",
        b"j",
        b"l",
        b"]",
        b"q",
        b"r",
        b"s",
        b"t",
        b")",
        b"u",
        b"\x85",
        b"\x86",
        b"\x87",
        b"\x88",
        b"\x89",
        b"\x8a",
        b"\x8c",
        b"\x8d",
        b"\x94",
        b"\x95",
        b"c",
        b"R",
        b"\x93",
        b"\x8c\x06action",
        b"\x8c\x04addr",
        b"\x8c\x04size",
        b"\x8c\x06stream",
        b"\x8c\x0bsegment_map",
        b"\x8c\x05alloc",
        b"\x8c\x0efree_requested",
        b"\x8c\x0dsegment_alloc",
        b"\x8c\x08segments",
        b"\x8c\x0ddevice_traces",
    ],
    case_timeout: Duration::from_secs(20),
};

/// accelrt's JSON snapshots.
pub const SNAPSHOT_JSON: Target = Target {
    name: "snapshot_json",
    about: "accelrt JSON snapshots: read, render, import as traces, write and read back",
    seeds: || snapshot_seeds(true),
    run: check_snapshot,
    max_len: 256 << 10,
    dictionary: &[
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"\"",
        b"null",
        b"true",
        b"1e999",
        b"-1",
        b"\"segment_map\"",
        b"\"segment_unmap\"",
        b"\"alloc\"",
        b"\"free_requested\"",
        b"\"segment_alloc\"",
        b"\"segment_free\"",
        b"\"oom\"",
        b"\"addr\":",
        b"\"size\":",
        b"18446744073709547520",
        b"\"unmapped\":",
        b"\\u0000",
    ],
    case_timeout: Duration::from_secs(20),
};
