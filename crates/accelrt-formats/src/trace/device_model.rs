//! The device model: when, during a replay, the work queued on a stream has completed.
//!
//! A replay runs the production allocator; only "completed" is simulated. The replay hands
//! the allocator a [`SimulatedDevice`] as its [`StreamEvents`], and moves the device's clocks
//! before every call:
//!
//! - the **event clock** counts the trace's `a`, `f` and `u` events (1, 2, 3, ...): an event
//!   recorded during the call for event `r` marks the point in the stream after all work the
//!   program queued before event `r`'s call returned;
//! - the **CPU clock** is the event's time in microseconds (v2 traces; 0 without times).
//!
//! A ticket recorded on stream `s` at event `r` (time `t_r`) has completed when any of these
//! holds, and every stream it waits on (below) has passed its point too:
//!
//! - **markers**: a completion marker came due (the CPU clock reached its time) for a free at
//!   event `f >= r` whose allocation lived on `s` or was used on `s` (`u`): the recorded run's
//!   device had passed that free on every such stream. Markers count in every model but
//!   `instant`: they are what the recorded device really did;
//! - **lag** (`lag:Lus`): `t_r + L <= now`: the device runs `L` microseconds behind the CPU;
//! - **lag** (`lag:Kev`): `r + K <= now`: the device runs `K` events behind the CPU;
//! - **synchronize**: the allocator waited for this ticket, or a later one on `s`
//!   (`synchronize`), or for the whole device at event `>= r` (`synchronize_device`). The
//!   trace's CPU times do not move: the recorded run's own waits are already in them.
//!
//! `wait(s, t)` (stream `s` waits on the device for ticket `t`): tickets recorded on `s`
//! from then on complete only once `t` has. Per pair of streams only one wait is kept: a
//! later wait merges into the one still open (the later point, from the earlier event), so
//! the model may complete work later than a device would, never earlier.
//!
//! Models ([`DeviceModel`], `--device-model`): `instant` (no simulated device at all: the
//! allocator gets no event source and every fence completes at once, as replays did before
//! the device model), `markers`, `lag:Lus`, `lag:Kev`, and `auto` (the default): markers for
//! a timed trace whose header says `markers=all`, `lag:`[`DEFAULT_LAG_US`]`us` for other
//! timed traces, `lag:`[`DEFAULT_LAG_EVENTS`]`ev` for traces without times.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

use super::{Markers, MAX_STREAM};
use crate::error::{FormatError, Result};
use accelrt_alloc::stream::Stream;
use accelrt_alloc::{AllocError, StreamEvents};

/// Default lag of the device behind the CPU for timed traces without markers, in
/// microseconds. Calibrated on real runs (H200, 2026-11-29, `BENCHMARKS.md`): replaying
/// accelrt's own recordings of GPT-2 and ResNet-50 training with 250/500/1000/2000/5000 us,
/// 500 us gave the smallest errors against the runs' real peaks (-0.15%, -0.45%); on the
/// workloads held out (GPT-2 dynamic-shape inference, Llama and ViT dynamic training) it is
/// within 1% (-0.85%, +0.30%, +0.18%).
pub const DEFAULT_LAG_US: u64 = 500;

/// Default lag of the device behind the CPU for traces without times, in trace events.
/// Calibrated like [`DEFAULT_LAG_US`], against the real runs of the v1 traces' workloads:
/// 16 events (+0.06% GPT-2 training, -0.18% ResNet-50; held out, GPT-2 dynamic-shape
/// inference -0.12%), where 64 gave +2.0% on the held-out one.
pub const DEFAULT_LAG_EVENTS: u64 = 16;

/// Which device model a replay asks for (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceModel {
    /// Markers for traces that mark every free, else the default lag.
    #[default]
    Auto,
    /// Every fence completes at once: the allocator gets no event source.
    Instant,
    /// Completion markers only (and the allocator's own synchronizations).
    Markers,
    /// The device runs behind the CPU: by `us` microseconds on timed traces, by `events`
    /// events on untimed ones (`None`: the default for that kind).
    Lag {
        /// Lag on timed traces.
        us: Option<u64>,
        /// Lag on untimed traces.
        events: Option<u64>,
    },
}

/// The model a replay ran under, once [`DeviceModel`] met the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedModel {
    /// No simulated device.
    Instant,
    /// Markers and synchronizations.
    Markers,
    /// `lag:Nus`.
    LagUs(u64),
    /// `lag:Nev`.
    LagEvents(u64),
}

