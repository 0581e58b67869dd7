//! [`Runtime`]: turns a [`Driver`] into a full [`Backend`].
//!
//! This is the one place that validates arguments (device indices, stream handles, event
//! and graph ids), so drivers stay small. It owns everything that is the same for every
//! backend: lazy initialisation, the per-thread current device and stream, default and
//! pooled streams, the event pool, per-device generators, the graph table, the per-device
//! caching allocators and the pinned-memory allocator.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use crate::alloc::{
    format_size, AllocatorConfig, CachingAllocator, HistoryConfig, PinnedAllocator, StreamEvents,
    StreamFilter, ALLOC_CONF_ENV,
};
use crate::device::{Device, DeviceProperties, DeviceType};
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::event::{EventId, EventPool, EventSlot, PooledEvent};
use crate::generator::Generator;
use crate::graph::{GraphId, MempoolId};
use crate::hooks::{Backend, EventCallback, HostTask};
use crate::profiler::{Phase, Profiler, ProfilerMode, ProfilerTrace, SavedHistory};
use crate::stream::{Stream, StreamPriority};

/// Streams per priority in each device's stream pool.
pub const POOL_STREAMS_PER_PRIORITY: usize = 4;

// ---------------------------------------------------------------------------------------
// small helpers

/// A `OnceLock` whose initialiser may fail (and is retried on the next call).
struct Lazy<T> {
    cell: OnceLock<T>,
    init: Mutex<()>,
}

impl<T> Lazy<T> {
    fn new() -> Self {
        Lazy {
            cell: OnceLock::new(),
            init: Mutex::new(()),
        }
    }

    #[inline]
    fn get(&self) -> Option<&T> {
        self.cell.get()
    }

    #[inline]
    fn get_or_try_init(&self, f: impl FnOnce() -> Result<T>) -> Result<&T> {
        match self.cell.get() {
            Some(v) => Ok(v),
            None => self.init_slow(f),
        }
    }

    #[cold]
    fn init_slow(&self, f: impl FnOnce() -> Result<T>) -> Result<&T> {
        let _guard = self.init.lock();
        if let Some(v) = self.cell.get() {
            return Ok(v);
        }
        let v = f()?;
        Ok(self.cell.get_or_init(|| v))
    }
}

fn priority_index(p: StreamPriority) -> usize {
    match p {
        StreamPriority::Normal => 0,
        StreamPriority::High => 1,
    }
}

// ---------------------------------------------------------------------------------------
// per-thread state

static NEXT_RUNTIME_ID: AtomicU64 = AtomicU64::new(1);

/// What one thread has selected on one runtime.
struct ThreadState {
    runtime: u64,
    device: u32,
    /// `(device, stream index)` of streams made current with `set_current_stream`.
    streams: Vec<(u32, u32)>,
}

thread_local! {
    static THREAD: RefCell<Vec<ThreadState>> = const { RefCell::new(Vec::new()) };
}

fn with_thread<R>(runtime: u64, f: impl FnOnce(&mut ThreadState) -> R) -> R {
    THREAD.with(|t| {
        let mut states = t.borrow_mut();
        let i = match states.iter().position(|s| s.runtime == runtime) {
            Some(i) => i,
            None => {
                states.push(ThreadState {
                    runtime,
                    device: 0,
                    streams: Vec::new(),
                });
                states.len() - 1
            }
        };
        f(&mut states[i])
    })
}

// ---------------------------------------------------------------------------------------
// the core: driver, devices, streams, events (shared with the allocators' event adapter)

struct StreamSlot<S> {
    raw: S,
    /// The graph capturing on this stream (0: none).
    capturing: AtomicU64,
    /// Whether the stream joined that capture by waiting for one of its events (rather than
    /// starting it with `graph_capture_begin`).
    joined: AtomicBool,
}

impl<S> StreamSlot<S> {
    fn new(raw: S) -> Self {
        StreamSlot {
            raw,
            capturing: AtomicU64::new(0),
            joined: AtomicBool::new(false),
        }
    }
}

struct DeviceCtx<S> {
    /// Index 0 is the default stream; pooled and new streams follow in creation order.
    streams: RwLock<Vec<Arc<StreamSlot<S>>>>,
    /// Indices of the pooled streams, per priority, created on first use.
    pool: [Lazy<Box<[u32]>>; 2],
    round_robin: [AtomicUsize; 2],
    generator: Arc<Generator>,
}

struct Core<D: Driver> {
    driver: Arc<D>,
    count: u32,
    devices: Box<[Lazy<DeviceCtx<D::Stream>>]>,
    events: EventPool<D::Event>,
    /// The profiler (`profiler_start_trace`); one relaxed load on hot paths while off.
    profiler: Arc<Profiler>,
}

type StreamRef<D> = Arc<StreamSlot<<D as Driver>::Stream>>;
type Slot<D> = EventSlot<<D as Driver>::Event>;

impl<D: Driver> Core<D> {
    #[inline]
    fn check_device(&self, device: u32) -> Result<()> {
        if device < self.count {
            Ok(())
        } else {
            Err(self.invalid_device(device))
        }
    }

    #[cold]
    fn invalid_device(&self, device: u32) -> Error {
        Error::InvalidDevice {
            backend: D::KIND,
            index: device,
            count: self.count,
        }
    }

    /// The device's state, created (with its default stream) on first use.
    #[inline]
    fn device(&self, device: u32) -> Result<&DeviceCtx<D::Stream>> {
        let lazy = self
            .devices
            .get(device as usize)
            .ok_or_else(|| self.invalid_device(device))?;
        lazy.get_or_try_init(|| {
            let default = self
                .driver
                .stream_create(device, StreamPriority::Normal, true)?;
            Ok(DeviceCtx {
                streams: RwLock::new(vec![Arc::new(StreamSlot::new(default))]),
                pool: [Lazy::new(), Lazy::new()],
                round_robin: [AtomicUsize::new(0), AtomicUsize::new(0)],
                generator: Arc::new(Generator::default()),
            })
        })
    }

    fn handle(&self, device: u32, index: u32) -> Stream {
        Stream {
            device: Device {
                kind: D::KIND,
                index: device,
            },
            index,
        }
    }

    #[cold]
    fn bad_stream(&self, s: Stream, reason: String) -> Error {
        Error::InvalidStream {
            backend: D::KIND,
            device: s.device.index,
            stream: s.index,
            reason,
        }
    }

    /// The stream behind a handle, after checking it belongs to this backend.
    #[inline]
    fn stream(&self, s: Stream) -> Result<StreamRef<D>> {
        if s.device.kind != D::KIND {
            return Err(self.bad_stream(
                s,
                format!("it is a {} stream, not a {} one", s.device.kind, D::KIND),
            ));
        }
        let ctx = self.device(s.device.index)?;
        let found = ctx.streams.read().get(s.index as usize).cloned();
        found.ok_or_else(|| self.unknown_stream(ctx, s))
    }

    /// Run `f` on the stream behind a handle (checked as in [`Core::stream`]) under the stream
    /// table's read lock, without reference-count traffic: for hot paths. `f` must not take
    /// the table's lock again.
    #[inline]
    fn with_stream_slot<R>(
        &self,
        s: Stream,
        f: impl FnOnce(&StreamSlot<D::Stream>) -> Result<R>,
    ) -> Result<R> {
        if s.device.kind != D::KIND {
            return Err(self.bad_stream(
                s,
                format!("it is a {} stream, not a {} one", s.device.kind, D::KIND),
            ));
        }
        let ctx = self.device(s.device.index)?;
        let streams = ctx.streams.read();
        match streams.get(s.index as usize) {
            Some(slot) => f(slot),
            None => {
                drop(streams);
                Err(self.unknown_stream(ctx, s))
            }
        }
    }

    #[cold]
    fn unknown_stream(&self, ctx: &DeviceCtx<D::Stream>, s: Stream) -> Error {
        let n = ctx.streams.read().len();
        self.bad_stream(
            s,
            format!(
                "{} has {n} stream(s) (indices 0..{n}); take handles from default_stream, \
                 stream_from_pool or new_stream",
                s.device
            ),
        )
    }

