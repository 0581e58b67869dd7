//! Replaying a trace with the allocator's memory history on, to get a [`Snapshot`]: the
//! replay engine of [`crate::trace`] with [`ReplayOptions::history`] set.

use super::Snapshot;
use crate::error::{FormatError, Result};
use crate::trace::{ReplayInput, ReplayOptions, Trace};
use accelrt_alloc::{AllocatorConfig, Frames};

/// What [`replay_recorded`] returns.
#[derive(Debug, Clone)]
pub struct RecordedReplay {
    /// The allocator's state after the last replayed event, with the full history (every
    /// allocator event of the replay, with the frames given for each allocation).
    pub snapshot: Snapshot,
    /// Events replayed (all of them unless the replay stopped).
    pub ops: usize,
    /// Why the replay stopped early (e.g. an out-of-memory at a `--capacity`), naming the
    /// trace line; the snapshot then shows the state at that moment, with the `oom` entry.
    pub error: Option<FormatError>,
}

/// An allocator configuration in the shape of PyTorch snapshots' `allocator_settings` (plus
/// the allocator's name): what accelrt's snapshots carry, from a replay or a live allocator.
pub fn settings_json(config: &AllocatorConfig) -> serde_json::Value {
    serde_json::json!({
        "allocator": "accelrt",
        "PYTORCH_CUDA_ALLOC_CONF": config.to_conf_string(),
        "max_split_size": config
            .max_split_size
            .map_or(-1, |m| i64::try_from(m).unwrap_or(i64::MAX)),
        "garbage_collection_threshold": config.garbage_collection_threshold.unwrap_or(0.0),
        "expandable_segments": config.expandable_segments,
        "release_at_peak": config.release_at_peak,
    })
}

/// Replay `trace` (configured by `opts`, with its device model) with memory history
/// recording every event; `frames[i]` (when given) is the stack recorded with event `i`'s
/// allocation. `progress(done)` is called after every block of events. The same replay as
/// [`crate::trace::replay()`], with history on.
///
/// Errors only when the allocator cannot be built; a replay that stops early returns its
/// snapshot so far with [`RecordedReplay::error`] set.
pub fn replay_recorded(
    trace: &Trace,
    frames: Option<&[Option<Frames>]>,
    opts: &ReplayOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<RecordedReplay> {
    let opts = ReplayOptions {
        history: true,
        history_max_entries: trace.ops.len().saturating_mul(4).saturating_add(1024),
        ..opts.clone()
    };
    let input = ReplayInput::from_trace(trace.clone(), frames.map(<[_]>::to_vec));
    let outcome = input.replay(&opts, &mut |p| progress(p.events));
    match outcome.snapshot {
        Some(snapshot) => Ok(RecordedReplay {
            snapshot,
            ops: outcome.report.ops as usize,
            error: outcome.error,
        }),
        None => Err(outcome.error.unwrap_or_else(|| {
            FormatError::InvalidArgument("the replay recorded no history".into())
        })),
    }
}