/// Why a replay ran under its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    /// `--device-model` (or [`super::ReplayOptions::device_model`]) named it.
    Asked,
    /// The trace's header says every free carries a marker.
    Trace,
    /// The default for this kind of trace.
    Default,
}

impl fmt::Display for ResolvedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolvedModel::Instant => write!(f, "instant"),
            ResolvedModel::Markers => write!(f, "markers"),
            ResolvedModel::LagUs(us) => write!(f, "lag:{us}us"),
            ResolvedModel::LagEvents(k) => write!(f, "lag:{k}ev"),
        }
    }
}

impl serde::Serialize for ResolvedModel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for DeviceModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceModel::Auto => write!(f, "auto"),
            DeviceModel::Instant => write!(f, "instant"),
            DeviceModel::Markers => write!(f, "markers"),
            DeviceModel::Lag { us, events } => {
                let parts: Vec<String> = us
                    .map(|u| format!("{u}us"))
                    .into_iter()
                    .chain(events.map(|k| format!("{k}ev")))
                    .collect();
                write!(f, "lag:{}", parts.join(","))
            }
        }
    }
}

impl FromStr for DeviceModel {
    type Err = FormatError;

    /// `auto`, `instant`, `markers`, `lag:2000us`, `lag:2ms`, `lag:64ev`, `lag:2000us,64ev`.
    fn from_str(text: &str) -> Result<DeviceModel> {
        let bad = |why: String| {
            FormatError::InvalidArgument(format!(
                "device model '{}' {why}: write auto, instant, markers, or lag: with a time \
                 (lag:2000us, lag:2ms) and/or an event count (lag:64ev), e.g. lag:2000us,64ev",
                super::shown(text)
            ))
        };
        let t = text.trim();
        match t {
            "auto" => return Ok(DeviceModel::Auto),
            "instant" => return Ok(DeviceModel::Instant),
            "markers" => return Ok(DeviceModel::Markers),
            _ => {}
        }
        let Some(spec) = t.strip_prefix("lag:") else {
            return Err(bad("is not a model".into()));
        };
        let (mut us, mut events) = (None, None);
        for part in spec.split(',').map(str::trim) {
            let digits = part.bytes().take_while(u8::is_ascii_digit).count();
            let (number, unit) = part.split_at(digits);
            let n: u64 = number
                .parse()
                .map_err(|_| bad(format!("has no number in '{}'", super::shown(part))))?;
            let (slot, scale) = match unit {
                "us" => (&mut us, 1),
                "ms" => (&mut us, 1_000),
                "s" => (&mut us, 1_000_000),
                "ev" | "events" => (&mut events, 1),
                other => {
                    return Err(bad(format!(
                        "has an unknown unit '{}' (us, ms, s or ev)",
                        super::shown(other)
                    )))
                }
            };
            if slot.is_some() {
                return Err(bad("gives the same kind of lag twice".into()));
            }
            let value = n
                .checked_mul(scale)
                .filter(|&v| v <= super::MAX_TIME_US)
                .ok_or_else(|| bad("is longer than 2^48 us".into()))?;
            *slot = Some(value);
        }
        Ok(DeviceModel::Lag { us, events })
    }
}

impl DeviceModel {
    /// The model for a trace: `timed` (v2) or not, and which frees its header says carry
    /// markers.
    pub fn resolve(self, timed: bool, markers: Markers) -> (ResolvedModel, ModelSource) {
        match self {
            DeviceModel::Instant => (ResolvedModel::Instant, ModelSource::Asked),
            DeviceModel::Markers => (ResolvedModel::Markers, ModelSource::Asked),
            DeviceModel::Lag { us, events } => match (timed, us, events) {
                (true, Some(l), _) => (ResolvedModel::LagUs(l), ModelSource::Asked),
                (true, None, _) => (ResolvedModel::LagUs(DEFAULT_LAG_US), ModelSource::Default),
                (false, _, Some(k)) => (ResolvedModel::LagEvents(k), ModelSource::Asked),
                (false, _, None) => (
                    ResolvedModel::LagEvents(DEFAULT_LAG_EVENTS),
                    ModelSource::Default,
                ),
            },
            DeviceModel::Auto if timed && markers == Markers::All => {
                (ResolvedModel::Markers, ModelSource::Trace)
            }
            DeviceModel::Auto if timed => {
                (ResolvedModel::LagUs(DEFAULT_LAG_US), ModelSource::Default)
            }
            DeviceModel::Auto => (
                ResolvedModel::LagEvents(DEFAULT_LAG_EVENTS),
                ModelSource::Default,
            ),
        }
    }
}