    fn add_streams(&self, device: u32, priority: StreamPriority, n: usize) -> Result<Vec<u32>> {
        let ctx = self.device(device)?;
        let raws = (0..n)
            .map(|_| self.driver.stream_create(device, priority, false))
            .collect::<Result<Vec<_>>>()?;
        let mut streams = ctx.streams.write();
        Ok(raws
            .into_iter()
            .map(|raw| {
                streams.push(Arc::new(StreamSlot::new(raw)));
                (streams.len() - 1) as u32
            })
            .collect())
    }

    #[inline]
    fn check_not_capturing(
        &self,
        slot: &StreamSlot<D::Stream>,
        s: Stream,
        what: &str,
    ) -> Result<()> {
        match slot.capturing.load(Ordering::Acquire) {
            0 => Ok(()),
            graph => Err(Error::Graph(format!(
                "cannot {what} {s} while it is capturing graph {graph}: end the capture first"
            ))),
        }
    }

    // ---- events (shared by the id API, RAII handles and the allocator adapter) ----------

    #[inline]
    fn record(&self, ev: &Slot<D>, stream: Stream) -> Result<()> {
        self.record_as(ev, stream, "event_record", true)
    }

    /// Record `ev` on `stream`; `name` is what a profiler trace calls it (the allocator's own
    /// events are told apart from the program's). On a capturing stream the event marks a
    /// point of the capture (`in_capture`; the allocator's events may not).
    fn record_as(
        &self,
        ev: &Slot<D>,
        stream: Stream,
        name: &'static str,
        in_capture: bool,
    ) -> Result<()> {
        let graph = self.with_stream_slot(stream, |slot| {
            if ev.device() != stream.device.index {
                return Err(Error::Event(format!(
                    "an event of {}:{} cannot be recorded on {stream}, a stream of another device",
                    D::KIND,
                    ev.device()
                )));
            }
            match slot.capturing.load(Ordering::Acquire) {
                0 => self.driver.event_record(ev.raw(), &slot.raw).map(|()| 0),
                graph if in_capture => self
                    .driver
                    .event_record_captured(ev.raw(), &slot.raw)
                    .map(|()| graph),
                _ => self
                    .check_not_capturing(slot, stream, "record an allocator event on")
                    .map(|()| 0),
            }
        })?;
        ev.mark_recorded(graph);
        if self.profiler.active() {
            self.profile_instant(name, stream, ev.timing());
        }
        Ok(())
    }

    fn sync_record(&self, ev: &Slot<D>, stream: Stream) -> Result<()> {
        self.record(ev, stream)?;
        let slot = self.stream(stream)?;
        self.driver.stream_commit(&slot.raw)
    }

    /// `Err` for an event recorded inside a capture: it marks a point of a graph, not of
    /// the device, so it cannot be waited for on the host.
    #[inline]
    fn check_not_captured(&self, ev: &Slot<D>, what: &str) -> Result<()> {
        match ev.captured_in() {
            0 => Ok(()),
            graph => Err(self.captured_event(graph, what)),
        }
    }

    #[cold]
    fn captured_event(&self, graph: u64, what: &str) -> Error {
        Error::Event(format!(
            "cannot {what} an event recorded while a stream was capturing graph {graph}: it \
             marks a point inside the graph, not on the device; record it again outside the \
             capture (after a replay) to wait for the device"
        ))
    }

    #[inline]
    fn query(&self, ev: &Slot<D>) -> Result<bool> {
        if !ev.is_recorded() {
            return Ok(true);
        }
        self.check_not_captured(ev, "query")?;
        self.driver.event_query(ev.raw())
    }

    fn synchronize(&self, ev: &Slot<D>) -> Result<()> {
        if !ev.is_recorded() {
            return Ok(());
        }
        self.check_not_captured(ev, "synchronize")?;
        if self.profiler.active() {
            return self.profile_timed("event_synchronize", ev.device(), None, || {
                self.driver.event_synchronize(ev.raw())
            });
        }
        self.driver.event_synchronize(ev.raw())
    }

    /// Make `stream` wait for `ev`. Inside captures: a stream that is not capturing and
    /// waits for an event recorded in graph G's capture joins that capture (its work is
    /// captured into G from now on, and its allocations go to G's pool); a stream capturing
    /// G may wait for events recorded in G (a join). Other mixes are refused.
    fn wait(&self, ev: &Slot<D>, stream: Stream) -> Result<()> {
        let slot = self.stream(stream)?;
        if !ev.is_recorded() {
            self.check_not_capturing(&slot, stream, "wait for an event on")?;
            return Ok(());
        }
        let captured = ev.captured_in();
        let capturing = slot.capturing.load(Ordering::Acquire);
        match (captured, capturing) {
            (0, 0) => self.driver.stream_wait_event(&slot.raw, ev.raw())?,
            (0, graph) => {
                return Err(Error::Graph(format!(
                    "{stream} is capturing graph {graph} and cannot wait for an event recorded \
                     outside the capture: a graph can only wait for points inside it (record \
                     the event on a stream of the capture)"
                )))
            }
            (graph, 0) => {
                if ev.device() != stream.device.index {
                    return Err(Error::Graph(format!(
                        "{stream} cannot join the capture of graph {graph}, which runs on {}:{}",
                        D::KIND,
                        ev.device()
                    )));
                }
                let origin = self.capture_origin(stream.device.index, graph)?;
                if let Err(other) =
                    slot.capturing
                        .compare_exchange(0, graph, Ordering::AcqRel, Ordering::Acquire)
                {
                    return Err(Error::Graph(format!(
                        "{stream} started capturing graph {other} meanwhile"
                    )));
                }
                slot.joined.store(true, Ordering::Release);
                if let Err(e) = self.driver.capture_join(&slot.raw, &origin.raw, ev.raw()) {
                    slot.joined.store(false, Ordering::Release);
                    slot.capturing.store(0, Ordering::Release);
                    return Err(e);
                }
            }
            (a, b) if a == b => self.driver.stream_wait_event(&slot.raw, ev.raw())?,
            (a, b) => {
                return Err(Error::Graph(format!(
                    "{stream} is capturing graph {b} and cannot wait for an event recorded in \
                     the capture of graph {a}"
                )))
            }
        }
        if self.profiler.active() {
            self.profile_instant("event_wait", stream, ev.timing());
        }
        Ok(())
    }

    /// The stream whose `graph_capture_begin` started the capture of `graph` (the stream of
    /// `device` capturing it that was not joined later).
    fn capture_origin(&self, device: u32, graph: u64) -> Result<StreamRef<D>> {
        let ctx = self.device(device)?;
        let streams = ctx.streams.read();
        streams
            .iter()
            .find(|s| {
                s.capturing.load(Ordering::Acquire) == graph && !s.joined.load(Ordering::Acquire)
            })
            .cloned()
            .ok_or_else(|| {
                Error::Graph(format!(
                    "graph {graph} is no longer capturing: an event recorded in its capture \
                     can only be waited for until graph_capture_end"
                ))
            })
    }

    /// End the membership of the streams that joined the capture of `graph` on `device`
    /// (after the origin stream's capture ended, giving `captured`). The first driver error
    /// is returned.
    fn leave_capture(&self, device: u32, graph: u64, captured: Option<&D::Graph>) -> Result<()> {
        let ctx = self.device(device)?;
        let joined: Vec<StreamRef<D>> = ctx
            .streams
            .read()
            .iter()
            .filter(|s| s.capturing.load(Ordering::Acquire) == graph)
            .cloned()
            .collect();
        let mut first_error = None;
        for s in joined {
            if let Err(e) = self.driver.capture_leave(&s.raw, captured) {
                first_error.get_or_insert(e);
            }
            s.joined.store(false, Ordering::Release);
            s.capturing.store(0, Ordering::Release);
        }
        first_error.map_or(Ok(()), Err)
    }

    // ---- profiler (entered only while a trace runs) ---------------------------------------

    #[cold]
    fn profile_instant(&self, name: &str, stream: Stream, timing: bool) {
        self.profiler.record(
            None,
            |m| m.events,
            name,
            "event",
            Phase::Instant,
            None,
            stream.device.index,
            Some(stream.index),
            serde_json::json!({ "timing": timing }),
        );
    }

