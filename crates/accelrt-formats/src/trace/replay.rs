//! The replay engine: one loop for every input (trace files streamed as they are read,
//! traces and snapshots in memory), through accelrt's [`CachingAllocator`] with a simulated
//! device ([`super::device_model`]).
//!
//! The replay measures what matters for a device allocator on real work: peak reserved bytes
//! against peak live requested bytes (fragmentation), device allocations, and the time per
//! allocate/free call. Trace stream numbers map to stream indices of the replay device
//! (`Stream { device, index: n }`); `u` lines call `record_stream`.
//!
//! The loop reads and checks a block of events (ids turned into slots, markers scheduled),
//! then times the allocator over the block, so `ns_per_call` is the allocator's time per
//! call (plus the device model's clock moves, a store each), not the reader's. Memory
//! follows the live allocations: nothing is kept per event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::check::{Planner, Step};
use super::device_model::{DeviceModel, ModelCalls, ModelSource, ResolvedModel, SimulatedDevice};
use super::memory_source::MemorySource;
use super::read::TraceEvent;
use super::{Header, Trace, TraceReader};
use crate::error::{FormatError, Result};
use crate::snapshot::Snapshot;
use accelrt_alloc::device::{Device, DeviceType};
use accelrt_alloc::stream::Stream;
use accelrt_alloc::AllocError;
use accelrt_alloc::Clock;
use accelrt_alloc::HostMemory;
use accelrt_alloc::{
    set_thread_context, AllocatorConfig, CachingAllocator, Frames, HistoryConfig, MemoryProvider,
    MemoryStats, PeakBreakdown, StreamEvents,
};

/// Default cap on the memory history of a replay with history on (entries; the oldest go
/// first beyond it). A replay event makes 1 to 4 entries.
pub const DEFAULT_HISTORY_ENTRIES: usize = 1 << 23;

/// Events read and checked before the allocator is timed over them.
const BLOCK: usize = 4096;

/// A device and its memory, to replay on real memory (e.g. a GPU's: `--backend cuda`).
#[derive(Clone)]
pub struct ReplayTarget {
    /// The device the allocator serves.
    pub device: Device,
    /// Its memory.
    pub provider: Arc<dyn MemoryProvider>,
}

impl std::fmt::Debug for ReplayTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayTarget")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// How to replay a trace.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The allocator configuration to replay under.
    pub config: AllocatorConfig,
    /// Size of the simulated host device in bytes; `None` uses
    /// [`HostMemory::with_default_capacity`]. Ignored with a [`ReplayTarget`].
    pub capacity: Option<u64>,
    /// When queued work completes ([`DeviceModel::Auto`] by default).
    pub device_model: DeviceModel,
    /// Record the allocator's memory history and return the snapshot at the end
    /// ([`ReplayOutcome::snapshot`]). Costs time per call, which then shows in `ns_per_call`.
    pub history: bool,
    /// Cap on history entries (the oldest are dropped beyond it).
    pub history_max_entries: usize,
    /// Replay on this device's memory instead of a fresh simulated host device.
    pub target: Option<ReplayTarget>,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            config: AllocatorConfig::default(),
            capacity: None,
            device_model: DeviceModel::Auto,
            history: false,
            history_max_entries: DEFAULT_HISTORY_ENTRIES,
            target: None,
        }
    }
}

/// How far a replay has got, for progress bars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Events read and replayed.
    pub events: u64,
    /// Bytes of the input read (compressed bytes for gzip; 0 for inputs in memory).
    pub input_bytes: u64,
}

