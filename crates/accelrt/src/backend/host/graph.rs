//! Host graphs: the tasks launched on a stream while it was capturing, replayable.

use crate::driver::HostTask;

/// Work captured from a host stream. Replay queues the same tasks again, in order.
pub struct HostGraph {
    pub(super) tasks: Vec<HostTask>,
}

impl HostGraph {
    /// Number of captured tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl std::fmt::Debug for HostGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostGraph")
            .field("tasks", &self.tasks.len())
            .finish()
    }
}