    #[cold]
    fn profile_timed(
        &self,
        name: &str,
        device: u32,
        stream: Option<u32>,
        f: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let start = self.profiler.now();
        let result = f();
        if let (Some((t0, id)), Some((t1, _))) = (start, self.profiler.now()) {
            self.profiler.record(
                Some(id),
                |m| m.events,
                name,
                "sync",
                Phase::Complete { dur_us: t1 - t0 },
                Some(t0),
                device,
                stream,
                serde_json::json!({ "ok": result.is_ok() }),
            );
        }
        result
    }

    /// Wrap a host task so that its execution is recorded as a slice on its stream's track.
    #[cold]
    fn profile_task(&self, task: HostTask, stream: Stream) -> HostTask {
        let Some((launched, session)) = self.profiler.now() else {
            return task;
        };
        let (device, index) = (stream.device.index, Some(stream.index));
        self.profiler.record(
            Some(session),
            |m| m.tasks,
            "launch_host",
            "task",
            Phase::Instant,
            Some(launched),
            device,
            index,
            serde_json::json!({}),
        );
        let profiler = Arc::clone(&self.profiler);
        Arc::new(move || {
            let start = profiler.now();
            task();
            if let (Some((t0, id)), Some((t1, _))) = (start, profiler.now()) {
                if id == session {
                    profiler.record(
                        Some(id),
                        |m| m.tasks,
                        "host task",
                        "task",
                        Phase::Complete { dur_us: t1 - t0 },
                        Some(t0),
                        device,
                        index,
                        serde_json::json!({ "queued_us": t0 - launched }),
                    );
                }
            }
        })
    }

    fn notify(&self, ev: &Slot<D>, callback: EventCallback) -> Result<()> {
        if !ev.is_recorded() {
            callback();
            return Ok(());
        }
        self.check_not_captured(ev, "wait (notify) for")?;
        self.driver.event_notify(ev.raw(), callback)
    }

    /// When a completed timing event completed, in ms on [`crate::event::clock_ms`]'s clock.
    fn completion_time(&self, ev: &Slot<D>, id: Option<EventId>) -> Result<f64> {
        let name = id.map_or_else(|| "the event".to_string(), |id| id.to_string());
        if !ev.timing() {
            return Err(Error::Event(format!(
                "{name} has no completion time: it was not created with enable_timing=true; \
                 acquire it with enable_timing"
            )));
        }
        if !ev.is_recorded() {
            return Err(Error::Event(format!(
                "{name} has no completion time: it was never recorded"
            )));
        }
        self.check_not_captured(ev, "read the completion time of")?;
        let ns = self
            .driver
            .event_completion_ns(ev.raw())
            .map_err(|e| match e {
                Error::Event(m) => Error::Event(format!("{name}: {m}")),
                other => other,
            })?;
        Ok(ns as f64 / 1e6)
    }

    fn elapsed(
        &self,
        start: &Slot<D>,
        end: &Slot<D>,
        ids: (Option<EventId>, Option<EventId>),
    ) -> Result<f64> {
        let name = |id: Option<EventId>, role: &str| match id {
            Some(id) => format!("{role} {id}"),
            None => format!("the {role} event"),
        };
        let (a, b) = (name(ids.0, "start"), name(ids.1, "end"));
        if !start.timing() || !end.timing() {
            let flag = |s: &Slot<D>| {
                if s.timing() {
                    "timing on"
                } else {
                    "timing off"
                }
            };
            return Err(Error::Event(format!(
                "cannot compute the elapsed time from {a} to {b}: events were not created with \
                 enable_timing=true ({a}: {}, {b}: {}); acquire both with enable_timing",
                flag(start),
                flag(end)
            )));
        }
        for (ev, label) in [(start, &a), (end, &b)] {
            self.check_not_captured(ev, "time")?;
            if !ev.is_recorded() {
                return Err(Error::Event(format!(
                    "cannot compute the elapsed time from {a} to {b}: {label} was never recorded"
                )));
            }
        }
        self.driver
            .event_elapsed_ms(start.raw(), end.raw())
            .map_err(|e| match e {
                Error::Event(m) => Error::Event(format!("elapsed time from {a} to {b}: {m}")),
                other => other,
            })
    }
}

/// The allocators' view of the event pool: a ticket is an event id.
struct PoolStreamEvents<D: Driver> {
    core: Arc<Core<D>>,
}

impl<D: Driver> StreamEvents for PoolStreamEvents<D> {
    fn record(&self, stream: Stream) -> Result<u64> {
        self.core.stream(stream)?;
        let ev = self.core.events.acquire(stream.device.index, false)?;
        self.core
            .record_as(&ev, stream, "allocator event_record", false)?;
        Ok(ev.into_id().0)
    }
    fn query(&self, ticket: u64) -> Result<bool> {
        self.core.query(&*self.core.events.get(EventId(ticket))?)
    }
    fn synchronize(&self, ticket: u64) -> Result<()> {
        self.core
            .synchronize(&*self.core.events.get(EventId(ticket))?)
    }
    fn wait(&self, stream: Stream, ticket: u64) -> Result<()> {
        self.core
            .wait(&*self.core.events.get(EventId(ticket))?, stream)
    }
    fn release(&self, ticket: u64) {
        // A ticket the allocator releases twice is its bug, and harmless here.
        let _ = self.core.events.release_id(EventId(ticket));
    }
    fn synchronize_device(&self, device: u32) -> Result<()> {
        let ctx = self.core.device(device)?;
        let streams: Vec<StreamRef<D>> = ctx.streams.read().clone();
        for (i, s) in streams.iter().enumerate() {
            // Waiting would break a capture in progress: the allocator then keeps its memory.
            self.core.check_not_capturing(
                s,
                self.core.handle(device, i as u32),
                "synchronize the device of",
            )?;
        }
        let raws: Vec<&D::Stream> = streams.iter().map(|s| &s.raw).collect();
        self.core.driver.device_synchronize(device, &raws)
    }
}

// ---------------------------------------------------------------------------------------
// graphs

enum GraphState<G> {
    Empty,
    Capturing {
        stream: Stream,
    },
    Captured {
        graph: Arc<G>,
        stream: Stream,
        instantiated: bool,
    },
}

struct GraphEntry<G> {
    device: u32,
    /// Keep the captured graph after capture; instantiate on request (PyTorch's keep_graph).
    keep_graph: bool,
    pool: MempoolId,
    state: GraphState<G>,
}

impl<D: Driver> Runtime<D> {
    /// Drop a graph's use of its private pool (its memory goes back once nothing uses it).
    fn release_graph_pool(&self, entry: &mut GraphEntry<D::Graph>) -> Result<()> {
        let pool = std::mem::replace(&mut entry.pool, MempoolId::NONE);
        if pool.is_none() {
            return Ok(());
        }
        let allocator = self.allocator(entry.device)?;
        if allocator.pool_use_count(pool).is_some() {
            allocator.release_pool(pool)?;
        }
        Ok(())
    }
}

#[cold]
fn unknown_graph(g: GraphId) -> Error {
    Error::Graph(format!(
        "unknown graph id {}: it was never created by this backend or was destroyed",
        g.0
    ))
}

// ---------------------------------------------------------------------------------------
// the runtime

struct Ready<D: Driver> {
    core: Arc<Core<D>>,
    allocators: Box<[Lazy<Arc<CachingAllocator>>]>,
    /// (device, peer) pairs with peer access enabled.
    peers: Mutex<std::collections::HashSet<(u32, u32)>>,
    pinned: Lazy<Arc<PinnedAllocator>>,
    graphs: Mutex<HashMap<u64, GraphEntry<D::Graph>>>,
    next_graph: AtomicU64,
}

type Probe<D> = Box<dyn FnOnce() -> std::result::Result<D, String> + Send>;

/// A [`Backend`] built from a [`Driver`]. Initialises on first use; thread-safe.
///
/// Several runtimes may exist at once (tests build host runtimes with different device
/// counts); each has its own per-thread current device and streams.
pub struct Runtime<D: Driver> {
    id: u64,
    probe: Mutex<Option<Probe<D>>>,
    state: OnceLock<std::result::Result<Ready<D>, String>>,
}

