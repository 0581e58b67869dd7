//! Each fuzz target for a short, fixed-seed budget inside `cargo test` (the same inputs every
//! run). `scripts/fuzz.sh SECONDS` runs them for longer with random seeds; RELIABILITY.md
//! records those campaigns. The CLI target runs from `accelrt-cli`'s tests (it needs the
//! built binary).
//!
//! A finding fails the test with its message and the saved input (under
//! `target/fuzz-crashes/`), unless `accelrt_fuzz::KNOWN` lists it.

use std::path::PathBuf;
use std::time::Duration;

use accelrt_fuzz::targets::by_name;
use accelrt_fuzz::{fuzz, Budget};

/// Fixed seed: CI runs the same cases every time.
const SEED: u64 = 0x1313_2026;

fn crash_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes")
}

fn run(name: &str, cases: u64) {
    let target = by_name(name).expect("a target of that name");
    let report = fuzz(
        target,
        SEED,
        Budget {
            cases: Some(cases),
            // A cap for slow machines; the case count is what makes runs repeatable.
            time: Duration::from_secs(20),
        },
        Some(&crash_dir()),
        6 << 30,
    );
    println!("{}", report.summary());
    for f in &report.findings {
        println!("  {:?} {:?}: {}", f.kind, f.known, f.message);
    }
    let unknown: Vec<String> = report
        .unknown_findings()
        .map(|f| format!("{:?}: {} (input saved to {:?})", f.kind, f.message, f.saved))
        .collect();
    assert!(unknown.is_empty(), "{name}: {unknown:#?}");
    assert!(report.cases > 0, "{name} ran no case");
}

#[test]
fn fuzz_trace_text() {
    run("trace_text", 400);
}

#[test]
fn fuzz_trace_gzip() {
    run("trace_gzip", 120);
}

#[test]
fn fuzz_snapshot_pickle() {
    run("snapshot_pickle", 300);
}

#[test]
fn fuzz_snapshot_json() {
    run("snapshot_json", 300);
}

#[test]
fn fuzz_config() {
    run("config", 600);
}

/// The C ABI targets share the process's C ABI state: one test runs both, in turn.
#[test]
fn fuzz_cabi_single_and_multi_threaded() {
    run("cabi", 60);
    run("cabi_threads", 40);
}