/// What a replay measured. Counts cover the events done before a stop.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReplayReport {
    /// The trace's name.
    pub trace: String,
    /// The configuration as a `key:value` string ([`AllocatorConfig::to_conf_string`]).
    pub config: String,
    /// The device model the replay ran under (`markers`, `lag:2000us`, `lag:64ev`,
    /// `instant`).
    pub device_model: ResolvedModel,
    /// Why that model.
    pub device_model_source: ModelSource,
    /// Events done (all of them unless the replay stopped): `a`, `f`, `u` and `c` lines.
    pub ops: u64,
    /// Events in the input, once it has been read to the end; `None` after a stop.
    pub total_ops: Option<u64>,
    /// Whether every event was replayed.
    pub completed: bool,
    /// Allocations made.
    pub allocations: u64,
    /// Distinct streams allocated on.
    pub streams: u64,
    /// `u` (record_stream) events.
    pub record_streams: u64,
    /// `c` (completion marker) events.
    pub markers: u64,
    /// Peak of live requested bytes over the completed events.
    pub peak_allocated_bytes: u64,
    /// Peak of bytes the allocator reserved from the device.
    pub peak_reserved_bytes: u64,
    /// Segments (or pages) the allocator took from the device.
    pub device_allocs: u64,
    /// Out-of-memory failures the allocator counted.
    pub ooms: u64,
    /// Time of the allocator's calls divided by the calls made, in nanoseconds.
    pub ns_per_call: f64,
    /// Time of the allocator's calls, in seconds.
    pub seconds: f64,
    /// Whether memory history was recorded (its cost is in `ns_per_call`).
    pub history: bool,
    /// The allocator's calls into the simulated device (`None` under `instant`).
    pub device_calls: Option<ModelCalls>,
    /// The allocator's own count of driver calls (`MemoryStats::driver_calls`), when the
    /// allocator keeps one.
    pub driver_calls: Option<serde_json::Value>,
    /// Where reserved memory was at its peak (the replay's own allocator records it).
    pub peak_breakdown: Option<PeakBreakdown>,
    /// The allocator's event counters: retries, out-of-memory errors, moves of idle chunks,
    /// moves the time budget deferred and how much of it was drawn at once.
    pub counters: accelrt_alloc::EventCounters,
}

impl ReplayReport {
    /// Peak reserved / peak allocated (1.0 is the floor); `None` when nothing was allocated.
    pub fn ratio(&self) -> Option<f64> {
        (self.peak_allocated_bytes > 0)
            .then(|| self.peak_reserved_bytes as f64 / self.peak_allocated_bytes as f64)
    }

    /// Whether every event of the trace was replayed.
    pub fn completed(&self) -> bool {
        self.completed
    }
}

/// The allocator's driver-call counters, read through its statistics' serialized form so a
/// `driver_calls` field in [`MemoryStats`] shows up here as soon as the allocator has one.
fn driver_calls(stats: &MemoryStats) -> Option<serde_json::Value> {
    let mut calls = serde_json::to_value(stats)
        .ok()?
        .get("driver_calls")?
        .clone();
    let total: u64 = calls
        .as_object()?
        .values()
        .filter_map(serde_json::Value::as_u64)
        .sum();
    calls.as_object_mut()?.insert("total".into(), total.into());
    Some(calls)
}

/// The result of a replay: the report, and why it stopped early, if it did.
#[derive(Debug, Clone)]
pub struct ReplayOutcome {
    /// What was measured up to the stop (or the end).
    pub report: ReplayReport,
    /// Why the replay stopped before the end, naming the trace file and the line of the
    /// event: an [`FormatError::Replay`] when the allocator failed there, an [`FormatError::Parse`] when
    /// the event could not be read or checked (or, when the allocator or the input could not
    /// even be set up, that error as is).
    pub error: Option<FormatError>,
    /// The allocator's own error behind `error` (e.g. [`AllocError::OutOfMemory`]); `None` for an
    /// input error.
    pub cause: Option<AllocError>,
    /// With [`ReplayOptions::history`]: the allocator's state after the last replayed event,
    /// with its history (the oldest entries dropped beyond the cap).
    pub snapshot: Option<Snapshot>,
}

impl ReplayOutcome {
    /// The report when the whole trace replayed, else the error naming the failed line.
    pub fn into_result(self) -> Result<ReplayReport> {
        match self.error {
            None => Ok(self.report),
            Some(e) => Err(e),
        }
    }

