//! [`SimulatedDevice`]: tickets, waits and when each completes.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

use super::MAX_STREAM;
use crate::error::Result;
use accelrt_alloc::stream::Stream;
use accelrt_alloc::{AllocError, StreamEvents};

use super::ResolvedModel;

/// A point in a stream: the ticket recorded on `stream` during event `ordinal` at CPU time
/// `time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Point {
    stream: u32,
    ordinal: u64,
    time: u64,
}

/// `stream` waits on the device for `dep`, for tickets recorded from event `from` on.
#[derive(Debug, Clone, Copy)]
struct Wait {
    from: u64,
    dep: Point,
}

#[derive(Default)]
struct Tickets {
    points: Vec<Option<Point>>,
    free: Vec<u32>,
    /// (waiting stream, stream waited on) → the open wait.
    waits: HashMap<(u32, u32), Wait>,
}

/// Counts of the allocator's calls into the simulated device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ModelCalls {
    /// `record`: events recorded.
    pub records: u64,
    /// `query` calls answered "not yet".
    pub queries_pending: u64,
    /// `query` calls answered "completed".
    pub queries_done: u64,
    /// `synchronize`: the CPU waited for one event.
    pub synchronizes: u64,
    /// `synchronize_device`: the CPU waited for the whole device.
    pub device_synchronizes: u64,
    /// `wait`: a stream waited on the device for an event.
    pub waits: u64,
}

/// A simulated device: the [`StreamEvents`] a replay gives the allocator (see the module
/// documentation for when a ticket completes).
pub struct SimulatedDevice {
    model: ResolvedModel,
    now_ordinal: AtomicU64,
    now_time: AtomicU64,
    /// Per stream: the event up to which markers and synchronizations say it has passed.
    passed: Box<[AtomicU64]>,
    /// The event up to which the whole device has passed (`synchronize_device`).
    device_passed: AtomicU64,
    tickets: Mutex<Tickets>,
    calls: [AtomicU64; 6],
}

/// Deepest chain of waits followed; deeper chains count as not completed (conservative).
const MAX_WAIT_DEPTH: u32 = 16;

impl SimulatedDevice {
    /// A device following `model`, with both clocks at 0.
    pub fn new(model: ResolvedModel) -> SimulatedDevice {
        SimulatedDevice {
            model,
            now_ordinal: AtomicU64::new(0),
            now_time: AtomicU64::new(0),
            passed: (0..=MAX_STREAM).map(|_| AtomicU64::new(0)).collect(),
            device_passed: AtomicU64::new(0),
            tickets: Mutex::new(Tickets::default()),
            calls: Default::default(),
        }
    }

    /// The model it follows.
    pub fn model(&self) -> ResolvedModel {
        self.model
    }

    /// Move the clocks to event `ordinal` at CPU time `time` (before the allocator's call
    /// for that event).
    #[inline]
    pub fn set_now(&self, ordinal: u64, time: u64) {
        self.now_ordinal.store(ordinal, Relaxed);
        self.now_time.store(time, Relaxed);
    }

    /// The CPU time of the event being replayed, in microseconds (0 in an untimed trace).
    pub fn now_us(&self) -> u64 {
        self.now_time.load(Relaxed)
    }

    /// A completion marker came due: the device has passed event `ordinal` on `stream`.
    #[inline]
    pub fn pass(&self, stream: u32, ordinal: u64) {
        if let Some(p) = self.passed.get(stream as usize) {
            p.fetch_max(ordinal, Relaxed);
        }
    }

    /// How often the allocator called in.
    pub fn calls(&self) -> ModelCalls {
        let c = |i: usize| self.calls[i].load(Relaxed);
        ModelCalls {
            records: c(0),
            queries_pending: c(1),
            queries_done: c(2),
            synchronizes: c(3),
            device_synchronizes: c(4),
            waits: c(5),
        }
    }

    fn count(&self, i: usize) {
        self.calls[i].fetch_add(1, Relaxed);
    }

    /// Whether the stream itself has passed `p` (not counting what it waits on).
    fn passed_own(&self, p: Point) -> bool {
        let marked = self
            .passed
            .get(p.stream as usize)
            .is_some_and(|x| p.ordinal <= x.load(Relaxed));
        marked
            || p.ordinal <= self.device_passed.load(Relaxed)
            || match self.model {
                ResolvedModel::Instant => true,
                ResolvedModel::Markers => false,
                ResolvedModel::LagUs(l) => p.time.saturating_add(l) <= self.now_time.load(Relaxed),
                ResolvedModel::LagEvents(k) => {
                    p.ordinal.saturating_add(k) <= self.now_ordinal.load(Relaxed)
                }
            }
    }

