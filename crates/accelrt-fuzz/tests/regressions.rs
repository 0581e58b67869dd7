//! Every input the fuzzers found that once failed, run again: each file under
//! `regressions/TARGET/` must now pass its target. Add a file there for each finding (the
//! saved input from `fuzz-crashes/`), with its fix.

use std::path::Path;

use accelrt_fuzz::targets::by_name;
use accelrt_fuzz::{run_one, targets::BIN_ENV};

#[test]
fn every_saved_finding_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut ran = 0;
    let mut failures = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("regressions/ exists")
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    dirs.sort_by_key(|e| e.path());
    for dir in dirs {
        let name = dir.file_name().to_string_lossy().into_owned();
        let target =
            by_name(&name).unwrap_or_else(|| panic!("regressions/{name}/ names no fuzz target"));
        if name == "cli" && std::env::var_os(BIN_ENV).is_none() {
            continue; // needs the binary: run by accelrt-cli's tests/fuzz_cli.rs
        }
        let mut files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        files.sort_by_key(|e| e.path());
        for f in files {
            let input = std::fs::read(f.path()).unwrap();
            ran += 1;
            if let Err((kind, message)) = run_one(target, &input) {
                failures.push(format!("{}: {kind:?}: {message}", f.path().display()));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    println!("{ran} saved finding(s) pass");
    assert!(ran > 0, "regressions/ holds the findings of issue 13");
}
