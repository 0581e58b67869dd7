//! Host events: a recorded event is a position `(stream, seq)`; it has completed when the
//! stream's worker has finished `seq` items. A timing event also queues a marker that the
//! worker stamps with a monotonic clock when it reaches it.

use std::sync::Arc;

use parking_lot::Mutex;

use super::stream::{Mark, StreamShared};
use crate::driver::EventCallback;
use crate::error::{DeviceError, DeviceResult};

/// Where an event was last recorded.
#[derive(Clone)]
pub(super) struct Position {
    pub(super) stream: Arc<StreamShared>,
    pub(super) seq: u64,
    /// The marker of a timing event.
    pub(super) mark: Option<Arc<Mark>>,
}

impl Position {
    #[inline]
    pub(super) fn reached(&self) -> bool {
        self.stream.reached(self.seq)
    }
}

/// A host event.
pub struct HostEvent {
    timing: bool,
    position: Mutex<Option<Position>>,
}

impl std::fmt::Debug for HostEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pos = self.position.lock();
        f.debug_struct("HostEvent")
            .field("timing", &self.timing)
            .field("stream", &pos.as_ref().map(|p| p.stream.id))
            .field("seq", &pos.as_ref().map(|p| p.seq))
            .finish()
    }
}

impl HostEvent {
    pub(super) fn new(timing: bool) -> Self {
        HostEvent {
            timing,
            position: Mutex::new(None),
        }
    }

    /// Whether the event records completion times.
    pub fn timing(&self) -> bool {
        self.timing
    }

    /// Mark the current end of `stream`. Non-timing: no queue traffic at all.
    #[inline]
    pub(super) fn record(&self, stream: &Arc<StreamShared>) -> DeviceResult<()> {
        let position = if self.timing {
            let (mark, seq) = stream.push_mark()?;
            Position {
                stream: Arc::clone(stream),
                seq,
                mark: Some(mark),
            }
        } else {
            Position {
                stream: Arc::clone(stream),
                seq: stream.end(),
                mark: None,
            }
        };
        *self.position.lock() = Some(position);
        Ok(())
    }

    /// Mark a point of a graph capture: nothing on the device to reach (the runtime never
    /// queries such an event; a wait for it has nothing to wait for).
    pub(super) fn record_captured(&self) {
        *self.position.lock() = None;
    }

    /// When the completed timing event completed, in ns on accelrt's clock.
    pub(super) fn completion_ns(&self) -> DeviceResult<u64> {
        self.stamp("").map(|t| t - 1)
    }

    /// The recorded position (`None`: never recorded).
    #[inline]
    pub(super) fn position(&self) -> Option<Position> {
        self.position.lock().clone()
    }

    /// True once reached; true when never recorded.
    #[inline]
    pub(super) fn query(&self) -> bool {
        match &*self.position.lock() {
            Some(p) => p.reached(),
            None => true,
        }
    }

    pub(super) fn synchronize(&self) -> DeviceResult<()> {
        match self.position() {
            // Complete: nothing to wait for, even from the stream's own worker (a callback).
            Some(p) if !p.reached() => {
                p.stream
                    .check_not_worker("synchronize an event recorded on")?;
                p.stream.wait_for(p.seq);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    pub(super) fn notify(&self, callback: EventCallback) {
        match self.position() {
            Some(p) => p.stream.on_reached(p.seq, callback),
            None => callback(),
        }
    }

    /// The completion stamp of a completed timing event (`which`: "start " or "end " in
    /// messages, or nothing).
    fn stamp(&self, which: &str) -> DeviceResult<u64> {
        let pos = self.position().ok_or_else(|| {
            DeviceError::Event(format!(
                "the {which}event was never recorded: record it on a stream first"
            ))
        })?;
        let mark = pos.mark.as_ref().ok_or_else(|| {
            DeviceError::Event(format!(
                "the {which}event was not recorded with timing: events were not created with enable_timing=true"
            ))
        })?;
        match (pos.reached(), mark.get()) {
            (true, Some(t)) => Ok(t),
            _ => Err(DeviceError::Event(format!(
                "the {which}event has not completed yet: synchronize it (or its stream) before asking for its time"
            ))),
        }
    }

    /// Milliseconds from `start` to `end`, both completed timing events.
    pub(super) fn elapsed_ms(start: &HostEvent, end: &HostEvent) -> DeviceResult<f64> {
        let t0 = start.stamp("start ")?;
        let t1 = end.stamp("end ")?;
        if t1 < t0 {
            return Err(DeviceError::Event(format!(
                "the end event was not recorded after the start event: it completed {:.3} ms earlier",
                (t0 - t1) as f64 / 1e6
            )));
        }
        Ok((t1 - t0) as f64 / 1e6)
    }
}