impl<D: Driver> Default for Runtime<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: Driver> std::fmt::Debug for Runtime<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state.get() {
            None => "not initialised".to_string(),
            Some(Ok(r)) => format!("{} device(s)", r.core.count),
            Some(Err(reason)) => format!("unavailable: {reason}"),
        };
        f.debug_struct("Runtime")
            .field("kind", &D::KIND)
            .field("state", &state)
            .finish()
    }
}

impl<D: Driver> Runtime<D> {
    /// A runtime that opens its driver with [`Driver::probe`] on first use.
    pub fn new() -> Self {
        Self::with_probe(D::probe)
    }

    /// A runtime over an opened driver.
    pub fn with_driver(driver: D) -> Self {
        Self::with_probe(move || Ok(driver))
    }

    /// A runtime that opens its driver with `probe` on first use; an `Err` is the reason the
    /// backend is unavailable.
    pub fn with_probe(
        probe: impl FnOnce() -> std::result::Result<D, String> + Send + 'static,
    ) -> Self {
        // Completion times are on accelrt's clock, which starts at its first reading: start it
        // now, before any event of this runtime can complete.
        let _ = crate::event::clock_ns();
        Runtime {
            id: NEXT_RUNTIME_ID.fetch_add(1, Ordering::Relaxed),
            probe: Mutex::new(Some(Box::new(probe))),
            state: OnceLock::new(),
        }
    }

    #[cold]
    fn open(&self) -> std::result::Result<Ready<D>, String> {
        let probe = self
            .probe
            .lock()
            .take()
            .ok_or("the driver probe panicked during an earlier initialisation")?;
        let driver = Arc::new(probe()?);
        let count = driver.device_count();
        if count == 0 {
            return Err(format!("the {} driver reports no devices", D::KIND));
        }
        let factory = Arc::clone(&driver);
        let core = Arc::new(Core {
            count,
            devices: (0..count).map(|_| Lazy::new()).collect(),
            events: EventPool::new(count, move |device, timing| {
                factory.event_create(device, timing)
            }),
            driver,
            profiler: Arc::new(Profiler::default()),
        });
        Ok(Ready {
            core,
            allocators: (0..count).map(|_| Lazy::new()).collect(),
            peers: Mutex::new(std::collections::HashSet::new()),
            pinned: Lazy::new(),
            graphs: Mutex::new(HashMap::new()),
            next_graph: AtomicU64::new(1),
        })
    }

    /// The opened driver, or why it could not be opened (opens it on first use).
    #[inline]
    fn state(&self) -> &std::result::Result<Ready<D>, String> {
        self.state.get_or_init(|| self.open())
    }

    /// The opened runtime, or [`Error::NeedsBackend`] naming `call`.
    #[inline]
    fn ready(&self, call: &'static str) -> Result<&Ready<D>> {
        match self.state() {
            Ok(r) => Ok(r),
            Err(reason) => Err(Self::needs(call, reason)),
        }
    }

    #[cold]
    fn needs(call: &'static str, reason: &str) -> Error {
        Error::NeedsBackend {
            call,
            needs: D::KIND,
            reason: reason.to_string(),
        }
    }

    #[inline]
    fn core(&self, call: &'static str) -> Result<&Core<D>> {
        Ok(&self.ready(call)?.core)
    }

    /// The opened driver.
    pub fn driver(&self) -> Result<&D> {
        Ok(&self.core("driver")?.driver)
    }

    /// The event pool behind both event APIs.
    pub fn event_pool(&self) -> Result<&EventPool<D::Event>> {
        Ok(&self.core("event_pool")?.events)
    }

    /// An event from the pool as an RAII handle (returned to the pool on drop): the fast path.
    #[inline]
    pub fn event(&self, device: u32, enable_timing: bool) -> Result<Event<'_, D>> {
        let core = self.core("event")?;
        core.check_device(device)?;
        Ok(Event {
            core,
            ev: core.events.acquire(device, enable_timing)?,
        })
    }

    /// Run `f` with the driver and the native stream behind `stream`, for driver-specific
    /// work in stream order (kernel launches, copies). The handle is checked like everywhere
    /// else; `f` may launch work while the stream is capturing (that is how graphs get
    /// their work).
    pub fn with_stream<R>(
        &self,
        stream: Stream,
        f: impl FnOnce(&D, &D::Stream) -> Result<R>,
    ) -> Result<R> {
        let core = self.core("with_stream")?;
        let slot = core.stream(stream)?;
        f(&core.driver, &slot.raw)
    }

    fn events_adapter(ready: &Ready<D>) -> Arc<dyn StreamEvents> {
        Arc::new(PoolStreamEvents {
            core: Arc::clone(&ready.core),
        })
    }

    /// Index of the calling thread's current stream on `device` (0 until set).
    fn current_index(&self, device: u32) -> u32 {
        with_thread(self.id, |t| {
            t.streams
                .iter()
                .find(|(d, _)| *d == device)
                .map_or(0, |&(_, i)| i)
        })
    }

    /// The caching allocator of `device`, created on first use.
    fn device_allocator(&self, ready: &Ready<D>, device: u32) -> Result<Arc<CachingAllocator>> {
        ready.core.check_device(device)?;
        ready.allocators[device as usize]
            .get_or_try_init(|| {
                let config = AllocatorConfig::from_env()?;
                let provider = ready.core.driver.memory_provider(device)?;
                let dev = Device {
                    kind: D::KIND,
                    index: device,
                };
                let allocator = Arc::new(CachingAllocator::new(
                    dev,
                    provider,
                    Some(Self::events_adapter(ready)),
                    config,
                )?);
                if ready.core.profiler.active()
                    && ready.core.profiler.mode().is_some_and(|m| m.allocations)
                {
                    profile_allocator(&ready.core.profiler, device, &allocator);
                }
                Ok(allocator)
            })
            .cloned()
    }

    fn create_graph(&self, call: &'static str, device: u32, keep_graph: bool) -> Result<GraphId> {
        let ready = self.ready(call)?;
        ready.core.check_device(device)?;
        let id = ready.next_graph.fetch_add(1, Ordering::Relaxed);
        ready.graphs.lock().insert(
            id,
            GraphEntry {
                device,
                keep_graph,
                pool: MempoolId::NONE,
                state: GraphState::Empty,
            },
        );
        Ok(GraphId(id))
    }

    /// Run `f` with the driver and the driver's graph behind `graph` (captured, possibly not
    /// instantiated), for driver-specific inspection.
    pub fn with_graph<R>(
        &self,
        graph: GraphId,
        f: impl FnOnce(&D, &D::Graph) -> Result<R>,
    ) -> Result<R> {
        let driver = &self.core("with_graph")?.driver;
        let g = self.graph_entry("with_graph", graph, |entry| match &entry.state {
            GraphState::Captured { graph, .. } => Ok(Arc::clone(graph)),
            _ => Err(Error::Graph(format!(
                "graph {} holds no finished capture",
                graph.0
            ))),
        })?;
        f(driver, &g)
    }

    fn graph_entry<R>(
        &self,
        call: &'static str,
        g: GraphId,
        f: impl FnOnce(&mut GraphEntry<D::Graph>) -> Result<R>,
    ) -> Result<R> {
        let mut graphs = self.ready(call)?.graphs.lock();
        f(graphs.get_mut(&g.0).ok_or_else(|| unknown_graph(g))?)
    }
}

/// A pooled event with the runtime's operations, after PyTorch's `MPSEvent`. Returns to the
/// pool when dropped.
pub struct Event<'a, D: Driver> {
    core: &'a Core<D>,
    ev: PooledEvent<'a, D::Event>,
}

impl<D: Driver> std::fmt::Debug for Event<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.ev, f)
    }
}

