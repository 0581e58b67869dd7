//! Replaying a trace with the allocator's memory history on, to get a [`Snapshot`].

use std::sync::Arc;

use super::Snapshot;
use crate::alloc::{
    set_thread_context, AllocatorConfig, CachingAllocator, Frames, HistoryConfig, MemoryProvider,
};
use crate::backend::host::HostMemory;
use crate::device::{Device, DeviceType};
use crate::error::{Error, Result};
use crate::stream::Stream;
use crate::trace::{ReplayOptions, Trace, TraceOp};

/// What [`replay_recorded`] returns.
#[derive(Debug, Clone)]
pub struct RecordedReplay {
    /// The allocator's state after the last replayed event, with the full history (every
    /// allocator event of the replay, with the frames given for each allocation).
    pub snapshot: Snapshot,
    /// Events replayed (all of them unless the replay stopped).
    pub ops: usize,
    /// Why the replay stopped early (e.g. an out-of-memory at a `--capacity`), naming the
    /// trace line; the snapshot then shows the state at that moment, with the `oom` entry.
    pub error: Option<Error>,
}

/// The allocator settings of a replay, in PyTorch's `allocator_settings` shape (plus the
/// allocator's name).
pub(crate) fn settings_json(config: &AllocatorConfig) -> serde_json::Value {
    serde_json::json!({
        "allocator": "accelrt",
        "PYTORCH_CUDA_ALLOC_CONF": config.to_conf_string(),
        "max_split_size": config.max_split_size.map_or(-1, |m| m as i64),
        "garbage_collection_threshold": config.garbage_collection_threshold.unwrap_or(0.0),
        "expandable_segments": config.expandable_segments,
        "release_at_peak": config.release_at_peak,
    })
}

/// Replay `trace` through a fresh host allocator (configured by `opts`) with memory history
/// recording every event; `frames[i]` (when given) is the stack recorded with event `i`'s
/// allocation. `progress(done)` is called every 4096 events. This replay is not timed; use
/// [`crate::trace::replay()`] for speed figures.
///
/// Errors only when the allocator cannot be built; a replay that stops early returns its
/// snapshot so far with [`RecordedReplay::error`] set.
pub fn replay_recorded(
    trace: &Trace,
    frames: Option<&[Option<Frames>]>,
    opts: &ReplayOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<RecordedReplay> {
    let provider: Arc<dyn MemoryProvider> = Arc::new(match opts.capacity {
        Some(bytes) => HostMemory::new(bytes),
        None => HostMemory::with_default_capacity(),
    });
    let device = Device {
        kind: DeviceType::Host,
        index: 0,
    };
    let alloc = CachingAllocator::new(device, provider, None, opts.config.clone())?;
    // Every event: an alloc may add a segment_alloc, a free adds free_requested and
    // free_completed, and segments may be released; 4 entries per event is plenty.
    alloc.record_memory_history(Some(HistoryConfig {
        max_entries: trace.ops.len().saturating_mul(4).saturating_add(1024),
        context: true,
    }));
    let mut ptrs: std::collections::HashMap<u64, usize> =
        std::collections::HashMap::with_capacity(trace.ops.len() / 2 + 1);
    let mut error = None;
    let mut done = 0;
    let previous = set_thread_context(None);
    for (i, op) in trace.ops.iter().enumerate() {
        if i % 4096 == 0 && i > 0 {
            progress(i as u64);
        }
        let result = match *op {
            TraceOp::Alloc { id, size, stream } => {
                set_thread_context(frames.and_then(|f| f.get(i).cloned().flatten()));
                let size = usize::try_from(size).map_err(|_| {
                    Error::InvalidArgument(format!("size {size} does not fit in this machine"))
                });
                let r = size.and_then(|size| {
                    alloc.raw_alloc(
                        size,
                        Stream {
                            device,
                            index: stream,
                        },
                    )
                });
                r.map(|ptr| {
                    ptrs.insert(id, ptr);
                })
            }
            TraceOp::Free { id } => match ptrs.remove(&id) {
                Some(ptr) => alloc.raw_free(ptr),
                None => Err(Error::InvalidArgument(format!("free of unknown id {id}"))),
            },
        };
        if let Err(cause) = result {
            error = Some(Error::Parse {
                file: trace.source.clone(),
                line: trace.line_of(i),
                message: format!(
                    "replay stopped at event {} of {}: {cause}",
                    i + 1,
                    trace.ops.len()
                ),
            });
            break;
        }
        done = i + 1;
    }
    set_thread_context(previous);
    progress(done as u64);
    let snapshot = alloc.memory_snapshot();
    alloc.record_memory_history(None);
    Ok(RecordedReplay {
        snapshot: Snapshot::from_memory_snapshots(&[snapshot], settings_json(alloc.config())),
        ops: done,
        error,
    })
}