    /// True when the replay stopped on an out-of-memory.
    pub fn is_out_of_memory(&self) -> bool {
        self.cause
            .as_ref()
            .is_some_and(AllocError::is_out_of_memory)
    }
}

/// Where a replay reads its events from.
pub(crate) trait Source {
    /// What error messages call the input.
    fn file(&self) -> &str;
    /// The header (version, recorded run).
    fn header(&self) -> &Header;
    /// The next event and the stack frames of its allocation; `None` at the end.
    fn next_event(&mut self) -> Result<Option<(TraceEvent, Option<Frames>)>>;
    /// Bytes of input read so far.
    fn input_bytes(&self) -> u64;
}

impl Source for MemorySource<'_> {
    fn file(&self) -> &str {
        &self.trace.source
    }
    fn header(&self) -> &Header {
        &self.trace.header
    }
    fn next_event(&mut self) -> Result<Option<(TraceEvent, Option<Frames>)>> {
        MemorySource::next_event(self)
    }
    fn input_bytes(&self) -> u64 {
        0
    }
}

impl Source for TraceReader<'_> {
    fn file(&self) -> &str {
        TraceReader::file(self)
    }
    fn header(&self) -> &Header {
        TraceReader::header(self)
    }
    fn next_event(&mut self) -> Result<Option<(TraceEvent, Option<Frames>)>> {
        Ok(TraceReader::next_event(self)?.map(|e| (e, None)))
    }
    fn input_bytes(&self) -> u64 {
        TraceReader::input_bytes(self)
    }
}

/// The device replays run on by default.
const HOST_DEVICE: Device = Device {
    kind: DeviceType::Host,
    index: 0,
};

/// Replay `trace` (in memory) under `opts`.
pub fn replay(trace: &Trace, opts: &ReplayOptions) -> ReplayOutcome {
    let mut source = MemorySource::new(trace, None);
    replay_source(&mut source, &trace.name, opts, &mut |_| {})
}

/// Replay a trace as it is read from `reader` (plain text or gzip, v1 or v2): memory follows
/// the live allocations, not the length of the input. `name` names the trace in the report,
/// `file` the input in errors.
pub fn replay_reader(
    name: &str,
    file: &str,
    reader: impl std::io::Read,
    opts: &ReplayOptions,
    progress: &mut dyn FnMut(&Progress),
) -> ReplayOutcome {
    match TraceReader::new(file, reader) {
        Ok(mut r) => replay_source(&mut r, name, opts, progress),
        Err(e) => failed_before_start(name, opts, e),
    }
}

/// Replay `trace` on an allocator the caller owns (for checking the allocator afterwards;
/// allocations still live at the end of the trace stay allocated). No simulated device is
/// driven (`u` lines are skipped unless the allocator has its own event source). Statistics
/// are read from the allocator, so it should be fresh (or have had its peaks reset).
pub fn replay_into(trace: &Trace, alloc: &CachingAllocator) -> ReplayOutcome {
    let mut source = MemorySource::new(trace, None);
    let mut engine = Engine::new(alloc, None, false);
    let model = (ResolvedModel::Instant, ModelSource::Asked);
    engine.run(&mut source, &trace.name, model, &mut |_| {})
}

/// An outcome for a replay that could not start (the input or the allocator failed).
pub(crate) fn failed_before_start(
    name: &str,
    opts: &ReplayOptions,
    e: FormatError,
) -> ReplayOutcome {
    ReplayOutcome {
        report: empty_report(
            name,
            opts.config.to_conf_string(),
            (ResolvedModel::Instant, ModelSource::Asked),
            opts.history,
        ),
        cause: e.alloc_error().cloned(),
        error: Some(e),
        snapshot: None,
    }
}