impl<D: Driver> Event<'_, D> {
    /// Mark the current end of `stream` (a stream of the event's device).
    #[inline]
    pub fn record(&self, stream: Stream) -> Result<()> {
        self.core.record(&self.ev, stream)
    }
    /// Record, then flush the stream so the event can complete without further work.
    pub fn sync_record(&self, stream: Stream) -> Result<()> {
        self.core.sync_record(&self.ev, stream)
    }
    /// True when complete; true for an event never recorded.
    #[inline]
    pub fn query(&self) -> Result<bool> {
        self.core.query(&self.ev)
    }
    /// Block until the event completes.
    pub fn synchronize(&self) -> Result<()> {
        self.core.synchronize(&self.ev)
    }
    /// Make later work on `stream` wait for this event.
    pub fn wait(&self, stream: Stream) -> Result<()> {
        self.core.wait(&self.ev, stream)
    }
    /// Milliseconds from this (start) event to `end`; both timing events, completed.
    pub fn elapsed_ms(&self, end: &Event<'_, D>) -> Result<f64> {
        self.core.elapsed(&self.ev, &end.ev, (None, None))
    }
    /// When this completed timing event completed, in ms on [`crate::event::clock_ms`]'s
    /// clock (MPS's `getCompletionTime`).
    pub fn completion_time_ms(&self) -> Result<f64> {
        self.core.completion_time(&self.ev, None)
    }
    /// Run `callback` once the event completes (now, if it has).
    pub fn notify(&self, callback: impl FnOnce() + Send + 'static) -> Result<()> {
        self.core.notify(&self.ev, Box::new(callback))
    }
    /// Whether the event records completion times.
    pub fn timing(&self) -> bool {
        self.ev.timing()
    }
    /// The device the event belongs to.
    pub fn device(&self) -> u32 {
        self.ev.device()
    }
    /// Hand the event over to the id API (released with `event_release`).
    pub fn into_id(self) -> EventId {
        self.ev.into_id()
    }
}

/// Sets the current device and restores the previous one on drop (PyTorch's `DeviceGuard`).
pub struct DeviceGuard<'a> {
    backend: &'a dyn Backend,
    previous: u32,
}

impl<'a> DeviceGuard<'a> {
    /// Make `device` current on this thread until the guard drops. An invalid device is an
    /// error and changes nothing.
    pub fn new(backend: &'a dyn Backend, device: u32) -> Result<Self> {
        let previous = backend.exchange_device(device)?;
        Ok(DeviceGuard { backend, previous })
    }

    /// The device that will be restored.
    pub fn previous(&self) -> u32 {
        self.previous
    }
}

impl Drop for DeviceGuard<'_> {
    fn drop(&mut self) {
        // `previous` was valid when read, and device counts never shrink.
        let _ = self.backend.set_device(self.previous);
    }
}

impl std::fmt::Debug for DeviceGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceGuard")
            .field("backend", &self.backend.device_type())
            .field("previous", &self.previous)
            .finish()
    }
}

impl<D: Driver> Backend for Runtime<D> {
    fn device_type(&self) -> DeviceType {
        D::KIND
    }

    fn is_built(&self) -> bool {
        true
    }

    fn init(&self) -> Result<()> {
        self.ready("init").map(drop)
    }

    fn is_available(&self) -> bool {
        self.state().is_ok()
    }

    fn unavailable_reason(&self) -> Option<String> {
        self.state().as_ref().err().cloned()
    }

    fn device_count(&self) -> u32 {
        self.state().as_ref().map_or(0, |r| r.core.count)
    }

    fn has_primary_context(&self, device: u32) -> bool {
        let Ok(ready) = self.state() else {
            return false;
        };
        if device >= ready.core.count {
            return false;
        }
        ready
            .core
            .driver
            .has_primary_context(device)
            .unwrap_or_else(|| ready.core.devices[device as usize].get().is_some())
    }

    fn current_device(&self) -> Result<u32> {
        self.ready("current_device")?;
        Ok(with_thread(self.id, |t| t.device))
    }

    fn set_device(&self, device: u32) -> Result<()> {
        self.core("set_device")?.check_device(device)?;
        with_thread(self.id, |t| t.device = device);
        Ok(())
    }

    fn exchange_device(&self, device: u32) -> Result<u32> {
        self.core("exchange_device")?.check_device(device)?;
        Ok(with_thread(self.id, |t| {
            std::mem::replace(&mut t.device, device)
        }))
    }

    fn maybe_exchange_device(&self, device: u32) -> Result<u32> {
        // The current device is per-thread state here: neither exchange creates a context.
        self.core("maybe_exchange_device")?.check_device(device)?;
        Ok(with_thread(self.id, |t| {
            std::mem::replace(&mut t.device, device)
        }))
    }

    fn device_synchronize(&self, device: u32) -> Result<()> {
        let core = self.core("device_synchronize")?;
        let ctx = core.device(device)?;
        let streams: Vec<StreamRef<D>> = ctx.streams.read().clone();
        for (i, s) in streams.iter().enumerate() {
            core.check_not_capturing(
                s,
                core.handle(device, i as u32),
                "synchronize the device of",
            )?;
        }
        let raws: Vec<&D::Stream> = streams.iter().map(|s| &s.raw).collect();
        if core.profiler.active() {
            return core.profile_timed("device_synchronize", device, None, || {
                core.driver.device_synchronize(device, &raws)
            });
        }
        core.driver.device_synchronize(device, &raws)
    }

