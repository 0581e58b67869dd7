//! The core every handle shares: the driver, devices, their streams and the event pool, the
//! profiler's recording; and the allocators' `StreamEvents` adapter over it.

use super::*;

// ---------------------------------------------------------------------------------------
// the core: driver, devices, streams, events (shared with the allocators' event adapter)

pub(super) struct StreamSlot<S> {
    pub(super) raw: S,
    /// The graph capturing on this stream (0: none).
    pub(super) capturing: AtomicU64,
    /// Whether the stream joined that capture by waiting for one of its events (rather than
    /// starting it with `graph_capture_begin`).
    pub(super) joined: AtomicBool,
}

impl<S> StreamSlot<S> {
    pub(super) fn new(raw: S) -> Self {
        StreamSlot {
            raw,
            capturing: AtomicU64::new(0),
            joined: AtomicBool::new(false),
        }
    }
}

pub(super) struct DeviceCtx<S> {
    /// Index 0 is the default stream; pooled and new streams follow in creation order.
    pub(super) streams: RwLock<Vec<Arc<StreamSlot<S>>>>,
    /// Indices of the pooled streams, per priority, created on first use.
    pub(super) pool: [Lazy<Box<[u32]>>; 2],
    pub(super) round_robin: [AtomicUsize; 2],
    pub(super) generator: Arc<Generator>,
}

pub(super) struct Core<D: Driver> {
    pub(super) driver: Arc<D>,
    pub(super) count: u32,
    pub(super) devices: Box<[Lazy<DeviceCtx<D::Stream>>]>,
    pub(super) events: EventPool<D::Event>,
    /// The profiler (`profiler_start_trace`); one relaxed load on hot paths while off.
    pub(super) profiler: Arc<Profiler>,
}

pub(super) type StreamRef<D> = Arc<StreamSlot<<D as Driver>::Stream>>;
pub(super) type Slot<D> = EventSlot<<D as Driver>::Event>;

impl<D: Driver> Core<D> {
    #[inline]
    pub(super) fn check_device(&self, device: u32) -> DeviceResult<()> {
        if device < self.count {
            Ok(())
        } else {
            Err(self.invalid_device(device))
        }
    }

    #[cold]
    pub(super) fn invalid_device(&self, device: u32) -> DeviceError {
        DeviceError::InvalidDevice {
            backend: D::KIND,
            index: device,
            count: self.count,
        }
    }