fn empty_report(
    name: &str,
    config: String,
    (model, source): (ResolvedModel, ModelSource),
    history: bool,
) -> ReplayReport {
    ReplayReport {
        trace: name.to_string(),
        config,
        device_model: model,
        device_model_source: source,
        ops: 0,
        total_ops: None,
        completed: false,
        allocations: 0,
        streams: 0,
        record_streams: 0,
        markers: 0,
        peak_allocated_bytes: 0,
        peak_reserved_bytes: 0,
        device_allocs: 0,
        ooms: 0,
        ns_per_call: 0.0,
        seconds: 0.0,
        history,
        device_calls: None,
        driver_calls: None,
        peak_breakdown: None,
        counters: Default::default(),
    }
}

/// The replay of one source under `opts`: a fresh allocator with the device model, history
/// if asked, and everything given back at the end.
pub(crate) fn replay_source(
    source: &mut dyn Source,
    name: &str,
    opts: &ReplayOptions,
    progress: &mut dyn FnMut(&Progress),
) -> ReplayOutcome {
    let timed = source.header().version >= 2;
    let model = opts.device_model.resolve(timed, source.header().markers);
    let (device, provider): (Device, Arc<dyn MemoryProvider>) = match &opts.target {
        Some(t) => (t.device, Arc::clone(&t.provider)),
        None => (
            HOST_DEVICE,
            Arc::new(match opts.capacity {
                Some(bytes) => HostMemory::new(bytes),
                None => HostMemory::with_default_capacity(),
            }),
        ),
    };
    let sim = (model.0 != ResolvedModel::Instant).then(|| Arc::new(SimulatedDevice::new(model.0)));
    let events = sim.clone().map(|s| s as Arc<dyn StreamEvents>);
    let alloc = match CachingAllocator::new(device, provider, events, opts.config.clone()) {
        Ok(a) => a,
        // Not tied to a line of the trace: the allocator could not be built (its
        // configuration was refused).
        Err(e) => {
            let mut outcome = failed_before_start(name, opts, e.into());
            outcome.report.device_model = model.0;
            outcome.report.device_model_source = model.1;
            return outcome;
        }
    };
    // The move budget's time: the trace's own CPU clock, so the replay moves memory as the
    // recorded process would have (the host's time here has nothing to do with it).
    alloc.set_clock(match (&sim, timed) {
        (Some(sim), true) => {
            let sim = Arc::clone(sim);
            Clock::External(Arc::new(move || sim.now_us()))
        }
        _ => Clock::Off,
    });
    alloc.record_peak_breakdown(true);
    if opts.history {
        alloc.record_memory_history(Some(HistoryConfig {
            max_entries: opts.history_max_entries.max(1),
            context: true,
        }));
    }
    let mut engine = Engine::new(&alloc, sim.as_deref(), opts.history);
    let mut outcome = engine.run(source, name, model, progress);
    if opts.history {
        let snapshot = alloc.memory_snapshot();
        alloc.record_memory_history(None);
        let mut settings = crate::snapshot::settings_json(alloc.config());
        if let Some(map) = settings.as_object_mut() {
            map.insert("device_model".into(), model.0.to_string().into());
        }
        outcome.snapshot = Some(Snapshot::from_memory_snapshots(&[snapshot], settings));
    }
    for &ptr in engine.ptrs.iter().filter(|&&p| p != 0) {
        // Live pointers of this replay: freeing them cannot fail, and a failure would only
        // leave memory cached until `empty_cache` reports it.
        let _ = alloc.raw_free(ptr);
    }
    let _ = alloc.empty_cache();
    outcome
}

/// The loop's state: the allocator, the device model, the pointer of each slot and what
/// has been measured.
struct Engine<'a> {
    alloc: &'a CachingAllocator,
    sim: Option<&'a SimulatedDevice>,
    device: Device,
    history: bool,
    /// Live pointer per planner slot (0: none, as for a zero-byte allocation).
    ptrs: Vec<usize>,
    live_bytes: u64,
    peak_bytes: u64,
    /// Events done, counted as the planner numbers them.
    events: u64,
    calls: u64,
    allocations: u64,
    record_streams: u64,
    streams: [u64; (super::MAX_STREAM as usize + 1) / 64],
    elapsed: Duration,
}

