//! Trace text and gzip.

use std::time::Duration;

use accelrt::alloc::AllocatorConfig;
use accelrt::trace::{self, ReplayOptions};

use super::{gzip, shipped_head};
use crate::{Outcome, Target};

fn trace_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = [
        "gpt2_train.trace.gz",
        "resnet50_train.trace.gz",
        "bert_varlen.trace.gz",
        "gpt2_generate.trace.gz",
    ]
    .iter()
    .map(|f| shipped_head(f, 300))
    .filter(|s| s.len() > 1)
    .collect();
    seeds.extend(
        [
            "a 0 1 0\nf 0\n",
            "# accelrt trace v1\n#torch peak_allocated=1024 peak_reserved=2097152 conf=\na 0 512 0\na 1 1048577 1\nf 0\nf 1\n",
            "a 0 281474976710656 0\n",
            "a 0 1 0\na 0 1 0\n",
            "f 7\n",
            "a 0 4096 4095\nf 0\n",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec()),
    );
    seeds
}

/// Parse, and replay what parses (small traces only: the replay engine is the replay
/// engineer's; the point here is that hostile traces are errors, never panics).
fn parse_and_replay(bytes: &[u8]) -> Outcome {
    let trace = match trace::parse_bytes("fuzz.trace", bytes) {
        Ok(t) => t,
        Err(e) => {
            let text = e.to_string();
            if !text.contains("fuzz.trace") {
                return Err(format!("a trace error does not name the file: {text}"));
            }
            return Ok(format!("parse error: {text}"));
        }
    };
    if trace.ops.len() > 2000 {
        return Ok("parsed (large)".into());
    }
    let conf = if bytes.len() % 2 == 0 {
        ""
    } else {
        "expandable_segments:false"
    };
    let opts = ReplayOptions {
        config: AllocatorConfig::parse(conf).expect("a valid configuration"),
        capacity: Some(256 << 20),
        ..ReplayOptions::default()
    };
    let outcome = trace::replay(&trace, &opts);
    Ok(match outcome.error {
        // Shape of what replayed: the feedback for growing varied traces.
        None => format!(
            "replayed 2^{} ops, {} stream(s), torch line {}, {conf}",
            usize::BITS - trace.ops.len().leading_zeros(),
            trace.stream_count().min(9),
            trace.torch.is_some()
        ),
        Some(e) => format!("replay error: {e}"),
    })
}

/// Trace text: `accelrt replay FILE` on a plain trace.
pub const TRACE_TEXT: Target = Target {
    name: "trace_text",
    about: "trace text (v1 format): parse, then replay what parses",
    seeds: trace_seeds,
    run: parse_and_replay,
    max_len: 64 << 10,
    dictionary: &[
        b"a ",
        b"f ",
        b"\n",
        b"#torch ",
        b"peak_allocated=",
        b"peak_reserved=",
        b"conf=",
        b" ",
        b"\t",
        b"\r\n",
        b"#",
        b"-",
        b"+",
    ],
    case_timeout: Duration::from_secs(20),
};

fn gzip_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = trace_seeds().iter().map(|s| gzip(s)).collect();
    // A gzip bomb in miniature: 1 MiB of one repeated event compresses to a few KiB.
    seeds.push(gzip(&b"a 0 1 0\nf 0\n".repeat(90_000)));
    // A bomb of zeros.
    seeds.push(gzip(&vec![0u8; 1 << 20]));
    // Two gzip members back to back.
    let mut two = gzip(b"a 0 1 0\n");
    two.extend(gzip(b"f 0\n"));
    seeds.push(two);
    seeds
}

/// Gzip traces: the same, through the decompressor.
pub const TRACE_GZIP: Target = Target {
    name: "trace_gzip",
    about: "gzip-compressed traces (bombs, corrupt members, truncation): parse, then replay",
    seeds: gzip_seeds,
    run: parse_and_replay,
    max_len: 64 << 10,
    dictionary: &[
        b"\x1f\x8b\x08\x00",
        b"\x00\x00\x00\x00",
        b"\xff\xff\xff\xff",
    ],
    case_timeout: Duration::from_secs(20),
};