    /// Whether `p` has completed: its stream passed it, and every wait its stream had
    /// before it is satisfied.
    fn completed(&self, waits: &HashMap<(u32, u32), Wait>, p: Point, depth: u32) -> bool {
        if !self.passed_own(p) {
            return false;
        }
        waits
            .iter()
            .filter(|((s, _), w)| *s == p.stream && w.from <= p.ordinal)
            .all(|(_, w)| depth < MAX_WAIT_DEPTH && self.completed(waits, w.dep, depth + 1))
    }

    /// Drop waits whose point has completed: completion never goes back.
    fn prune(&self, t: &mut Tickets) {
        let done: Vec<(u32, u32)> = t
            .waits
            .iter()
            .filter(|(_, w)| self.completed(&t.waits, w.dep, 0))
            .map(|(k, _)| *k)
            .collect();
        for k in done {
            t.waits.remove(&k);
        }
    }

    /// Mark `p` and what it waits on as passed (the CPU waited for it).
    fn sync_point(&self, waits: &HashMap<(u32, u32), Wait>, p: Point, depth: u32) {
        self.pass(p.stream, p.ordinal);
        if depth >= MAX_WAIT_DEPTH {
            return;
        }
        for ((s, _), w) in waits {
            if *s == p.stream && w.from <= p.ordinal {
                self.sync_point(waits, w.dep, depth + 1);
            }
        }
    }

    fn point(t: &Tickets, ticket: u64) -> Result<Point, AllocError> {
        usize::try_from(ticket)
            .ok()
            .and_then(|i| t.points.get(i).copied().flatten())
            .ok_or_else(|| {
                AllocError::InvalidArgument(format!(
                    "event ticket {ticket} of the simulated device is not recorded (released \
                     already, or never handed out)"
                ))
            })
    }
}

impl StreamEvents for SimulatedDevice {
    fn record(&self, stream: Stream) -> Result<u64, AllocError> {
        self.count(0);
        let p = Point {
            stream: stream.index,
            ordinal: self.now_ordinal.load(Relaxed),
            time: self.now_time.load(Relaxed),
        };
        let mut t = self.tickets.lock();
        let index = match t.free.pop() {
            Some(i) => {
                t.points[i as usize] = Some(p);
                i
            }
            None => {
                t.points.push(Some(p));
                (t.points.len() - 1) as u32
            }
        };
        Ok(u64::from(index))
    }

    fn query(&self, ticket: u64) -> Result<bool, AllocError> {
        let t = self.tickets.lock();
        let p = Self::point(&t, ticket)?;
        let done = self.completed(&t.waits, p, 0);
        self.count(if done { 2 } else { 1 });
        Ok(done)
    }

    fn synchronize(&self, ticket: u64) -> Result<(), AllocError> {
        self.count(3);
        let mut t = self.tickets.lock();
        let p = Self::point(&t, ticket)?;
        self.sync_point(&t.waits, p, 0);
        self.prune(&mut t);
        Ok(())
    }

    fn wait(&self, stream: Stream, ticket: u64) -> Result<(), AllocError> {
        self.count(5);
        let mut t = self.tickets.lock();
        let dep = Self::point(&t, ticket)?;
        if dep.stream == stream.index || self.completed(&t.waits, dep, 0) {
            return Ok(()); // a stream is ordered after itself; a completed point holds nothing
        }
        let from = self.now_ordinal.load(Relaxed);
        t.waits
            .entry((stream.index, dep.stream))
            .and_modify(|w| {
                // Merge: the later point, from the earlier event (conservative).
                if dep.ordinal > w.dep.ordinal {
                    w.dep = dep;
                }
            })
            .or_insert(Wait { from, dep });
        Ok(())
    }

    fn release(&self, ticket: u64) {
        let mut t = self.tickets.lock();
        if let Some(slot) = usize::try_from(ticket)
            .ok()
            .and_then(|i| t.points.get_mut(i))
        {
            if slot.take().is_some() {
                t.free.push(ticket as u32);
            }
        }
    }

    fn synchronize_device(&self, _device: u32) -> Result<(), AllocError> {
        self.count(4);
        self.device_passed
            .fetch_max(self.now_ordinal.load(Relaxed), Relaxed);
        // Every point waited on was recorded before now, so every wait is satisfied.
        self.tickets.lock().waits.clear();
        Ok(())
    }
}

impl fmt::Debug for SimulatedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatedDevice")
            .field("model", &self.model)
            .field("now_ordinal", &self.now_ordinal.load(Relaxed))
            .field("now_time", &self.now_time.load(Relaxed))
            .finish_non_exhaustive()
    }
}
