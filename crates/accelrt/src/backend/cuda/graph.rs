//! CUDA graphs: what a stream captured (`cuStreamBeginCapture` .. `cuStreamEndCapture`),
//! instantiated once, replayed with `cuGraphLaunch`.

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::context::Context;
use super::stream::CudaStream;
use super::sys::{self, CUgraph, CUgraphExec};
use super::task::TaskBox;
use crate::error::{DeviceError, DeviceResult};

/// A captured graph of a [`crate::backend::cuda::CudaDriver`]: the captured form (the
/// "template", kept until instantiation unless its creator asked to keep it), and the
/// executable form once instantiated.
pub struct CudaGraph {
    template: Mutex<Option<CUgraph>>,
    exec: OnceLock<CUgraphExec>,
    ctx: Arc<Context>,
    /// Host tasks captured into the graph (on its stream, and on streams that joined the
    /// capture): their host functions borrow these boxes at every replay (boxed: the driver
    /// holds their addresses, which must not move).
    #[allow(clippy::vec_box)]
    tasks: Mutex<Vec<Box<TaskBox>>>,
}

// SAFETY: CUgraph and CUgraphExec are opaque driver handles usable from any thread (the
// driver API is thread-safe); we never dereference them. TaskBox is Send + Sync.
unsafe impl Send for CudaGraph {}
// SAFETY: as above; launching an executable graph from several threads is allowed, and the
// template is only touched under its mutex.
unsafe impl Sync for CudaGraph {}

impl std::fmt::Debug for CudaGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaGraph")
            .field("device", &self.ctx.ordinal)
            .field("instantiated", &self.is_instantiated())
            .field("has_template", &self.has_template())
            .field("host_tasks", &self.host_tasks())
            .finish()
    }
}

impl CudaGraph {
    /// End the capture on `stream` and take its graph, with the host tasks captured there.
    pub(crate) fn end_capture(stream: &CudaStream) -> DeviceResult<CudaGraph> {
        let (graph, tasks) = stream.end_capture_raw();
        let graph = graph?;
        if graph.is_null() {
            return Err(DeviceError::Graph(
                "the capture produced no graph (it was invalidated by an operation that cannot \
                 be captured)"
                    .into(),
            ));
        }
        Ok(CudaGraph::captured(Arc::clone(&stream.ctx), graph, tasks))
    }

    /// A graph a capture just returned (owned by the caller until this returns), not yet
    /// instantiated.
    #[allow(clippy::vec_box)] // boxed: the driver holds the tasks' addresses
    pub(crate) fn captured(ctx: Arc<Context>, graph: CUgraph, tasks: Vec<Box<TaskBox>>) -> Self {
        CudaGraph {
            template: Mutex::new(Some(graph)),
            exec: OnceLock::new(),
            ctx,
            tasks: Mutex::new(tasks),
        }
    }

    /// Keep the boxes of host tasks another stream captured into this graph (it joined the
    /// capture), for as long as the graph lives.
    #[allow(clippy::vec_box)] // boxed: the driver holds their addresses
    pub(crate) fn adopt_tasks(&self, tasks: Vec<Box<TaskBox>>) {
        self.tasks.lock().extend(tasks);
    }

    /// Make the executable form (`cuGraphInstantiate`); nothing to do if it exists.
    pub(crate) fn instantiate(&self) -> DeviceResult<()> {
        let template = self.template.lock();
        if self.exec.get().is_some() {
            return Ok(());
        }
        let Some(graph) = *template else {
            return Err(DeviceError::Graph(
                "the captured graph was discarded before it was instantiated".into(),
            ));
        };
        let exec = {
            let _current = self.ctx.bind()?;
            // SAFETY: `graph` is our live template (we hold its mutex).
            unsafe { sys::graph_instantiate(graph) }?
        };
        // Only set under the template's mutex, so this cannot race another instantiate.
        let _ = self.exec.set(exec);
        Ok(())
    }

    /// Free the captured form once the executable form exists (the graph was created
    /// without keep_graph).
    pub(crate) fn discard_template(&self) {
        let mut template = self.template.lock();
        if self.exec.get().is_none() {
            return;
        }
        if let Some(graph) = template.take() {
            // SAFETY: we own the template, and nothing uses it any more (the executable
            // graph is independent of it once instantiated).
            if let Err(e) = unsafe { sys::graph_destroy(graph) } {
                self.ctx.deferred.keep(e.into_error());
            }
        }
    }

    /// Queue the graph's work on `stream` (instantiated first by the runtime).
    pub(crate) fn launch(&self, stream: &CudaStream) -> DeviceResult<()> {
        self.ctx.deferred.take()?;
        let Some(&exec) = self.exec.get() else {
            return Err(DeviceError::Graph(
                "the graph is not instantiated: instantiate it before launching".into(),
            ));
        };
        // SAFETY: the executable graph is live while borrowed; the stream handle is live or
        // null (then its context is made current).
        stream.call(|s| unsafe { sys::graph_launch(exec, s) })
    }

    /// Whether the executable form exists.
    pub fn is_instantiated(&self) -> bool {
        self.exec.get().is_some()
    }

    /// Whether the captured form is still kept (graphs created with keep_graph, or not yet
    /// instantiated).
    pub fn has_template(&self) -> bool {
        self.template.lock().is_some()
    }

    /// Nodes of the captured form; an error once it was discarded.
    pub fn node_count(&self) -> DeviceResult<usize> {
        let template = self.template.lock();
        let Some(graph) = *template else {
            return Err(DeviceError::Graph(
                "the captured graph was discarded at instantiation (it was created without \
                 keep_graph): only graphs created with keep_graph keep it"
                    .into(),
            ));
        };
        // SAFETY: `graph` is our live template (we hold its mutex).
        Ok(unsafe { sys::graph_node_count(graph) }?)
    }

    /// Host tasks in the graph.
    pub fn host_tasks(&self) -> usize {
        self.tasks.lock().len()
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        if !self.tasks.get_mut().is_empty() {
            // A replay still in flight would call into the task boxes freed below: wait for
            // the device first (rare: only graphs with host tasks).
            let synced = self
                .ctx
                .bind()
                .and_then(|_guard| Ok(sys::ctx_synchronize()?));
            if let Err(e) = synced {
                self.ctx.deferred.keep(e);
                // Freeing the boxes could be unsound now: keep them.
                std::mem::forget(std::mem::take(self.tasks.get_mut()));
            }
        }
        // SAFETY: we own both handles and nothing uses them after this (destroying an
        // executable graph with launches in flight is allowed: they complete).
        let results = unsafe {
            [
                self.exec.take().map(|exec| sys::graph_exec_destroy(exec)),
                self.template
                    .get_mut()
                    .take()
                    .map(|g| sys::graph_destroy(g)),
            ]
        };
        for r in results.into_iter().flatten() {
            if let Err(e) = r {
                self.ctx.deferred.keep(e.into_error());
            }
        }
    }
}