impl ModelSource {
    /// How the replay table says it: `from the trace`, `asked for`, ...
    pub fn describe(self, model: ResolvedModel) -> &'static str {
        match (self, model) {
            (ModelSource::Asked, _) => "asked for",
            (ModelSource::Trace, _) => "from the trace",
            (ModelSource::Default, ResolvedModel::LagEvents(_)) => {
                "default for traces without times"
            }
            (ModelSource::Default, _) => "default for timed traces without markers",
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use accelrt_alloc::device::{Device, DeviceType};

    const DEV: Device = Device {
        kind: DeviceType::Host,
        index: 0,
    };
    fn s(index: u32) -> Stream {
        Stream { device: DEV, index }
    }

    #[test]
    fn model_names_parse_and_print() {
        // (text, parsed, printed back)
        let cases = [
            ("auto", DeviceModel::Auto, "auto"),
            (" instant ", DeviceModel::Instant, "instant"),
            ("markers", DeviceModel::Markers, "markers"),
            (
                "lag:2000us",
                DeviceModel::Lag {
                    us: Some(2000),
                    events: None,
                },
                "lag:2000us",
            ),
            (
                "lag:2ms",
                DeviceModel::Lag {
                    us: Some(2000),
                    events: None,
                },
                "lag:2000us",
            ),
            (
                "lag:64ev, 1s",
                DeviceModel::Lag {
                    us: Some(1_000_000),
                    events: Some(64),
                },
                "lag:1000000us,64ev",
            ),
        ];
        for (text, want, printed) in cases {
            let got: DeviceModel = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), printed, "{text}");
        }
        for (text, why) in [
            ("fast", "is not a model"),
            ("lag:", "has no number"),
            ("lag:20", "unknown unit"),
            ("lag:5mins", "unknown unit"),
            ("lag:1us,2us", "same kind of lag twice"),
            ("lag:99999999999999s", "longer than 2^48"),
            ("lag:-5us", "has no number"),
        ] {
            let e = text.parse::<DeviceModel>().unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains("e.g. lag:2000us,64ev"),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn models_resolve_per_trace() {
        use super::Markers as H;
        use ModelSource::*;
        use ResolvedModel::{Instant, LagEvents, LagUs};
        let lag_us = DeviceModel::Lag {
            us: Some(500),
            events: None,
        };
        // (asked, timed, markers header, resolved, source)
        let cases = [
            (
                DeviceModel::Auto,
                true,
                H::All,
                ResolvedModel::Markers,
                Trace,
            ),
            (
                DeviceModel::Auto,
                true,
                H::CrossStream,
                LagUs(DEFAULT_LAG_US),
                Default,
            ),
            (
                DeviceModel::Auto,
                true,
                H::Unstated,
                LagUs(DEFAULT_LAG_US),
                Default,
            ),
            (
                DeviceModel::Auto,
                false,
                H::Unstated,
                LagEvents(DEFAULT_LAG_EVENTS),
                Default,
            ),
            (DeviceModel::Instant, true, H::All, Instant, Asked),
            (
                DeviceModel::Markers,
                false,
                H::Unstated,
                ResolvedModel::Markers,
                Asked,
            ),
            (lag_us, true, H::All, LagUs(500), Asked),
            (
                lag_us,
                false,
                H::Unstated,
                LagEvents(DEFAULT_LAG_EVENTS),
                Default,
            ),
        ];
        for (asked, timed, markers, model, source) in cases {
            assert_eq!(
                asked.resolve(timed, markers),
                (model, source),
                "{asked} timed={timed} {markers:?}"
            );
        }
    }

    /// One step of a device-model scenario.
    #[derive(Debug, Clone, Copy)]
    enum Do {
        /// Clocks to (event, time).
        Now(u64, u64),
        /// Record on a stream; the ticket is named by its position in the scenario.
        Record(u32),
        /// A marker: the device passed event N on stream S.
        Pass(u32, u64),
        /// Query the ticket of step N: expected answer.
        Query(usize, bool),
        /// Synchronize the ticket of step N.
        Sync(usize),
        /// The whole device.
        SyncDevice,
        /// Stream S waits for the ticket of step N.
        Wait(u32, usize),
    }

    fn run(model: ResolvedModel, steps: &[Do]) {
        let d = SimulatedDevice::new(model);
        let mut tickets = vec![u64::MAX; steps.len()];
        for (i, step) in steps.iter().enumerate() {
            match *step {
                Do::Now(o, t) => d.set_now(o, t),
                Do::Record(st) => tickets[i] = d.record(s(st)).unwrap(),
                Do::Pass(st, o) => d.pass(st, o),
                Do::Query(n, want) => assert_eq!(
                    d.query(tickets[n]).unwrap(),
                    want,
                    "{model}: step {i} {step:?} in {steps:?}"
                ),
                Do::Sync(n) => d.synchronize(tickets[n]).unwrap(),
                Do::SyncDevice => d.synchronize_device(0).unwrap(),
                Do::Wait(st, n) => d.wait(s(st), tickets[n]).unwrap(),
            }
        }
    }

    #[test]
    fn tickets_complete_as_the_model_says() {
        use Do::*;
        use ResolvedModel::*;
        let cases: Vec<(ResolvedModel, Vec<Do>)> = vec![
            // Markers: a ticket completes once a marker passes its event on its stream.
            (
                Markers,
                vec![
                    Now(3, 30),
                    Record(0),
                    Query(1, false),
                    Pass(1, 9), // another stream
                    Query(1, false),
                    Pass(0, 2), // an earlier event
                    Query(1, false),
                    Pass(0, 3),
                    Query(1, true),
                ],
            ),
            // Markers: time alone completes nothing.
            (
                Markers,
                vec![
                    Now(1, 0),
                    Record(0),
                    Now(1_000_000, 1 << 40),
                    Query(1, false),
                ],
            ),
            // Lag in microseconds: complete once the CPU is L past the record.
            (
                LagUs(100),
                vec![
                    Now(1, 1000),
                    Record(2),
                    Now(50, 1099),
                    Query(1, false),
                    Now(51, 1100),
                    Query(1, true),
                ],
            ),
            // Lag in events.
            (
                LagEvents(4),
                vec![
                    Now(10, 0),
                    Record(0),
                    Now(13, 0),
                    Query(1, false),
                    Now(14, 0),
                    Query(1, true),
                ],
            ),
            // Synchronizing one ticket passes its stream up to it, and earlier tickets.
            (
                Markers,
                vec![
                    Now(1, 0),
                    Record(0),
                    Now(2, 0),
                    Record(0),
                    Record(1),
                    Sync(3),
                    Query(1, true),
                    Query(3, true),
                    Query(4, false),
                ],
            ),
            // A device-wide synchronize passes everything recorded so far, not what comes later.
            (
                Markers,
                vec![
                    Now(5, 0),
                    Record(0),
                    Record(7),
                    SyncDevice,
                    Now(6, 0),
                    Record(0),
                    Query(1, true),
                    Query(2, true),
                    Query(5, false),
                ],
            ),
            // Waits: stream 1 waits for a ticket of stream 0; its later tickets complete only
            // once that one has, even when stream 1 itself has passed them.
            (
                Markers,
                vec![
                    Now(1, 0),
                    Record(0),
                    Now(2, 0),
                    Record(1), // before the wait: not held
                    Now(3, 0),
                    Wait(1, 1),
                    Now(4, 0),
                    Record(1), // after the wait
                    Pass(1, 4),
                    Query(3, true),
                    Query(7, false),
                    Pass(0, 1),
                    Query(7, true),
                ],
            ),
            // Synchronizing a ticket that waits passes what it waits on too.
            (
                Markers,
                vec![
                    Now(1, 0),
                    Record(0),
                    Wait(1, 1),
                    Now(2, 0),
                    Record(1),
                    Sync(4),
                    Query(1, true),
                    Query(4, true),
                ],
            ),
            // A wait on a completed ticket holds nothing.
            (
                LagEvents(1),
                vec![
                    Now(1, 0),
                    Record(0),
                    Now(5, 0),
                    Wait(1, 1),
                    Record(1),
                    Now(6, 0),
                    Query(4, true),
                ],
            ),
        ];
        for (model, steps) in cases {
            run(model, &steps);
        }
    }

    #[test]
    fn released_tickets_are_reused_and_refused() {
        let d = SimulatedDevice::new(ResolvedModel::Markers);
        let a = d.record(s(0)).unwrap();
        d.release(a);
        let e = d.query(a).unwrap_err().to_string();
        assert!(e.contains("not recorded"), "{e}");
        assert_eq!(d.record(s(0)).unwrap(), a, "the slot is reused");
        d.release(12345); // unknown: ignored
        let c = d.calls();
        assert_eq!((c.records, c.queries_done, c.queries_pending), (2, 0, 0));
    }
}
