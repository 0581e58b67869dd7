//! Replaying a trace with the allocator's memory history on, to get a [`Snapshot`]: the
//! replay engine of [`crate::trace`] with [`ReplayOptions::history`] set.

use super::Snapshot;
use crate::error::{FormatError, Result};
use crate::trace::{ReplayInput, ReplayOptions, Trace};
use accelrt_alloc::Frames;

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
