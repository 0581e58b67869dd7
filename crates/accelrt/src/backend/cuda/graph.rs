//! CUDA graphs: what a stream captured (`cuStreamBeginCapture` .. `cuStreamEndCapture`),
//! instantiated once, replayed with `cuGraphLaunch`.

use std::sync::Arc;

use super::context::Context;
use super::stream::{CudaStream, TaskBox};
use super::sys::{self, CUgraph, CUgraphExec};
use crate::error::Result;

/// A captured and instantiated graph of a [`crate::backend::cuda::CudaDriver`].
pub struct CudaGraph {
    graph: CUgraph,
    exec: CUgraphExec,
    ctx: Arc<Context>,
    /// Host tasks captured into the graph: their host functions borrow these boxes at every
    /// replay (boxed: the driver holds their addresses, which must not move).
    #[allow(clippy::vec_box)]
    tasks: Vec<Box<TaskBox>>,
}

// SAFETY: CUgraph and CUgraphExec are opaque driver handles usable from any thread (the
// driver API is thread-safe); we never dereference them. TaskBox is Send + Sync.
unsafe impl Send for CudaGraph {}
// SAFETY: as above; launching an executable graph from several threads is allowed.
unsafe impl Sync for CudaGraph {}

impl std::fmt::Debug for CudaGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaGraph")
            .field("device", &self.ctx.ordinal)
            .field("host_tasks", &self.tasks.len())
            .finish()
    }
}

impl CudaGraph {
    /// Instantiate a captured graph (owned by the caller until this returns).
    #[allow(clippy::vec_box)] // boxed: the driver holds the tasks' addresses
    pub(crate) fn instantiate(
        ctx: Arc<Context>,
        graph: CUgraph,
        tasks: Vec<Box<TaskBox>>,
    ) -> Result<CudaGraph> {
        let exec = {
            let current = ctx.bind();
            // SAFETY: `graph` is the live graph the capture just returned.
            current.and_then(|_guard| Ok(unsafe { sys::graph_instantiate(graph) }?))
        };
        match exec {
            Ok(exec) => Ok(CudaGraph {
                graph,
                exec,
                ctx,
                tasks,
            }),
            Err(e) => {
                // SAFETY: we own `graph` and nothing else refers to it.
                if let Err(destroy) = unsafe { sys::graph_destroy(graph) } {
                    ctx.deferred.keep(destroy.into_error());
                }
                Err(e)
            }
        }
    }

    /// Queue the graph's work on `stream`.
    pub(crate) fn launch(&self, stream: &CudaStream) -> Result<()> {
        self.ctx.deferred.take()?;
        // SAFETY: the executable graph is live while borrowed; the stream handle is live or
        // null (then its context is made current).
        stream.call(|s| unsafe { sys::graph_launch(self.exec, s) })
    }

    /// Host tasks in the graph.
    pub fn host_tasks(&self) -> usize {
        self.tasks.len()
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        if !self.tasks.is_empty() {
            // A replay still in flight would call into the task boxes freed below: wait for
            // the device first (rare: only graphs with host tasks).
            let synced = self
                .ctx
                .bind()
                .and_then(|_guard| Ok(sys::ctx_synchronize()?));
            if let Err(e) = synced {
                self.ctx.deferred.keep(e);
                // Freeing the boxes could be unsound now: keep them.
                std::mem::forget(std::mem::take(&mut self.tasks));
            }
        }
        // SAFETY: we own both handles and nothing uses them after this (destroying an
        // executable graph with launches in flight is allowed: they complete).
        let results = unsafe {
            [
                sys::graph_exec_destroy(self.exec),
                sys::graph_destroy(self.graph),
            ]
        };
        for r in results {
            if let Err(e) = r {
                self.ctx.deferred.keep(e.into_error());
            }
        }
    }
}
