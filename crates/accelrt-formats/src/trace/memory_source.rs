//! [`MemorySource`]: the events of a [`Trace`] already in memory, one at a time, as the
//! streaming reader gives those of a file.

use accelrt_alloc::Frames;

use super::read::TraceEvent;
use super::Trace;
use crate::error::{FormatError, Result};

/// A [`Trace`] in memory, event by event with the frames of each allocation (a replay
/// source; [`Trace::validate`] checks its events through it).
pub(crate) struct MemorySource<'t> {
    pub(super) trace: &'t Trace,
    frames: Option<&'t [Option<Frames>]>,
    next: usize,
}

impl<'t> MemorySource<'t> {
    pub fn new(trace: &'t Trace, frames: Option<&'t [Option<Frames>]>) -> MemorySource<'t> {
        MemorySource {
            trace,
            frames,
            next: 0,
        }
    }

    /// The next event and its frames.
    pub fn next_event(&mut self) -> Result<Option<(TraceEvent, Option<Frames>)>> {
        let t = self.trace;
        let i = self.next;
        let Some(&op) = t.ops.get(i) else {
            return Ok(None);
        };
        let timed = t.is_timed();
        let times = if timed { t.ops.len() } else { 0 };
        if t.times.len() != times {
            return Err(FormatError::Parse {
                file: t.source.clone(),
                line: t.line_of(i),
                message: format!(
                    "the trace has {} times for {} events (version {}): a v2 trace has one \
                     time per event, a v1 trace none",
                    t.times.len(),
                    t.ops.len(),
                    t.header.version
                ),
            });
        }
        self.next += 1;
        let event = TraceEvent {
            op,
            time: timed.then(|| t.times[i]),
            line: t.line_of(i),
        };
        let frames = self.frames.and_then(|f| f.get(i).cloned().flatten());
        Ok(Some((event, frames)))
    }
}
