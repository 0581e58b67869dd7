//! The `accelrt` binary end to end: replay, bench and info, in JSON and as tables.

use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;
use common::{accelrt, shipped, stderr, stdout};

/// A scratch file unique to this test run.
fn scratch(name: &str, contents: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

const REPLAY_KEYS: [&str; 10] = [
    "trace",
    "config",
    "ops",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "ratio",
    "device_allocs",
    "ooms",
    "ns_per_call",
    "torch_peak_reserved_bytes",
];

#[test]
fn replay_json_has_one_line_per_trace_and_config() {
    let resnet = shipped("resnet50_train.trace.gz");
    let small = scratch(
        "small.trace",
        b"# no torch header\na 0 1000 0\na 1 3000000 1\nf 0\n",
    );
    let out = accelrt(&[
        "replay",
        "--json",
        &resnet,
        small.to_str().unwrap(),
        "--alloc-conf",
        "",
        "--alloc-conf",
        "max_split_size_mb:64,debug_checks:false",
    ]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(lines.len(), 4, "2 traces x 2 configs");
    for v in &lines {
        for key in REPLAY_KEYS {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        assert_eq!(v["completed"], true, "{v}");
        assert_eq!(v["ooms"], 0, "{v}");
        assert!(
            v["peak_reserved_bytes"].as_u64().unwrap()
                >= v["peak_allocated_bytes"].as_u64().unwrap()
        );
        assert!(v["ratio"].as_f64().unwrap() >= 1.0);
    }
    assert_eq!(lines[0]["trace"], "resnet50_train");
    assert_eq!(lines[0]["config"], "default");
    assert_eq!(
        lines[1]["config"],
        "max_split_size_mb:64,debug_checks:false"
    );
    assert_eq!(lines[0]["ops"], 9685);
    assert_eq!(lines[0]["peak_allocated_bytes"], 3_192_592_912u64);
    assert_eq!(lines[0]["torch_peak_reserved_bytes"], 3_797_942_272u64);
    assert_eq!(lines[2]["trace"], "small");
    assert_eq!(lines[2]["ops"], 3);
    assert_eq!(lines[2]["peak_allocated_bytes"], 3_001_000);
    assert!(lines[2]["torch_peak_reserved_bytes"].is_null());
    // Expandable segments (the default) count pages: 1000 B takes one, 3 MB two.
    assert_eq!(
        lines[2]["device_allocs"], 3,
        "pages under each stream's block"
    );
}

#[test]
fn replay_table_shows_pytorch_side_by_side() {
    let out = accelrt(&[
        "replay",
        &shipped("resnet50_train.trace.gz"),
        "--alloc-conf",
        "debug_checks:false",
    ]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("resnet50_train"), "{text}");
    assert!(text.contains("9,685 events"), "{text}");
    assert!(
        text.contains("peak reserved") && text.contains("ns/call"),
        "{text}"
    );
    // Every driver call of the configuration, as `--json`'s `driver_calls.total` counts it.
    let json = accelrt(&[
        "replay",
        "--json",
        &shipped("resnet50_train.trace.gz"),
        "--alloc-conf",
        "debug_checks:false",
    ]);
    let total = serde_json::from_str::<Value>(stdout(&json).lines().next().unwrap()).unwrap()
        ["driver_calls"]["total"]
        .as_u64()
        .unwrap();
    assert!(
        text.contains("driver calls") && text.replace(',', "").contains(&format!(" {total} ")),
        "{total} driver calls: {text}"
    );
    assert!(text.contains("PyTorch (native, recorded)"), "{text}");
    assert!(
        text.contains("1.190x"),
        "PyTorch's own ratio 3797942272/3192592912: {text}"
    );
}

#[test]
fn garbage_file_fails_naming_the_line() {
    let garbage = scratch(
        "garbage.trace",
        b"# a comment\na 0 100 0\nthis is not an event\n",
    );
    let out = accelrt(&["replay", "--json", garbage.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:3: unknown event 'this'", garbage.display())),
        "{err}"
    );
    // The replay streams the file: it stops at the bad line, after the event before it.
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(
        (v["ops"].as_u64(), v["completed"].as_bool()),
        (Some(1), Some(false))
    );
    assert!(v["total_ops"].is_null(), "{v}");
    assert!(
        v["error"].as_str().unwrap().contains(":3: unknown event"),
        "{v}"
    );

    let binary = scratch(
        "binary.trace.gz",
        &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xde, 0xad],
    );
    let out = accelrt(&["replay", binary.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(":1: the gzip data is"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_bad_file_does_not_hide_the_good_ones() {
    let good = scratch("good.trace", b"a 0 4096 0\nf 0\n");
    let out = accelrt(&[
        "replay",
        "--json",
        "/nonexistent/x.trace",
        good.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/x.trace: cannot open the trace file"),
        "{}",
        stderr(&out)
    );
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "the good trace is still replayed");
    let v: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["trace"], "good");
}

#[test]
fn small_capacity_gives_an_oom_naming_the_line() {
    let out = accelrt(&[
        "replay",
        "--json",
        "--capacity",
        "1GiB",
        &shipped("resnet50_train.trace.gz"),
    ]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["completed"], false);
    assert!(v["ooms"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["capacity_bytes"], 1u64 << 30);
    let err = stderr(&out);
    assert!(
        err.contains("resnet50_train.trace.gz:") && err.contains("replay stopped at event"),
        "{err}"
    );
    assert!(
        err.contains("out of memory") && err.contains("larger --capacity"),
        "{err}"
    );
}

#[test]
fn bad_options_are_clear_errors() {
    let trace = shipped("resnet50_train.trace.gz");
    let out = accelrt(&["replay", &trace, "--capacity", "24XB"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("capacity '24XB' has an unknown unit 'XB'"),
        "{}",
        stderr(&out)
    );
    let out = accelrt(&["replay", &trace, "--alloc-conf", "bogus:1"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--alloc-conf 'bogus:1': unknown option 'bogus'"),
        "{}",
        stderr(&out)
    );
    let out = accelrt(&["replay"]);
    assert!(!out.status.success(), "a file is required");
}

#[test]
fn bench_json_quick_is_one_object_with_the_keys() {
    let out = accelrt(&["bench", "--json", "--quick", "--threads", "3"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.trim().lines().count(), 1, "one JSON object: {text}");
    let v: Value = serde_json::from_str(text.trim()).unwrap();
    for key in [
        "fast_path_pair_ns",
        "system_malloc_pair_ns",
        "random_ns_per_call",
        "random_ratio",
        "random_1mib_ns_per_call",
        "random_1mib_ratio",
        "multi_thread",
        "machine",
        "date",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    for table in ["fast_path_pair_ns", "system_malloc_pair_ns"] {
        for size in [
            "512",
            "4096",
            "1048576",
            "2097152",
            "20971520",
            "67108864",
            "1073741824",
        ] {
            let ns = v[table][size]
                .as_f64()
                .unwrap_or_else(|| panic!("{table}[{size}] in {v}"));
            assert!(ns > 0.0 && ns.is_finite(), "{table}[{size}] = {ns}");
        }
    }
    for key in ["random_ns_per_call", "random_1mib_ns_per_call"] {
        assert!(v[key].as_f64().unwrap() > 0.0);
    }
    for key in ["random_ratio", "random_1mib_ratio"] {
        let r = v[key].as_f64().unwrap();
        assert!((1.0..4.0).contains(&r), "{key} = {r}");
    }
    let m = &v["multi_thread"];
    assert_eq!(m["threads"], 3);
    for key in [
        "pairs_per_sec_total",
        "single_thread_pairs_per_sec",
        "scaling",
        "private_allocators_pairs_per_sec_total",
        "private_allocators_scaling",
        "slowest_thread_ns_per_pair",
        "single_thread_ns_per_pair",
        "private_allocators_slowest_thread_ns_per_pair",
    ] {
        assert!(m[key].as_f64().unwrap() > 0.0, "{key} in {m}");
    }
    assert!(m["start_spread_us"].as_f64().unwrap() >= 0.0, "{m}");
    assert!(v["machine"]["cores"].as_u64().unwrap() >= 1);
    assert_eq!(v["quick"], true);
}

#[test]
fn info_json_lists_the_host_backend() {
    let out = accelrt(&["info", "--json"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let backends = v["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no backends list in {v}"));
    let host = backends
        .iter()
        .find(|b| b["name"] == "host")
        .unwrap_or_else(|| panic!("no host backend in {v}"));
    assert_eq!(host["available"], true, "{host}");
    assert!(host["device_count"].as_u64().unwrap() >= 1, "{host}");
    assert!(
        host["devices"][0]["total_memory"].as_u64().unwrap() > 0,
        "{host}"
    );
    // Every backend is listed, available or not, with a reason when it is not.
    for b in backends {
        if b["available"] == false {
            assert!(b["reason"].as_str().is_some_and(|r| !r.is_empty()), "{b}");
        }
    }
}