    fn show_config(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "accelrt {}", env!("CARGO_PKG_VERSION"));
        let vars: Vec<&str> = match self.state() {
            Ok(r) => {
                let (major, minor) = r.core.driver.runtime_version();
                let _ = writeln!(
                    out,
                    "backend: {} (available), runtime {major}.{minor}",
                    D::KIND
                );
                let _ = writeln!(out, "devices: {}", r.core.count);
                for d in 0..r.core.count {
                    match r.core.driver.device_properties(d) {
                        Ok(p) => {
                            let _ = writeln!(
                                out,
                                "  {}:{d}: {}, {} memory, {} cores, capability {}.{}",
                                D::KIND,
                                p.name,
                                format_size(p.total_memory),
                                p.multiprocessor_count,
                                p.capability.0,
                                p.capability.1
                            );
                        }
                        Err(e) => {
                            let _ = writeln!(out, "  {}:{d}: properties unavailable: {e}", D::KIND);
                        }
                    }
                }
                r.core.driver.env_vars().to_vec()
            }
            Err(reason) => {
                let _ = writeln!(out, "backend: {} (unavailable: {reason})", D::KIND);
                Vec::new()
            }
        };
        let _ = writeln!(out, "environment:");
        for var in vars.iter().copied().chain([ALLOC_CONF_ENV]) {
            match std::env::var_os(var) {
                Some(v) => {
                    let _ = writeln!(out, "  {var}={}", v.to_string_lossy());
                }
                None => {
                    let _ = writeln!(out, "  {var} (unset)");
                }
            }
        }
        match AllocatorConfig::from_env() {
            Ok(c) => {
                let _ = writeln!(out, "allocator: {}", c.to_conf_string());
            }
            Err(e) => {
                let _ = writeln!(out, "allocator: {e}");
            }
        }
        out
    }

    fn device_properties(&self, device: u32) -> Result<DeviceProperties> {
        let core = self.core("device_properties")?;
        core.check_device(device)?;
        core.driver.device_properties(device)
    }

    fn device_capability(&self, device: u32) -> Result<(u32, u32)> {
        let core = self.core("device_capability")?;
        core.check_device(device)?;
        Ok(core.driver.device_properties(device)?.capability)
    }

    fn runtime_version(&self) -> Result<(u32, u32)> {
        Ok(self.core("runtime_version")?.driver.runtime_version())
    }

    fn runtime_version_at_least(&self, major: u32, minor: u32) -> Result<bool> {
        Ok(self
            .core("runtime_version_at_least")?
            .driver
            .runtime_version()
            >= (major, minor))
    }

    fn device_from_ptr(&self, ptr: usize) -> Result<Device> {
        let ready = self.ready("device_from_ptr")?;
        let device = |index| Device {
            kind: D::KIND,
            index,
        };
        for (index, lazy) in ready.allocators.iter().enumerate() {
            if lazy.get().is_some_and(|a| a.contains(ptr)) {
                return Ok(device(index as u32));
            }
        }
        match ready.core.driver.device_of_ptr(ptr) {
            Some(index) if index < ready.core.count => Ok(device(index)),
            _ => Err(Error::InvalidPointer {
                ptr,
                context: "device_from_ptr: it is not memory of any device of this backend",
            }),
        }
    }

    // ---- streams ------------------------------------------------------------------------

    fn default_stream(&self, device: u32) -> Result<Stream> {
        let core = self.core("default_stream")?;
        core.device(device)?;
        Ok(core.handle(device, 0))
    }

    fn current_stream(&self, device: u32) -> Result<Stream> {
        let core = self.core("current_stream")?;
        core.device(device)?;
        Ok(core.handle(device, self.current_index(device)))
    }

    fn current_raw_stream(&self, device: u32) -> Result<u64> {
        let core = self.core("current_raw_stream")?;
        core.device(device)?;
        let slot = core.stream(core.handle(device, self.current_index(device)))?;
        Ok(core.driver.stream_native_handle(&slot.raw))
    }

    fn set_current_stream(&self, stream: Stream) -> Result<()> {
        self.core("set_current_stream")?.stream(stream)?;
        let (device, index) = (stream.device.index, stream.index);
        with_thread(self.id, |t| {
            match t.streams.iter_mut().find(|(d, _)| *d == device) {
                Some(entry) => entry.1 = index,
                None => t.streams.push((device, index)),
            }
        });
        Ok(())
    }

    fn stream_from_pool(&self, device: u32, priority: StreamPriority) -> Result<Stream> {
        let core = self.core("stream_from_pool")?;
        let ctx = core.device(device)?;
        let p = priority_index(priority);
        let pool = ctx.pool[p].get_or_try_init(|| {
            Ok(core
                .add_streams(device, priority, POOL_STREAMS_PER_PRIORITY)?
                .into_boxed_slice())
        })?;
        let next = ctx.round_robin[p].fetch_add(1, Ordering::Relaxed);
        Ok(core.handle(device, pool[next % pool.len()]))
    }

    fn new_stream(&self, device: u32, priority: StreamPriority) -> Result<Stream> {
        let core = self.core("new_stream")?;
        let index = core.add_streams(device, priority, 1)?[0];
        Ok(core.handle(device, index))
    }

    fn stream_native_handle(&self, stream: Stream) -> Result<u64> {
        let core = self.core("stream_native_handle")?;
        Ok(core.driver.stream_native_handle(&core.stream(stream)?.raw))
    }

    unsafe fn wrap_external_stream(&self, device: u32, handle: u64) -> Result<Stream> {
        let core = self.core("wrap_external_stream")?;
        let ctx = core.device(device)?;
        let known = |streams: &[StreamRef<D>]| {
            streams
                .iter()
                .position(|s| core.driver.stream_native_handle(&s.raw) == handle)
        };
        if let Some(i) = known(&ctx.streams.read()) {
            return Ok(core.handle(device, i as u32));
        }
        // SAFETY: forwarded from this method's contract.
        let raw = unsafe { core.driver.stream_wrap(device, handle)? };
        let mut streams = ctx.streams.write();
        if let Some(i) = known(&streams) {
            return Ok(core.handle(device, i as u32));
        }
        streams.push(Arc::new(StreamSlot::new(raw)));
        Ok(core.handle(device, (streams.len() - 1) as u32))
    }

    fn stream_commit(&self, stream: Stream) -> Result<()> {
        let core = self.core("stream_commit")?;
        core.driver.stream_commit(&core.stream(stream)?.raw)
    }

    fn stream_synchronize(&self, stream: Stream) -> Result<()> {
        let core = self.core("stream_synchronize")?;
        let slot = core.stream(stream)?;
        core.check_not_capturing(&slot, stream, "synchronize")?;
        if core.profiler.active() {
            let (device, index) = (stream.device.index, Some(stream.index));
            return core.profile_timed("stream_synchronize", device, index, || {
                core.driver.stream_synchronize(&slot.raw)
            });
        }
        core.driver.stream_synchronize(&slot.raw)
    }

    fn stream_query(&self, stream: Stream) -> Result<bool> {
        let core = self.core("stream_query")?;
        let slot = core.stream(stream)?;
        core.check_not_capturing(&slot, stream, "query")?;
        core.driver.stream_query(&slot.raw)
    }

    fn launch_host(&self, stream: Stream, task: HostTask) -> Result<()> {
        let core = self.core("launch_host")?;
        let slot = core.stream(stream)?;
        let task = if core.profiler.active() {
            core.profile_task(task, stream)
        } else {
            task
        };
        core.driver.launch_host(&slot.raw, task)
    }

    // ---- events ---------------------------------------------------------------------------

    fn event_acquire(&self, device: u32, enable_timing: bool) -> Result<EventId> {
        let core = self.core("event_acquire")?;
        core.check_device(device)?;
        core.events.acquire_id(device, enable_timing)
    }

    fn event_release(&self, id: EventId) -> Result<()> {
        self.core("event_release")?.events.release_id(id)
    }

    #[inline]
    fn event_record(&self, id: EventId, stream: Stream) -> Result<()> {
        let core = self.core("event_record")?;
        core.record(&*core.events.get(id)?, stream)
    }

    fn event_sync_record(&self, id: EventId, stream: Stream) -> Result<()> {
        let core = self.core("event_sync_record")?;
        core.sync_record(&*core.events.get(id)?, stream)
    }

    fn event_wait(&self, id: EventId, stream: Stream) -> Result<()> {
        let core = self.core("event_wait")?;
        core.wait(&*core.events.get(id)?, stream)
    }

    fn event_synchronize(&self, id: EventId) -> Result<()> {
        let core = self.core("event_synchronize")?;
        core.synchronize(&*core.events.get(id)?)
    }

    #[inline]
    fn event_query(&self, id: EventId) -> Result<bool> {
        let core = self.core("event_query")?;
        core.query(&*core.events.get(id)?)
    }

    fn event_elapsed_time(&self, start: EventId, end: EventId) -> Result<f64> {
        let core = self.core("event_elapsed_time")?;
        let (a, b) = (core.events.get(start)?, core.events.get(end)?);
        core.elapsed(&a, &b, (Some(start), Some(end)))
    }

    fn event_completion_time(&self, id: EventId) -> Result<f64> {
        let core = self.core("event_completion_time")?;
        core.completion_time(&*core.events.get(id)?, Some(id))
    }

    fn event_notify(&self, id: EventId, callback: EventCallback) -> Result<()> {
        let core = self.core("event_notify")?;
        core.notify(&*core.events.get(id)?, callback)
    }

    fn event_pool_empty_cache(&self) -> Result<u64> {
        Ok(self.core("event_pool_empty_cache")?.events.empty_cache())
    }

    // ---- pinned host memory ---------------------------------------------------------------

    fn is_pinned_ptr(&self, ptr: usize) -> bool {
        self.state().as_ref().is_ok_and(|r| {
            r.pinned.get().is_some_and(|a| a.contains(ptr)) || r.core.driver.is_pinned_ptr(ptr)
        })
    }

    fn pinned_allocator(&self) -> Result<Arc<PinnedAllocator>> {
        let ready = self.ready("pinned_allocator")?;
        ready
            .pinned
            .get_or_try_init(|| {
                let provider = ready.core.driver.pinned_memory_provider()?;
                // Pinned buffers are used by work on the backend's streams (copies on CUDA
                // streams): with the event pool, `record_stream` gates their reuse.
                Ok(Arc::new(PinnedAllocator::new(
                    provider,
                    Some(Self::events_adapter(ready)),
                )))
            })
            .cloned()
    }

    // ---- random numbers -------------------------------------------------------------------

    fn default_generator(&self, device: u32) -> Result<Arc<Generator>> {
        Ok(Arc::clone(
            &self.core("default_generator")?.device(device)?.generator,
        ))
    }

    fn new_generator(&self, device: u32) -> Result<Arc<Generator>> {
        self.core("new_generator")?.check_device(device)?;
        Ok(Arc::new(Generator::default()))
    }

    // ---- graphs ---------------------------------------------------------------------------

    fn graph_create(&self, device: u32) -> Result<GraphId> {
        self.create_graph("graph_create", device, false)
    }

    fn graph_create_with(&self, device: u32, keep_graph: bool) -> Result<GraphId> {
        self.create_graph("graph_create_with", device, keep_graph)
    }

    fn graph_capture_begin(&self, graph: GraphId, stream: Stream, pool: MempoolId) -> Result<()> {
        let ready = self.ready("graph_capture_begin")?;
        let core = &ready.core;
        let slot = core.stream(stream)?;
        self.graph_entry("graph_capture_begin", graph, |entry| {
            if entry.device != stream.device.index {
                return Err(core.bad_stream(
                    stream,
                    format!(
                        "graph {} belongs to {}:{}; capture it on a stream of that device",
                        graph.0,
                        D::KIND,
                        entry.device
                    ),
                ));
            }
            match entry.state {
                GraphState::Empty => {}
                GraphState::Capturing { stream } => {
                    return Err(Error::Graph(format!(
                        "graph {} is already capturing on {stream}",
                        graph.0
                    )))
                }
                GraphState::Captured { .. } => {
                    return Err(Error::Graph(format!(
                        "graph {} already holds a capture: graph_reset it before capturing again",
                        graph.0
                    )))
                }
            }
            if let Err(other) =
                slot.capturing
                    .compare_exchange(0, graph.0, Ordering::AcqRel, Ordering::Acquire)
            {
                return Err(Error::Graph(format!(
                    "{stream} is already capturing graph {other}"
                )));
            }
            let pool = if pool.is_none() {
                MempoolId(graph.0, 0)
            } else {
                pool
            };
            // Allocations on the streams of the capture (this one, and any that join it by
            // waiting for an event recorded in it) now come from the graph's private pool, so
            // the addresses the graph uses stay reserved for its replays. A pool shared with
            // another graph gains a use; a new one starts with one.
            let allocator = self.allocator(entry.device)?;
            let shared = allocator.pool_use_count(pool).is_some();
            if shared {
                allocator.retain_pool(pool)?;
            }
            let members = Arc::clone(&ready.core);
            let filter = StreamFilter::Custom(Arc::new(move |s: Stream| {
                s.device.kind == D::KIND
                    && members
                        .stream(s)
                        .is_ok_and(|slot| slot.capturing.load(Ordering::Acquire) == graph.0)
            }));
            if let Err(e) = allocator.begin_allocate_to_pool(pool, filter) {
                slot.capturing.store(0, Ordering::Release);
                if shared {
                    let _ = allocator.release_pool(pool);
                }
                return Err(e);
            }
            if let Err(e) = core.driver.capture_begin(&slot.raw) {
                slot.capturing.store(0, Ordering::Release);
                let _ = allocator.end_allocate_to_pool(pool);
                let _ = allocator.release_pool(pool);
                return Err(e);
            }
            entry.pool = pool;
            entry.state = GraphState::Capturing { stream };
            Ok(())
        })
    }

    fn graph_capture_end(&self, graph: GraphId) -> Result<()> {
        let core = self.core("graph_capture_end")?;
        self.graph_entry("graph_capture_end", graph, |entry| {
            let GraphState::Capturing { stream } = entry.state else {
                return Err(Error::Graph(format!(
                    "graph {} is not capturing: call graph_capture_begin first",
                    graph.0
                )));
            };
            let slot = core.stream(stream)?;
            let captured = core.driver.capture_end(&slot.raw);
            slot.capturing.store(0, Ordering::Release);
            let left = core.leave_capture(stream.device.index, graph.0, captured.as_ref().ok());
            self.allocator(entry.device)?
                .end_allocate_to_pool(entry.pool)?;
            let g = match captured.and_then(|g| left.map(|()| g)) {
                Ok(g) => g,
                Err(e) => {
                    entry.state = GraphState::Empty;
                    return Err(e);
                }
            };
            // Without keep_graph, the graph is instantiated now and only its executable form
            // is kept (PyTorch's CUDAGraph::capture_end).
            let instantiated = !entry.keep_graph;
            if instantiated {
                if let Err(e) = core.driver.graph_instantiate(&g) {
                    entry.state = GraphState::Empty;
                    return Err(e);
                }
                core.driver.graph_discard_template(&g);
            }
            entry.state = GraphState::Captured {
                graph: Arc::new(g),
                stream,
                instantiated,
            };
            Ok(())
        })
    }

    fn graph_instantiate(&self, graph: GraphId) -> Result<()> {
        let core = self.core("graph_instantiate")?;
        self.graph_entry("graph_instantiate", graph, |entry| {
            let keep_graph = entry.keep_graph;
            match &mut entry.state {
                GraphState::Captured {
                    instantiated: true, ..
                } => Err(Error::Graph(if keep_graph {
                    format!("graph {} is already instantiated", graph.0)
                } else {
                    format!(
                        "graph {} was instantiated when its capture ended: graph_instantiate is \
                         for graphs created with keep_graph (graph_create_with(device, true))",
                        graph.0
                    )
                })),
                GraphState::Captured {
                    graph: g,
                    instantiated,
                    ..
                } => {
                    core.driver.graph_instantiate(g)?;
                    *instantiated = true;
                    Ok(())
                }
                _ => Err(Error::Graph(format!(
                    "graph {} has no finished capture to instantiate: capture it first \
                     (graph_capture_begin, launches, graph_capture_end)",
                    graph.0
                ))),
            }
        })
    }

    fn graph_is_instantiated(&self, graph: GraphId) -> Result<bool> {
        self.graph_entry("graph_is_instantiated", graph, |entry| {
            Ok(matches!(
                entry.state,
                GraphState::Captured {
                    instantiated: true,
                    ..
                }
            ))
        })
    }

    fn graph_replay(&self, graph: GraphId) -> Result<()> {
        let core = self.core("graph_replay")?;
        let (g, stream) =
            self.graph_entry("graph_replay", graph, |entry| match &mut entry.state {
                GraphState::Captured {
                    graph,
                    stream,
                    instantiated,
                } => {
                    // Like PyTorch's `replay`, instantiate on first use.
                    if !*instantiated {
                        core.driver.graph_instantiate(graph)?;
                        *instantiated = true;
                    }
                    Ok((Arc::clone(graph), *stream))
                }
                _ => Err(Error::Graph(format!(
                    "graph {} has no finished capture to replay: capture it first",
                    graph.0
                ))),
            })?;
        core.driver.graph_launch(&g, &core.stream(stream)?.raw)
    }

    fn graph_reset(&self, graph: GraphId) -> Result<()> {
        self.graph_entry("graph_reset", graph, |entry| {
            if let GraphState::Capturing { stream } = entry.state {
                return Err(Error::Graph(format!(
                    "graph {} is capturing on {stream}: end the capture before resetting it",
                    graph.0
                )));
            }
            entry.state = GraphState::Empty;
            self.release_graph_pool(entry)
        })
    }

    fn graph_destroy(&self, graph: GraphId) -> Result<()> {
        let ready = self.ready("graph_destroy")?;
        let mut graphs = ready.graphs.lock();
        match graphs.get(&graph.0) {
            None => Err(unknown_graph(graph)),
            Some(GraphEntry {
                state: GraphState::Capturing { stream },
                ..
            }) => Err(Error::Graph(format!(
                "graph {} is capturing on {stream}: end the capture before destroying it",
                graph.0
            ))),
            Some(_) => {
                let mut entry = graphs.remove(&graph.0).expect("matched above");
                drop(graphs);
                self.release_graph_pool(&mut entry)
            }
        }
    }

    fn graph_pool(&self, graph: GraphId) -> Result<MempoolId> {
        // (the graph holds one use of its pool from capture until reset or destroy)
        self.graph_entry("graph_pool", graph, |entry| {
            if entry.pool.is_none() {
                return Err(Error::Graph(format!(
                    "graph {} has no memory pool yet: it is assigned by graph_capture_begin",
                    graph.0
                )));
            }
            Ok(entry.pool)
        })
    }

    fn graph_pool_handle(&self, device: u32) -> Result<MempoolId> {
        let ready = self.ready("graph_pool_handle")?;
        ready.core.check_device(device)?;
        Ok(self.device_allocator(ready, device)?.new_pool_id())
    }

    // ---- memory ---------------------------------------------------------------------------

    fn allocator(&self, device: u32) -> Result<Arc<CachingAllocator>> {
        let ready = self.ready("allocator")?;
        self.device_allocator(ready, device)
    }

    fn memory_provider(&self, device: u32) -> Result<Arc<dyn crate::alloc::MemoryProvider>> {
        let core = self.core("memory_provider")?;
        core.check_device(device)?;
        core.driver.memory_provider(device)
    }

    fn empty_cache(&self, device: u32) -> Result<()> {
        let ready = self.ready("empty_cache")?;
        self.device_allocator(ready, device)?.empty_cache()
    }

    fn memory_stats(&self, device: u32) -> Result<crate::alloc::MemoryStats> {
        let ready = self.ready("memory_stats")?;
        Ok(self.device_allocator(ready, device)?.stats())
    }

    fn reset_peak_memory_stats(&self, device: u32) -> Result<()> {
        let ready = self.ready("reset_peak_memory_stats")?;
        self.device_allocator(ready, device)?.reset_peak_stats();
        Ok(())
    }

    fn set_memory_fraction(&self, device: u32, fraction: f64) -> Result<()> {
        let ready = self.ready("set_memory_fraction")?;
        self.device_allocator(ready, device)?
            .set_memory_fraction(fraction)
    }

    fn current_allocated_memory(&self, device: u32) -> Result<u64> {
        let ready = self.ready("current_allocated_memory")?;
        Ok(self.device_allocator(ready, device)?.allocated_bytes())
    }

    fn driver_allocated_memory(&self, device: u32) -> Result<u64> {
        let core = self.core("driver_allocated_memory")?;
        core.check_device(device)?;
        Ok(core.driver.memory_usage(device)?.used)
    }

    fn recommended_max_memory(&self, device: u32) -> Result<u64> {
        let core = self.core("recommended_max_memory")?;
        core.check_device(device)?;
        Ok(core.driver.memory_usage(device)?.recommended_max)
    }

    fn alloc_scalar_with_value(&self, stream: Stream, value: &[u8]) -> Result<usize> {
        let ready = self.ready("alloc_scalar_with_value")?;
        let slot = ready.core.stream(stream)?;
        ready
            .core
            .check_not_capturing(&slot, stream, "write a scalar buffer on")?;
        if value.is_empty() {
            return Err(Error::InvalidArgument(
                "alloc_scalar_with_value needs at least one byte".into(),
            ));
        }
        let allocator = self.device_allocator(ready, stream.device.index)?;
        let ptr = allocator.raw_alloc(value.len(), stream)?;
        // SAFETY: `ptr` is a fresh block of at least `value.len()` bytes of the stream's
        // device, handed to nobody else yet; the write is queued on the stream it was
        // allocated for, so earlier work on the stream that used the memory comes first.
        let written = unsafe { ready.core.driver.write_async(&slot.raw, ptr, value) };
        if let Err(e) = written {
            let _ = allocator.raw_free(ptr);
            return Err(e);
        }
        Ok(ptr)
    }

    // ---- several devices ----------------------------------------------------------------------

    fn can_device_access_peer(&self, device: u32, peer: u32) -> Result<bool> {
        let ready = self.ready("can_device_access_peer")?;
        ready.core.check_device(device)?;
        ready.core.check_device(peer)?;
        if device == peer {
            return Ok(true);
        }
        ready.core.driver.can_access_peer(device, peer)
    }

    fn enable_peer_access(&self, device: u32, peer: u32) -> Result<()> {
        let ready = self.ready("enable_peer_access")?;
        ready.core.check_device(device)?;
        ready.core.check_device(peer)?;
        let mut peers = ready.peers.lock();
        if device == peer || peers.contains(&(device, peer)) {
            return Ok(());
        }
        if !ready.core.driver.can_access_peer(device, peer)? {
            return Err(Error::Unsupported {
                backend: D::KIND,
                what: "peer access between these two devices (the driver says they cannot \
                       reach each other; memcpy_async still copies between them)",
            });
        }
        ready.core.driver.enable_peer_access(device, peer)?;
        peers.insert((device, peer));
        Ok(())
    }

    fn is_peer_access_enabled(&self, device: u32, peer: u32) -> Result<bool> {
        let ready = self.ready("is_peer_access_enabled")?;
        ready.core.check_device(device)?;
        ready.core.check_device(peer)?;
        Ok(device == peer || ready.peers.lock().contains(&(device, peer)))
    }

    fn memcpy_async(
        &self,
        dst: usize,
        dst_device: u32,
        src: usize,
        src_device: u32,
        bytes: usize,
        stream: Stream,
    ) -> Result<()> {
        let ready = self.ready("memcpy_async")?;
        ready.core.check_device(dst_device)?;
        ready.core.check_device(src_device)?;
        let slot = ready.core.stream(stream)?;
        if stream.device.index != dst_device && stream.device.index != src_device {
            return Err(Error::InvalidArgument(format!(
                "memcpy_async: the copy runs on {stream}, of neither device of the copy \
                 ({} {dst_device} and {src_device}): use a stream of one of them",
                D::KIND
            )));
        }
        ready
            .core
            .check_not_capturing(&slot, stream, "copy between buffers on")?;
        if bytes == 0 {
            return Ok(());
        }
        let dst_alloc = self.device_allocator(ready, dst_device)?;
        let src_alloc = self.device_allocator(ready, src_device)?;
        dst_alloc.check_live_range(dst, bytes, "memcpy_async destination")?;
        src_alloc.check_live_range(src, bytes, "memcpy_async source")?;
        // SAFETY: both ranges lie inside live allocations of this runtime's allocators (just
        // checked), and the copy is queued on a stream of one of the two devices: memory freed
        // later waits for that stream when its free was recorded there, as every free of a
        // block used on another stream must be (record_stream), which PyTorch does for peer
        // copies.
        unsafe { ready.core.driver.copy_async(&slot.raw, dst, src, bytes) }
    }

    // ---- profiler ---------------------------------------------------------------------------

    fn profiler_start_trace(&self, mode: ProfilerMode, wait_until_completed: bool) -> Result<()> {
        let ready = self.ready("profiler_start_trace")?;
        ready.core.profiler.start(mode, wait_until_completed)?;
        if mode.allocations {
            for (device, lazy) in ready.allocators.iter().enumerate() {
                if let Some(allocator) = lazy.get() {
                    profile_allocator(&ready.core.profiler, device as u32, allocator);
                }
            }
        }
        Ok(())
    }

    fn profiler_stop_trace(&self) -> Result<ProfilerTrace> {
        let ready = self.ready("profiler_stop_trace")?;
        let profiler = &ready.core.profiler;
        let mut sync_error = None;
        if profiler.wait_until_completed()? {
            for device in 0..ready.core.count {
                if ready.core.devices[device as usize].get().is_some() {
                    if let Err(e) = self.device_synchronize(device) {
                        sync_error.get_or_insert(e);
                    }
                }
            }
        }
        let crate::profiler::Stopped {
            mut events,
            start_unix_us,
            duration_us,
            dropped,
            saved,
        } = profiler.stop()?;
        for s in saved {
            let Some(allocator) = ready.allocators[s.device as usize].get() else {
                continue;
            };
            let history = allocator.memory_history();
            events.extend(crate::profiler::history_events(
                s.device,
                &history,
                start_unix_us,
            ));
            if !s.was_recording {
                // History was off and empty before the trace: put it back that way.
                allocator.record_memory_history(None);
                allocator.clear_memory_history();
            }
        }
        if let Some(e) = sync_error {
            return Err(e);
        }
        events.sort_by(|a, b| a.ts_us.total_cmp(&b.ts_us));
        Ok(ProfilerTrace {
            device_type: D::KIND,
            start_unix_us,
            duration_us,
            events,
            dropped,
        })
    }
}

/// Turn on an allocator's memory history for a profiler trace, noting whether it was on.
fn profile_allocator(profiler: &Profiler, device: u32, allocator: &CachingAllocator) {
    // accelrt cannot read an allocator's history setting: a history that holds entries is
    // taken as the user's recording, which stays on after the trace.
    let existing = allocator.memory_history().len();
    allocator.record_memory_history(Some(HistoryConfig {
        max_entries: existing + PROFILER_HISTORY_ENTRIES,
        context: true,
    }));
    profiler.save_history(SavedHistory {
        device,
        was_recording: existing > 0,
    });
}

/// History entries a profiler trace keeps per allocator (beyond what it already held).
const PROFILER_HISTORY_ENTRIES: usize = 1_000_000;