/// Why a block stopped: the index of the step and the allocator's error.
struct Stop {
    step: usize,
    cause: AllocError,
}

impl<'a> Engine<'a> {
    fn new(alloc: &'a CachingAllocator, sim: Option<&'a SimulatedDevice>, history: bool) -> Self {
        Engine {
            alloc,
            sim,
            device: alloc.device(),
            history,
            ptrs: Vec::new(),
            live_bytes: 0,
            peak_bytes: 0,
            events: 0,
            calls: 0,
            allocations: 0,
            record_streams: 0,
            streams: [0; (super::MAX_STREAM as usize + 1) / 64],
            elapsed: Duration::ZERO,
        }
    }

    fn run(
        &mut self,
        source: &mut dyn Source,
        name: &str,
        model: (ResolvedModel, ModelSource),
        progress: &mut dyn FnMut(&Progress),
    ) -> ReplayOutcome {
        let timed = source.header().version >= 2;
        let mut planner = Planner::new(timed);
        let mut steps: Vec<Step> = Vec::with_capacity(BLOCK + 64);
        let previous_context = self.history.then(|| set_thread_context(None));
        let mut error: Option<(FormatError, Option<AllocError>)> = None;
        let mut read_all = false;
        loop {
            steps.clear();
            // Read and check a block.
            let mut end = false;
            while steps.len() < BLOCK {
                match source.next_event() {
                    Ok(Some((event, frames))) => {
                        if let Err(message) = planner.plan(&event, frames.as_ref(), &mut steps) {
                            let e = FormatError::Parse {
                                file: source.file().to_string(),
                                line: event.line,
                                message,
                            };
                            error = Some((e, None));
                            end = true;
                            break;
                        }
                    }
                    Ok(None) => {
                        read_all = true;
                        end = true;
                        break;
                    }
                    Err(e) => {
                        error = Some((e, None));
                        end = true;
                        break;
                    }
                }
            }
            if self.ptrs.len() < planner.slot_count() {
                self.ptrs.resize(planner.slot_count(), 0);
            }
            // Replay it.
            match self.block(&steps) {
                Ok(()) => self.events = planner.events(),
                Err(stop) => {
                    error = Some(self.stop_error(source.file(), &steps[stop.step], stop.cause));
                    read_all = false;
                    break;
                }
            }
            progress(&Progress {
                events: self.events,
                input_bytes: source.input_bytes(),
            });
            if end {
                break;
            }
        }
        if let Some(previous) = previous_context {
            set_thread_context(previous);
        }
        let stats = self.alloc.stats();
        let mut report = empty_report(
            name,
            self.alloc.config().to_conf_string(),
            model,
            self.history,
        );
        report.ops = self.events;
        report.completed = error.is_none();
        report.total_ops = (read_all && error.is_none()).then_some(self.events);
        report.allocations = self.allocations;
        report.streams = self.streams.iter().map(|w| u64::from(w.count_ones())).sum();
        report.record_streams = self.record_streams;
        report.markers = planner.markers;
        report.peak_allocated_bytes = self.peak_bytes;
        report.peak_reserved_bytes = stats.reserved_bytes_peak;
        report.device_allocs = stats.counters.num_device_alloc;
        report.ooms = stats.counters.num_ooms;
        // Recording the peak breakdown happens inside the calls that raised a peak; it is
        // the replay's own cost, not the allocator's.
        let elapsed = self
            .elapsed
            .saturating_sub(self.alloc.peak_breakdown_cost());
        report.seconds = elapsed.as_secs_f64();
        report.ns_per_call = if self.calls == 0 {
            0.0
        } else {
            elapsed.as_nanos() as f64 / self.calls as f64
        };
        report.peak_breakdown = self.alloc.peak_breakdown();
        report.device_calls = self.sim.map(SimulatedDevice::calls);
        report.driver_calls = driver_calls(&stats);
        report.counters = stats.counters;
        let (error, cause) = match error {
            Some((e, cause)) => (Some(e), cause),
            None => (None, None),
        };
        ReplayOutcome {
            report,
            error,
            cause,
            snapshot: None,
        }
    }

