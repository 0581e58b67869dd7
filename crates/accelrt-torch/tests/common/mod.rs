//! Shared by the accelrt-torch tests: where the built library is, what the header declares.

#![allow(dead_code)] // each test binary uses a part

use std::path::{Path, PathBuf};

/// The cdylib cargo built with this test (`libaccelrt_torch.so`, beside the test executable
/// in `deps/` or one level up).
pub fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the test executable has a folder");
    let candidates = [
        deps.join("libaccelrt_torch.so"),
        deps.parent()
            .map(|p| p.join("libaccelrt_torch.so"))
            .unwrap_or_default(),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "libaccelrt_torch.so was not built next to the tests (looked at {candidates:?}): \
                 the crate's crate-type must include cdylib"
            )
        })
}

/// The crate's root.
pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The functions `include/accelrt_torch.h` declares, in order.
pub fn header_functions() -> Vec<String> {
    let header = std::fs::read_to_string(crate_dir().join("include/accelrt_torch.h"))
        .expect("include/accelrt_torch.h is readable");
    let mut names = Vec::new();
    for line in header.lines() {
        let line = line.trim_start();
        if line.starts_with("typedef") || line.starts_with('*') || line.starts_with("/*") {
            continue;
        }
        if let Some(start) = line.find("accelrt_torch_") {
            let rest = &line[start..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if rest[end..].trim_start().starts_with('(') {
                names.push(rest[..end].to_string());
            }
        }
    }
    names
}