    /// The device's state, created (with its default stream) on first use.
    #[inline]
    pub(super) fn device(&self, device: u32) -> DeviceResult<&DeviceCtx<D::Stream>> {
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

    pub(super) fn handle(&self, device: u32, index: u32) -> Stream {
        Stream {
            device: Device {
                kind: D::KIND,
                index: device,
            },
            index,
        }
    }

    #[cold]
    pub(super) fn bad_stream(&self, s: Stream, reason: String) -> DeviceError {
        DeviceError::InvalidStream {
            backend: D::KIND,
            device: s.device.index,
            stream: s.index,
            reason,
        }
    }

    /// The stream behind a handle, after checking it belongs to this backend.
    #[inline]
    pub(super) fn stream(&self, s: Stream) -> DeviceResult<StreamRef<D>> {
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
    pub(super) fn with_stream_slot<R>(
        &self,
        s: Stream,
        f: impl FnOnce(&StreamSlot<D::Stream>) -> DeviceResult<R>,
    ) -> DeviceResult<R> {
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
    pub(super) fn unknown_stream(&self, ctx: &DeviceCtx<D::Stream>, s: Stream) -> DeviceError {
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

    pub(super) fn add_streams(
        &self,
        device: u32,
        priority: StreamPriority,
        n: usize,
    ) -> DeviceResult<Vec<u32>> {
        let ctx = self.device(device)?;
        let raws = (0..n)
            .map(|_| self.driver.stream_create(device, priority, false))
            .collect::<DeviceResult<Vec<_>>>()?;
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
    pub(super) fn check_not_capturing(
        &self,
        slot: &StreamSlot<D::Stream>,
        s: Stream,
        what: &str,
    ) -> DeviceResult<()> {
        match slot.capturing.load(Ordering::Acquire) {
            0 => Ok(()),
            graph => Err(DeviceError::Graph(format!(
                "cannot {what} {s} while it is capturing graph {graph}: end the capture first"
            ))),
        }
    }

    // ---- events (shared by the id API, RAII handles and the allocator adapter) ----------

    #[inline]
    pub(super) fn record(&self, ev: &Slot<D>, stream: Stream) -> DeviceResult<()> {
        self.record_as(ev, stream, "event_record", true)
    }

    /// Record `ev` on `stream`; `name` is what a profile calls it (the allocator's own
    /// events are told apart from the program's). On a capturing stream the event marks a
    /// point of the capture (`in_capture`; the allocator's events may not).
    pub(super) fn record_as(
        &self,
        ev: &Slot<D>,
        stream: Stream,
        name: &'static str,
        in_capture: bool,
    ) -> DeviceResult<()> {
        let graph = self.with_stream_slot(stream, |slot| {
            if ev.device() != stream.device.index {
                return Err(DeviceError::Event(format!(
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

    pub(super) fn sync_record(&self, ev: &Slot<D>, stream: Stream) -> DeviceResult<()> {
        self.record(ev, stream)?;
        let slot = self.stream(stream)?;
        self.driver.stream_commit(&slot.raw)
    }

    /// `Err` for an event recorded inside a capture: it marks a point of a graph, not of
    /// the device, so it cannot be waited for on the host.
    #[inline]
    pub(super) fn check_not_captured(&self, ev: &Slot<D>, what: &str) -> DeviceResult<()> {
        match ev.captured_in() {
            0 => Ok(()),
            graph => Err(self.captured_event(graph, what)),
        }
    }

    #[cold]
    pub(super) fn captured_event(&self, graph: u64, what: &str) -> DeviceError {
        DeviceError::Event(format!(
            "cannot {what} an event recorded while a stream was capturing graph {graph}: it \
             marks a point inside the graph, not on the device; record it again outside the \
             capture (after a replay) to wait for the device"
        ))
    }

    #[inline]
    pub(super) fn query(&self, ev: &Slot<D>) -> DeviceResult<bool> {
        if !ev.is_recorded() {
            return Ok(true);
        }
        self.check_not_captured(ev, "query")?;
        self.driver.event_query(ev.raw())
    }

    pub(super) fn synchronize(&self, ev: &Slot<D>) -> DeviceResult<()> {
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
    pub(super) fn wait(&self, ev: &Slot<D>, stream: Stream) -> DeviceResult<()> {
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
                return Err(DeviceError::Graph(format!(
                    "{stream} is capturing graph {graph} and cannot wait for an event recorded \
                     outside the capture: a graph can only wait for points inside it (record \
                     the event on a stream of the capture)"
                )))
            }
            (graph, 0) => {
                if ev.device() != stream.device.index {
                    return Err(DeviceError::Graph(format!(
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
                    return Err(DeviceError::Graph(format!(
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
                return Err(DeviceError::Graph(format!(
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
    pub(super) fn capture_origin(&self, device: u32, graph: u64) -> DeviceResult<StreamRef<D>> {
        let ctx = self.device(device)?;
        let streams = ctx.streams.read();
        streams
            .iter()
            .find(|s| {
                s.capturing.load(Ordering::Acquire) == graph && !s.joined.load(Ordering::Acquire)
            })
            .cloned()
            .ok_or_else(|| {
                DeviceError::Graph(format!(
                    "graph {graph} is no longer capturing: an event recorded in its capture \
                     can only be waited for until graph_capture_end"
                ))
            })
    }

    /// End the membership of the streams that joined the capture of `graph` on `device`
    /// (after the origin stream's capture ended, giving `captured`). The first driver error
    /// is returned.
    pub(super) fn leave_capture(
        &self,
        device: u32,
        graph: u64,
        captured: Option<&D::Graph>,
    ) -> DeviceResult<()> {
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

    // ---- profiler (entered only while a profile is recorded) ------------------------------

    #[cold]
    pub(super) fn profile_instant(&self, name: &str, stream: Stream, timing: bool) {
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
    pub(super) fn profile_timed(
        &self,
        name: &str,
        device: u32,
        stream: Option<u32>,
        f: impl FnOnce() -> DeviceResult<()>,
    ) -> DeviceResult<()> {
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
    pub(super) fn profile_task(&self, task: HostTask, stream: Stream) -> HostTask {
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

    pub(super) fn notify(&self, ev: &Slot<D>, callback: EventCallback) -> DeviceResult<()> {
        if !ev.is_recorded() {
            callback();
            return Ok(());
        }
        self.check_not_captured(ev, "wait (notify) for")?;
        self.driver.event_notify(ev.raw(), callback)
    }

    /// When a completed timing event completed, in ms on [`crate::event::clock_ms`]'s clock.
    pub(super) fn completion_time(&self, ev: &Slot<D>, id: Option<EventId>) -> DeviceResult<f64> {
        let name = id.map_or_else(|| "the event".to_string(), |id| id.to_string());
        if !ev.timing() {
            return Err(DeviceError::Event(format!(
                "{name} has no completion time: it was not created with enable_timing=true; \
                 acquire it with enable_timing"
            )));
        }
        if !ev.is_recorded() {
            return Err(DeviceError::Event(format!(
                "{name} has no completion time: it was never recorded"
            )));
        }
        self.check_not_captured(ev, "read the completion time of")?;
        let ns = self
            .driver
            .event_completion_ns(ev.raw())
            .map_err(|e| match e {
                DeviceError::Event(m) => DeviceError::Event(format!("{name}: {m}")),
                other => other,
            })?;
        Ok(ns as f64 / 1e6)
    }

    pub(super) fn elapsed(
        &self,
        start: &Slot<D>,
        end: &Slot<D>,
        ids: (Option<EventId>, Option<EventId>),
    ) -> DeviceResult<f64> {
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
            return Err(DeviceError::Event(format!(
                "cannot compute the elapsed time from {a} to {b}: events were not created with \
                 enable_timing=true ({a}: {}, {b}: {}); acquire both with enable_timing",
                flag(start),
                flag(end)
            )));
        }
        for (ev, label) in [(start, &a), (end, &b)] {
            self.check_not_captured(ev, "time")?;
            if !ev.is_recorded() {
                return Err(DeviceError::Event(format!(
                    "cannot compute the elapsed time from {a} to {b}: {label} was never recorded"
                )));
            }
        }
        self.driver
            .event_elapsed_ms(start.raw(), end.raw())
            .map_err(|e| match e {
                DeviceError::Event(m) => {
                    DeviceError::Event(format!("elapsed time from {a} to {b}: {m}"))
                }
                other => other,
            })
    }
}

/// The allocators' view of the event pool: a ticket is an event id.
pub(super) struct PoolStreamEvents<D: Driver> {
    pub(super) core: Arc<Core<D>>,
}

impl<D: Driver> StreamEvents for PoolStreamEvents<D> {
    fn record(&self, stream: Stream) -> Result<u64, AllocError> {
        self.core.stream(stream)?;
        let ev = self.core.events.acquire(stream.device.index, false)?;
        self.core
            .record_as(&ev, stream, "allocator event_record", false)?;
        Ok(ev.into_id().0)
    }
    fn query(&self, ticket: u64) -> Result<bool, AllocError> {
        Ok(self.core.query(&*self.core.events.get(EventId(ticket))?)?)
    }
    fn synchronize(&self, ticket: u64) -> Result<(), AllocError> {
        Ok(self
            .core
            .synchronize(&*self.core.events.get(EventId(ticket))?)?)
    }
    fn wait(&self, stream: Stream, ticket: u64) -> Result<(), AllocError> {
        Ok(self
            .core
            .wait(&*self.core.events.get(EventId(ticket))?, stream)?)
    }
    fn release(&self, ticket: u64) {
        // A ticket the allocator releases twice is its bug, and harmless here.
        let _ = self.core.events.release_id(EventId(ticket));
    }
    fn synchronize_device(&self, device: u32) -> Result<(), AllocError> {
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
        Ok(self.core.driver.device_synchronize(device, &raws)?)
    }
}
