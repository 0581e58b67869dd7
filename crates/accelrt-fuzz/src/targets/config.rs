//! Configuration strings.

use std::sync::Arc;
use std::time::Duration;

use accelrt::alloc::{AllocatorConfig, CachingAllocator};
use accelrt::backend::host::HostMemory;
use accelrt::Stream;

use super::DEV;
use crate::{Outcome, Target};

fn config_seeds() -> Vec<Vec<u8>> {
    [
        "",
        "expandable_segments:false",
        "max_split_size_mb:128,roundup_power2_divisions:[256:1,512:2,>:8]",
        "roundup_power2_divisions:4",
        "garbage_collection_threshold:0.6,per_process_memory_fraction:0.5",
        "high_watermark_ratio:1.7,low_watermark_ratio:1.4",
        "expandable_page_mb:4,release_at_peak:false",
        "max_non_split_rounding_mb:20,expandable_segments:false,max_split_size_mb:20",
        "debug_checks:true",
        "chunk_div:256,chunk_mb:4,max_chunk_mb:16,move_time_pct:2.5",
        "chunk_div:1,max_chunk_mb:2",
        "chunk_div:off,chunk_mb:8",
        "halving_div:256,chunk_div:64",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Parse a configuration; a valid one must print back to itself and run an allocator.
fn check_config(bytes: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(bytes);
    let config = match AllocatorConfig::parse(&text) {
        Ok(c) => c,
        Err(e) => {
            let m = e.to_string();
            if m.contains("Some(") || m.contains("Failed(") {
                return Err(format!("debug formatting in a message: {m}"));
            }
            return Ok(format!("refused: {m}"));
        }
    };
    let again = AllocatorConfig::parse(&config.to_conf_string()).map_err(|e| {
        format!(
            "'{}' printed from a valid configuration does not parse: {e}",
            config.to_conf_string()
        )
    })?;
    if again.to_conf_string() != config.to_conf_string() {
        return Err(format!(
            "configuration does not survive printing: '{}' then '{}'",
            config.to_conf_string(),
            again.to_conf_string()
        ));
    }
    let a = match CachingAllocator::new(DEV, Arc::new(HostMemory::new(64 << 20)), None, config) {
        Ok(a) => a,
        Err(e) => return Ok(format!("no allocator: {e}")),
    };
    let stream = Stream {
        device: DEV,
        index: 0,
    };
    let mut live = Vec::new();
    for (i, size) in [512usize, 3 << 20, 1 << 20, 700, 40 << 20, 5 << 20]
        .into_iter()
        .enumerate()
    {
        if let Ok(p) = a.raw_alloc(size, stream) {
            live.push(p);
        }
        if i % 2 == 1 {
            if let Some(p) = live.pop() {
                a.raw_free(p)
                    .map_err(|e| format!("freeing a live pointer failed: {e}"))?;
            }
        }
    }
    for p in live {
        a.raw_free(p)
            .map_err(|e| format!("freeing a live pointer failed: {e}"))?;
    }
    a.empty_cache()
        .map_err(|e| format!("empty_cache failed: {e}"))?;
    a.check_invariants()
        .map_err(|e| format!("invariant broken: {e}"))?;
    Ok(format!("ran {}", a.config().to_conf_string()))
}

/// `ACCELRT_ALLOC_CONF` / `--alloc-conf` strings.
pub const CONFIG: Target = Target {
    name: "config",
    about: "allocator configuration strings: parse, print back, run an allocator under them",
    seeds: config_seeds,
    run: check_config,
    max_len: 8 << 10,
    dictionary: &[
        b",",
        b":",
        b"[",
        b"]",
        b">",
        b"max_split_size_mb",
        b"roundup_power2_divisions",
        b"expandable_segments",
        b"expandable_page_mb",
        b"garbage_collection_threshold",
        b"per_process_memory_fraction",
        b"high_watermark_ratio",
        b"low_watermark_ratio",
        b"release_at_peak",
        b"max_non_split_rounding_mb",
        b"true",
        b"false",
        b"True",
        b"1",
    ],
    case_timeout: Duration::from_secs(20),
};
