//! The trace reader on hostile input, round trips, and the shipped traces.
//!
//! `v1.rs`: version-1 traces (hostile input, round trips, detection, the shipped traces,
//! fuzzing); `v2.rs`: version-2 traces (hostile input, headers, round trips).

use accelrt::FormatError;
use std::io::Write;

use accelrt::trace::{self, TorchPeaks, Trace, TraceOp};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Parse `input` and return (line, message) of the error it must produce.
fn parse_error(input: &[u8]) -> (u64, String) {
    match trace::parse_bytes("hostile", input) {
        Ok(t) => panic!(
            "input {:?} parsed to {} ops; expected an error",
            String::from_utf8_lossy(input),
            t.ops.len()
        ),
        Err(FormatError::Parse {
            file,
            line,
            message,
        }) => {
            assert_eq!(file, "hostile");
            (line, message)
        }
        Err(other) => panic!("expected a parse error, got {other:?}"),
    }
}

fn shipped(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../traces")
        .join(name)
}

mod v1;
mod v2;