    /// The error of a stop at `step`, naming its line, and the allocator's error.
    fn stop_error(
        &mut self,
        file: &str,
        step: &Step,
        cause: AllocError,
    ) -> (FormatError, Option<AllocError>) {
        let (line, at, what) = match step {
            Step::Alloc {
                id,
                size,
                stream,
                at,
                line,
                ..
            } => (
                *line,
                *at,
                format!(
                    "a {id} {size} {stream}: allocate {}",
                    accelrt_alloc::format_size(*size)
                ),
            ),
            Step::Free { id, at, line, .. } => (*line, *at, format!("f {id}")),
            Step::Use {
                id,
                stream,
                at,
                line,
                ..
            } => (*line, *at, format!("u {id} {stream}")),
            Step::Passed { .. } => unreachable!("a marker makes no allocator call"),
        };
        self.events = at.events - 1;
        let error = FormatError::Replay {
            file: file.to_string(),
            line,
            message: format!("replay stopped at event {} ({what}): {cause}", at.events),
            cause: Box::new(cause.clone()),
        };
        (error, Some(cause))
    }

    /// Run the allocator over `steps`, timed.
    fn block(&mut self, steps: &[Step]) -> std::result::Result<(), Stop> {
        let start = Instant::now();
        let result = self.steps(steps);
        self.elapsed += start.elapsed();
        result
    }

    #[inline]
    fn steps(&mut self, steps: &[Step]) -> std::result::Result<(), Stop> {
        let device = self.device;
        for (k, step) in steps.iter().enumerate() {
            match step {
                Step::Alloc {
                    slot,
                    size,
                    stream,
                    at,
                    frames,
                    ..
                } => {
                    if let Some(sim) = self.sim {
                        sim.set_now(at.ordinal, at.time);
                    }
                    if self.history {
                        set_thread_context(frames.clone());
                    }
                    self.calls += 1;
                    // The planner checked that the size fits in `usize`.
                    let stream_ = Stream {
                        device,
                        index: *stream,
                    };
                    match self.alloc.raw_alloc(*size as usize, stream_) {
                        Ok(ptr) => self.ptrs[*slot as usize] = ptr,
                        Err(cause) => return Err(Stop { step: k, cause }),
                    }
                    self.live_bytes += size;
                    self.peak_bytes = self.peak_bytes.max(self.live_bytes);
                    self.allocations += 1;
                    self.streams[*stream as usize / 64] |= 1 << (*stream % 64);
                }
                Step::Free { slot, size, at, .. } => {
                    if let Some(sim) = self.sim {
                        sim.set_now(at.ordinal, at.time);
                    }
                    self.calls += 1;
                    let ptr = &mut self.ptrs[*slot as usize];
                    if let Err(cause) = self.alloc.raw_free(*ptr) {
                        return Err(Stop { step: k, cause });
                    }
                    *ptr = 0;
                    self.live_bytes -= size;
                }
                Step::Use {
                    slot, stream, at, ..
                } => {
                    self.record_streams += 1;
                    let ptr = self.ptrs[*slot as usize];
                    // Without a device model there is nothing to wait for; a zero-byte
                    // allocation (address 0) has no memory to protect.
                    if let (Some(sim), true) = (self.sim, ptr != 0) {
                        sim.set_now(at.ordinal, at.time);
                        self.calls += 1;
                        let s = Stream {
                            device,
                            index: *stream,
                        };
                        if let Err(cause) = self.alloc.record_stream(ptr, s) {
                            return Err(Stop { step: k, cause });
                        }
                    }
                }
                Step::Passed { stream, ordinal } => {
                    if let Some(sim) = self.sim {
                        sim.pass(*stream, *ordinal);
                    }
                }
            }
        }
        Ok(())
    }
}
