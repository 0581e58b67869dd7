//! Graphs: the table's entries, their private pools, and the work of the `Backend` graph
//! calls (capture, instantiate, replay, reset, destroy), which `runtime.rs` forwards here.

use super::*;

// ---------------------------------------------------------------------------------------
// graphs

pub(super) enum GraphState<G> {
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

pub(super) struct GraphEntry<G> {
    pub(super) device: u32,
    /// Keep the captured graph after capture; instantiate on request (PyTorch's keep_graph).
    pub(super) keep_graph: bool,
    pub(super) pool: MempoolId,
    pub(super) state: GraphState<G>,
}

impl<D: Driver> Runtime<D> {
    /// Drop a graph's use of its private pool (its memory goes back once nothing uses it).
    pub(super) fn release_graph_pool(&self, entry: &mut GraphEntry<D::Graph>) -> Result<()> {
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
pub(super) fn unknown_graph(g: GraphId) -> DeviceError {
    DeviceError::Graph(format!(
        "unknown graph id {}: it was never created by this backend or was destroyed",
        g.0
    ))
}

/// The `Backend` graph calls.
impl<D: Driver> Runtime<D> {
    pub(super) fn graph_create_impl(&self, device: u32) -> Result<GraphId> {
        self.create_graph("graph_create", device, false)
    }

    pub(super) fn graph_create_with_impl(&self, device: u32, keep_graph: bool) -> Result<GraphId> {
        self.create_graph("graph_create_with", device, keep_graph)
    }

    pub(super) fn graph_capture_begin_impl(
        &self,
        graph: GraphId,
        stream: Stream,
        pool: MempoolId,
    ) -> Result<()> {
        let ready = self.ready("graph_capture_begin")?;
        let core = &ready.core;
        let slot = core.stream(stream)?;
        self.graph_entry("graph_capture_begin", graph, |entry| {
            if entry.device != stream.device.index {
                return Err(core
                    .bad_stream(
                        stream,
                        format!(
                            "graph {} belongs to {}:{}; capture it on a stream of that device",
                            graph.0,
                            D::KIND,
                            entry.device
                        ),
                    )
                    .into());
            }
            match entry.state {
                GraphState::Empty => {}
                GraphState::Capturing { stream } => {
                    return Err(DeviceError::Graph(format!(
                        "graph {} is already capturing on {stream}",
                        graph.0
                    ))
                    .into())
                }
                GraphState::Captured { .. } => {
                    return Err(DeviceError::Graph(format!(
                        "graph {} already holds a capture: graph_reset it before capturing again",
                        graph.0
                    ))
                    .into())
                }
            }
            if let Err(other) =
                slot.capturing
                    .compare_exchange(0, graph.0, Ordering::AcqRel, Ordering::Acquire)
            {
                return Err(DeviceError::Graph(format!(
                    "{stream} is already capturing graph {other}"
                ))
                .into());
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
                return Err(e.into());
            }
            if let Err(e) = core.driver.capture_begin(&slot.raw) {
                slot.capturing.store(0, Ordering::Release);
                let _ = allocator.end_allocate_to_pool(pool);
                let _ = allocator.release_pool(pool);
                return Err(e.into());
            }
            entry.pool = pool;
            entry.state = GraphState::Capturing { stream };
            Ok(())
        })
    }

    pub(super) fn graph_capture_end_impl(&self, graph: GraphId) -> Result<()> {
        let core = self.core("graph_capture_end")?;
        self.graph_entry("graph_capture_end", graph, |entry| {
            let GraphState::Capturing { stream } = entry.state else {
                return Err(DeviceError::Graph(format!(
                    "graph {} is not capturing: call graph_capture_begin first",
                    graph.0
                ))
                .into());
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
                    return Err(e.into());
                }
            };
            // Without keep_graph, the graph is instantiated now and only its executable form
            // is kept (PyTorch's CUDAGraph::capture_end).
            let instantiated = !entry.keep_graph;
            if instantiated {
                if let Err(e) = core.driver.graph_instantiate(&g) {
                    entry.state = GraphState::Empty;
                    return Err(e.into());
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

    pub(super) fn graph_instantiate_impl(&self, graph: GraphId) -> Result<()> {
        let core = self.core("graph_instantiate")?;
        self.graph_entry("graph_instantiate", graph, |entry| {
            let keep_graph = entry.keep_graph;
            match &mut entry.state {
                GraphState::Captured {
                    instantiated: true, ..
                } => Err(DeviceError::Graph(if keep_graph {
                    format!("graph {} is already instantiated", graph.0)
                } else {
                    format!(
                        "graph {} was instantiated when its capture ended: graph_instantiate is \
                         for graphs created with keep_graph (graph_create_with(device, true))",
                        graph.0
                    )
                })
                .into()),
                GraphState::Captured {
                    graph: g,
                    instantiated,
                    ..
                } => {
                    core.driver.graph_instantiate(g)?;
                    *instantiated = true;
                    Ok(())
                }
                _ => Err(DeviceError::Graph(format!(
                    "graph {} has no finished capture to instantiate: capture it first \
                     (graph_capture_begin, launches, graph_capture_end)",
                    graph.0
                ))
                .into()),
            }
        })
    }

    pub(super) fn graph_is_instantiated_impl(&self, graph: GraphId) -> Result<bool> {
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

    pub(super) fn graph_replay_impl(&self, graph: GraphId) -> Result<()> {
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
                _ => Err(DeviceError::Graph(format!(
                    "graph {} has no finished capture to replay: capture it first",
                    graph.0
                ))
                .into()),
            })?;
        Ok(core.driver.graph_launch(&g, &core.stream(stream)?.raw)?)
    }

    pub(super) fn graph_reset_impl(&self, graph: GraphId) -> Result<()> {
        self.graph_entry("graph_reset", graph, |entry| {
            if let GraphState::Capturing { stream } = entry.state {
                return Err(DeviceError::Graph(format!(
                    "graph {} is capturing on {stream}: end the capture before resetting it",
                    graph.0
                ))
                .into());
            }
            entry.state = GraphState::Empty;
            self.release_graph_pool(entry)
        })
    }

    pub(super) fn graph_destroy_impl(&self, graph: GraphId) -> Result<()> {
        let ready = self.ready("graph_destroy")?;
        let mut graphs = ready.graphs.lock();
        match graphs.get(&graph.0) {
            None => Err(unknown_graph(graph).into()),
            Some(GraphEntry {
                state: GraphState::Capturing { stream },
                ..
            }) => Err(DeviceError::Graph(format!(
                "graph {} is capturing on {stream}: end the capture before destroying it",
                graph.0
            ))
            .into()),
            Some(_) => {
                let mut entry = graphs.remove(&graph.0).expect("matched above");
                drop(graphs);
                self.release_graph_pool(&mut entry)
            }
        }
    }

    pub(super) fn graph_pool_impl(&self, graph: GraphId) -> Result<MempoolId> {
        // (the graph holds one use of its pool from capture until reset or destroy)
        self.graph_entry("graph_pool", graph, |entry| {
            if entry.pool.is_none() {
                return Err(DeviceError::Graph(format!(
                    "graph {} has no memory pool yet: it is assigned by graph_capture_begin",
                    graph.0
                ))
                .into());
            }
            Ok(entry.pool)
        })
    }

    pub(super) fn graph_pool_handle_impl(&self, device: u32) -> Result<MempoolId> {
        let ready = self.ready("graph_pool_handle")?;
        ready.core.check_device(device)?;
        Ok(self.allocator_in(ready, device)?.new_pool_id())
    }
}
