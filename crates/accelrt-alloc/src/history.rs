//! Memory history (a ring buffer of allocator events, PyTorch's `_record_memory_history`)
//! and snapshots (segments and their blocks, PyTorch's `_snapshot`).
//!
//! Recording costs one relaxed load per call while off. While on, each event takes the
//! history mutex (a debugging tool, like PyTorch's, not a fast path).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::PoolKind;
use crate::device::Device;

/// What happened, with PyTorch's names (`TraceAction::name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceAction {
    /// A caller got a block (size = bytes requested).
    Alloc,
    /// A caller freed a block (size = bytes requested).
    FreeRequested,
    /// The block went back to the cache (later than `FreeRequested` for a block used on
    /// other streams).
    FreeCompleted,
    /// A segment came from the device.
    SegmentAlloc,
    /// A segment went back to the device.
    SegmentFree,
    /// Pages were mapped into an expandable segment.
    SegmentMap,
    /// Pages were unmapped from an expandable segment.
    SegmentUnmap,
    /// A snapshot was taken.
    Snapshot,
    /// An allocation failed (addr = device free bytes, size = bytes requested).
    Oom,
}

impl TraceAction {
    pub const ALL: [TraceAction; 9] = [
        TraceAction::Alloc,
        TraceAction::FreeRequested,
        TraceAction::FreeCompleted,
        TraceAction::SegmentAlloc,
        TraceAction::SegmentFree,
        TraceAction::SegmentMap,
        TraceAction::SegmentUnmap,
        TraceAction::Snapshot,
        TraceAction::Oom,
    ];

    /// PyTorch's string for this action.
    pub fn name(self) -> &'static str {
        match self {
            TraceAction::Alloc => "alloc",
            TraceAction::FreeRequested => "free_requested",
            TraceAction::FreeCompleted => "free_completed",
            TraceAction::SegmentAlloc => "segment_alloc",
            TraceAction::SegmentFree => "segment_free",
            TraceAction::SegmentMap => "segment_map",
            TraceAction::SegmentUnmap => "segment_unmap",
            TraceAction::Snapshot => "snapshot",
            TraceAction::Oom => "oom",
        }
    }

    /// The action named `name` (PyTorch's strings).
    pub fn from_name(name: &str) -> Option<TraceAction> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// One frame of user context (a Python frame, a Rust call site, a layer name...).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Frame {
    pub name: String,
    pub filename: String,
    pub line: u32,
}

/// A shared, immutable stack of frames.
pub type Frames = Arc<[Frame]>;

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceEntry {
    pub action: TraceAction,
    pub addr: u64,
    pub size: u64,
    /// Stream index on the device.
    pub stream: u32,
    /// Microseconds since the Unix epoch.
    pub time_us: u64,
    /// The thread's context when the event happened (if context recording is on).
    pub frames: Option<Frames>,
}

/// How to record history: `record_memory_history(Some(HistoryConfig { .. }))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Ring-buffer size: the oldest entries are dropped beyond it.
    pub max_entries: usize,
    /// Attach the thread's context (see [`set_thread_context`]) to entries and live blocks.
    pub context: bool,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_entries: 100_000,
            context: true,
        }
    }
}

thread_local! {
    static CONTEXT: RefCell<Option<Frames>> = const { RefCell::new(None) };
}

/// Set the calling thread's context, recorded with its allocations while history with
/// context is on; returns the previous one.
pub fn set_thread_context(frames: Option<Frames>) -> Option<Frames> {
    CONTEXT.with(|c| std::mem::replace(&mut *c.borrow_mut(), frames))
}

/// The calling thread's context.
pub fn thread_context() -> Option<Frames> {
    CONTEXT.with(|c| c.borrow().clone())
}

pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

struct Ring {
    config: HistoryConfig,
    entries: VecDeque<TraceEntry>,
}

/// The allocator's recorder.
pub(crate) struct History {
    enabled: AtomicBool,
    context: AtomicBool,
    ring: Mutex<Ring>,
}

impl History {
    pub fn new() -> Self {
        History {
            enabled: AtomicBool::new(false),
            context: AtomicBool::new(false),
            ring: Mutex::new(Ring {
                config: HistoryConfig::default(),
                entries: VecDeque::new(),
            }),
        }
    }

    #[inline(always)]
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Context to attach, if context recording is on.
    pub fn context(&self) -> Option<Frames> {
        if self.context.load(Ordering::Relaxed) {
            thread_context()
        } else {
            None
        }
    }

    pub fn configure(&self, config: Option<HistoryConfig>) {
        let mut ring = self.ring.lock();
        match config {
            Some(c) => {
                ring.config = c;
                while ring.entries.len() > c.max_entries {
                    ring.entries.pop_front();
                }
                self.context.store(c.context, Ordering::Relaxed);
                self.enabled.store(c.max_entries > 0, Ordering::Relaxed);
            }
            None => {
                self.enabled.store(false, Ordering::Relaxed);
                self.context.store(false, Ordering::Relaxed);
            }
        }
    }

    #[cold]
    pub fn record(&self, action: TraceAction, addr: u64, size: u64, stream: u32) {
        let frames = self.context();
        let entry = TraceEntry {
            action,
            addr,
            size,
            stream,
            time_us: now_us(),
            frames,
        };
        let mut ring = self.ring.lock();
        if ring.entries.len() >= ring.config.max_entries {
            ring.entries.pop_front();
        }
        if ring.config.max_entries > 0 {
            ring.entries.push_back(entry);
        }
    }

    pub fn config(&self) -> Option<HistoryConfig> {
        self.enabled().then(|| self.ring.lock().config)
    }

    pub fn entries(&self) -> Vec<TraceEntry> {
        self.ring.lock().entries.iter().cloned().collect()
    }

    pub fn clear(&self) {
        self.ring.lock().entries.clear();
    }
}

/// State of a block in a snapshot, with PyTorch's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockStatus {
    /// Handed out to a caller.
    ActiveAllocated,
    /// Freed, waiting for other streams.
    ActivePendingFree,
    /// Cached.
    Inactive,
}

impl BlockStatus {
    pub fn name(self) -> &'static str {
        match self {
            BlockStatus::ActiveAllocated => "active_allocated",
            BlockStatus::ActivePendingFree => "active_pending_free",
            BlockStatus::Inactive => "inactive",
        }
    }
}

/// A block in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockInfo {
    pub address: u64,
    pub size: u64,
    pub requested_size: u64,
    pub state: BlockStatus,
    /// The context recorded when the block was allocated.
    pub frames: Option<Frames>,
}

/// A segment in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentInfo {
    pub device: u32,
    pub address: u64,
    pub total_size: u64,
    /// Stream index on the device.
    pub stream: u32,
    pub segment_type: PoolKind,
    /// Private pool id, `(0, 0)` for the stream pools.
    pub segment_pool_id: (u64, u64),
    pub is_expandable: bool,
    /// Holes with no memory behind them, as (address, size): the parts of an expandable
    /// segment's address range that are not mapped. Empty for other segments.
    #[serde(default)]
    pub unmapped: Vec<(u64, u64)>,
    pub allocated_size: u64,
    pub active_size: u64,
    pub requested_size: u64,
    pub blocks: Vec<BlockInfo>,
}

/// What `memory_snapshot()` returns: every segment with its blocks, and the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemorySnapshot {
    pub device: Device,
    pub segments: Vec<SegmentInfo>,
    pub history: Vec<TraceEntry>,
}
