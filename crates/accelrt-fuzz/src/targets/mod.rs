//! The targets: one per input surface. See [`ALL`].

mod cabi;
mod cli;
mod config;
mod snapshots;
mod traces;

pub use cabi::{CABI, CABI_THREADS};
pub use cli::{BIN_ENV, CLI};
pub use config::CONFIG;
pub use snapshots::{SNAPSHOT_JSON, SNAPSHOT_PICKLE};
pub use traces::{TRACE_GZIP, TRACE_TEXT};

use std::io::{Read, Write};

use accelrt::{Device, DeviceType};

use crate::{repo_root, Target};

/// Every target, in the order reports list them.
pub const ALL: &[Target] = &[
    TRACE_TEXT,
    TRACE_GZIP,
    SNAPSHOT_PICKLE,
    SNAPSHOT_JSON,
    CONFIG,
    CLI,
    CABI,
    CABI_THREADS,
];

/// A target by name.
pub fn by_name(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}

const DEV: Device = Device {
    kind: DeviceType::Host,
    index: 0,
};

/// The first `lines` lines of a shipped gzip trace, as text.
fn shipped_head(file: &str, lines: usize) -> Vec<u8> {
    let path = repo_root().join("traces").join(file);
    let Ok(f) = std::fs::File::open(&path) else {
        return Vec::new();
    };
    let mut text = String::new();
    let _ = flate2::read::GzDecoder::new(f)
        .take(1 << 20)
        .read_to_string(&mut text);
    let mut out: String = text.lines().take(lines).collect::<Vec<_>>().join("\n");
    out.push('\n');
    out.into_bytes()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("writing to a Vec");
    e.finish().expect("writing to a Vec")
}

fn first_chars(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}
