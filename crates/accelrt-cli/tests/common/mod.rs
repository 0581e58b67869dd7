//! Shared by the CLI tests: run the built `accelrt` binary and find the shipped traces.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Run `accelrt` with `args` and wait for it.
pub fn accelrt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_accelrt"))
        .args(args)
        .output()
        .expect("run the accelrt binary")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Path of a file of the repository's `traces/`.
pub fn shipped(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../traces")
        .join(name)
        .display()
        .to_string()
}
