//! The CLI fuzz target (`--capacity` size strings and `--alloc-conf` strings, end to end
//! through the built binary) for a short fixed-seed budget; see `accelrt-fuzz`.

use std::time::Duration;

use accelrt_fuzz::targets::{by_name, BIN_ENV};
use accelrt_fuzz::{fuzz, Budget};

#[test]
fn fuzz_cli_sizes_and_configurations() {
    std::env::set_var(BIN_ENV, env!("CARGO_BIN_EXE_accelrt"));
    let target = by_name("cli").expect("the cli target");
    let report = fuzz(
        target,
        0x1313_2026,
        Budget {
            cases: Some(500),
            time: Duration::from_secs(25),
        },
        Some(&std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes")),
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
    assert!(unknown.is_empty(), "{unknown:#?}");
}
