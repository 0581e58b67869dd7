//! Building a runtime, opening its driver on first use, and the lazily made per-device
//! parts (allocators, the pinned allocator), with the lookups the `Backend` calls share.

use super::*;

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
            kind: D::KIND,
            built: D::BUILT,
            probe: Mutex::new(Some(Box::new(probe))),
            state: OnceLock::new(),
        }
    }

    /// A runtime that presents itself as `kind` and is unavailable for `reason` (the
    /// stand-ins of [`crate::backend::noop`]).
    pub(crate) fn stand_in(kind: DeviceType, reason: String, built: bool) -> Self {
        Runtime {
            id: NEXT_RUNTIME_ID.fetch_add(1, Ordering::Relaxed),
            kind,
            built,
            probe: Mutex::new(None),
            state: OnceLock::from(Err(reason)),
        }
    }

    #[cold]
    pub(super) fn open(&self) -> std::result::Result<Ready<D>, String> {
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
    pub(super) fn state(&self) -> &std::result::Result<Ready<D>, String> {
        self.state.get_or_init(|| self.open())
    }

    /// The opened runtime, or [`DeviceError::NeedsBackend`] naming `call`.
    #[inline]
    pub(super) fn ready(&self, call: &'static str) -> DeviceResult<&Ready<D>> {
        match self.state() {
            Ok(r) => Ok(r),
            Err(reason) => Err(self.needs(call, reason)),
        }
    }

    #[cold]
    pub(super) fn needs(&self, call: &'static str, reason: &str) -> DeviceError {
        DeviceError::NeedsBackend {
            call,
            needs: self.kind,
            reason: reason.to_string(),
        }
    }

    #[inline]
    pub(super) fn core(&self, call: &'static str) -> DeviceResult<&Core<D>> {
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

    /// An event from the event pool as an RAII handle (returned to it on drop): the fast path.
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
    pub fn with_stream<R, E: From<DeviceError>>(
        &self,
        stream: Stream,
        f: impl FnOnce(&D, &D::Stream) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        let core = self.core("with_stream")?;
        let slot = core.stream(stream)?;
        f(&core.driver, &slot.raw)
    }

    pub(super) fn events_adapter(ready: &Ready<D>) -> Arc<dyn StreamEvents> {
        Arc::new(PoolStreamEvents {
            core: Arc::clone(&ready.core),
        })
    }

    /// Index of the calling thread's current stream on `device` (0 until set).
    pub(super) fn current_index(&self, device: u32) -> u32 {
        with_thread(self.id, |t| {
            t.streams
                .iter()
                .find(|(d, _)| *d == device)
                .map_or(0, |&(_, i)| i)
        })
    }

    /// The caching allocator of `device`, created on first use.
    pub(super) fn allocator_in(
        &self,
        ready: &Ready<D>,
        device: u32,
    ) -> Result<Arc<CachingAllocator>> {
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

    pub(super) fn create_graph(
        &self,
        call: &'static str,
        device: u32,
        keep_graph: bool,
    ) -> Result<GraphId> {
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
        f: impl FnOnce(&D, &D::Graph) -> DeviceResult<R>,
    ) -> DeviceResult<R> {
        let ready = self.ready("with_graph")?;
        let g = match ready.graphs.lock().get(&graph.0).map(|entry| &entry.state) {
            Some(GraphState::Captured { graph, .. }) => Arc::clone(graph),
            Some(_) => {
                return Err(DeviceError::Graph(format!(
                    "graph {} holds no finished capture",
                    graph.0
                )))
            }
            None => return Err(unknown_graph(graph)),
        };
        let driver = &ready.core.driver;
        f(driver, &g)
    }

    pub(super) fn graph_entry<R>(
        &self,
        call: &'static str,
        g: GraphId,
        f: impl FnOnce(&mut GraphEntry<D::Graph>) -> Result<R>,
    ) -> Result<R> {
        let mut graphs = self.ready(call)?.graphs.lock();
        f(graphs.get_mut(&g.0).ok_or_else(|| unknown_graph(g))?)
    }
}
