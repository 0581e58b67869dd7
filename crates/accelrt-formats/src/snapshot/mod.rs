//! Memory snapshots: PyTorch's `torch.cuda.memory._dump_snapshot()` pickles and accelrt's
//! own, read and written in PyTorch's layout (and as JSON), imported as replayable traces,
//! recorded from a replay, and drawn as one self-contained HTML page.
//!
//! - [`Snapshot`]: segments with their blocks at the moment the snapshot was taken, and the
//!   allocator's history per device (`device_traces`), with stack frames when recorded.
//! - [`load`] / [`parse_bytes`]: a PyTorch pickle (detected by its first byte, `0x80`) or
//!   accelrt's JSON (`{`). Hostile input is an [`FormatError::Snapshot`] naming the file and where
//!   (`byte 812`, `device_traces[0][17].size`), never a panic.
//! - [`Snapshot::to_pickle`] / [`Snapshot::to_json`]: loadable by Python's `pickle.load`,
//!   by PyTorch's memory visualiser (<https://pytorch.org/memory_viz>) and by [`load`].
//! - [`Snapshot::traces`]: the `alloc` / `free_requested` entries of each device as a
//!   [`Trace`] to replay through accelrt's allocator, with the frames of each allocation,
//!   the entries' times and completion markers (a v2 trace; `accelrt trace convert` writes
//!   it out).
//! - [`replay_recorded`]: replay a trace with memory history on and return the snapshot at
//!   the **end** of the replay with the **full** history (PyTorch's meaning of a snapshot:
//!   its segments are the state after the last history entry, so PyTorch's visualiser can
//!   walk the history backwards from them).
//! - [`render_html`]: memory over time (allocated vs reserved, large allocations stacked,
//!   peaks marked) and the segment map at the moment of peak allocated memory, reconstructed
//!   from the history.

pub mod pickle;

mod html;
mod pytorch;
mod record;
mod timeline;
mod to_trace;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{FormatError, Result};
use crate::trace::{Trace, MAX_SIZE};
use accelrt_alloc::{
    AllocatorConfig, BlockStatus, Frames, MemorySnapshot, SegmentInfo, TraceAction, TraceEntry,
};

pub use html::{render_html, HtmlOptions};
pub use record::{replay_recorded, RecordedReplay};
pub use timeline::{PeakState, Timeline, TimelinePoint};
pub use to_trace::pytorch_conf_equivalent;

/// Most devices a snapshot may describe (indices `0..MAX_DEVICES`), in either format.
pub const MAX_DEVICES: usize = 4096;

/// The value of the `format` key of accelrt's JSON snapshots.
pub const JSON_FORMAT: &str = "accelrt-memory-snapshot";

/// A memory snapshot of one or more devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Every segment of every device, with its blocks, at the moment the snapshot was taken.
    pub segments: Vec<SegmentInfo>,
    /// The allocator's history per device index (`device_traces[d]`), oldest first.
    /// Streams are small indices per device (see `stream_handles`).
    pub device_traces: Vec<Vec<TraceEntry>>,
    /// The allocator's settings (PyTorch's `allocator_settings`); `null` when unknown.
    #[serde(default)]
    pub allocator_settings: serde_json::Value,
    /// PyTorch's `external_annotations` (e.g. optimizer step begin/end), kept as is.
    #[serde(default)]
    pub external_annotations: Vec<serde_json::Value>,
    /// For a snapshot imported from PyTorch: per device, the raw stream handle (a CUstream
    /// address) of each stream index (`stream_handles[d][i]`; index 0 is handle 0). Export
    /// writes these handles back. Empty for snapshots accelrt recorded.
    #[serde(default)]
    pub stream_handles: Vec<Vec<u64>>,
}

/// An allocator configuration in the shape of PyTorch snapshots' `allocator_settings` (plus
/// the allocator's name): what accelrt's snapshots carry, from a replay or a live allocator.
pub fn settings_json(config: &AllocatorConfig) -> serde_json::Value {
    serde_json::json!({
        "allocator": "accelrt",
        "PYTORCH_CUDA_ALLOC_CONF": config.to_conf_string(),
        "max_split_size": config
            .max_split_size
            .map_or(-1, |m| i64::try_from(m).unwrap_or(i64::MAX)),
        "garbage_collection_threshold": config.garbage_collection_threshold.unwrap_or(0.0),
        "expandable_segments": config.expandable_segments,
        "release_at_peak": config.release_at_peak,
    })
}

/// One device's allocations of a snapshot, as a replayable trace.
#[derive(Debug, Clone)]
pub struct SnapshotTrace {
    /// The device index in the snapshot.
    pub device: u32,
    /// The `alloc` / `free_requested` entries as trace events, and a completion marker for
    /// each `free_completed` that came later than its request (cross-stream frees).
    /// `trace.lines[i]` is the 1-based position of event `i`'s entry in
    /// `device_traces[device]`; `trace.times` the entries' `time_us` relative to the first
    /// entry (a v2 trace; a v1 trace when the entries carry no times); `trace.torch` holds
    /// what the recorded run reached (peak live requested bytes, peak reserved bytes from the
    /// segment entries, `PYTORCH_CUDA_ALLOC_CONF`); `trace.header` the allocator and its
    /// accelrt equivalent ([`Snapshot::recorded_header`]).
    pub trace: Trace,
    /// The stack frames of each event (`Some` for allocations that recorded them).
    pub frames: Vec<Option<Frames>>,
}

/// What kind of file a byte prefix starts: used by `accelrt replay` to accept traces and
/// snapshots alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A pickle (first byte `0x80`, the `PROTO` opcode).
    Pickle,
    /// accelrt's JSON snapshot (first non-blank byte `{`).
    Json,
    /// Anything else: a v1 trace (plain or gzip).
    Trace,
}

/// Classify a file by its first bytes.
pub fn sniff(prefix: &[u8]) -> FileKind {
    match prefix.first() {
        Some(0x80) => FileKind::Pickle,
        _ => match prefix.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => FileKind::Json,
            _ => FileKind::Trace,
        },
    }
}

/// Read a snapshot file: a PyTorch pickle or accelrt's JSON.
pub fn load(path: impl AsRef<Path>) -> Result<Snapshot> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let bytes = std::fs::read(path)
        .map_err(|e| FormatError::io(shown.clone(), format!("cannot read the snapshot: {e}"), e))?;
    parse_bytes(&shown, &bytes)
}

/// Parse a snapshot held in memory (`file` names it in errors).
pub fn parse_bytes(file: &str, bytes: &[u8]) -> Result<Snapshot> {
    match sniff(bytes) {
        FileKind::Pickle => Snapshot::from_pickle(file, bytes),
        FileKind::Json => Snapshot::from_json(file, bytes),
        FileKind::Trace => Err(FormatError::Snapshot {
            file: file.to_string(),
            at: "byte 0".into(),
            message: format!(
                "not a memory snapshot: a PyTorch snapshot is a pickle (its first byte is 0x80) \
                 and accelrt's JSON snapshot starts with '{{'; this file starts with {}. \
                 Write one with torch.cuda.memory._dump_snapshot(\"snap.pickle\") or \
                 `accelrt replay TRACE --snapshot OUT.pickle`",
                describe_prefix(bytes)
            ),
        }),
    }
}

fn describe_prefix(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "nothing (the file is empty)".into();
    }
    let shown: String = bytes
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ");
    format!("the bytes {shown}")
}

#[derive(Serialize)]
struct JsonOut<'a> {
    format: &'static str,
    version: u32,
    #[serde(flatten)]
    snapshot: &'a Snapshot,
}

#[derive(Deserialize)]
struct JsonIn {
    format: String,
    version: u32,
    #[serde(flatten)]
    snapshot: Snapshot,
}

impl Snapshot {
    /// A snapshot of allocator snapshots (one per device; any order). Their histories become
    /// `device_traces[device index]`.
    pub fn from_memory_snapshots(
        snapshots: &[MemorySnapshot],
        allocator_settings: serde_json::Value,
    ) -> Snapshot {
        let devices = snapshots
            .iter()
            .map(|s| s.device.index as usize + 1)
            .max()
            .unwrap_or(1);
        let mut device_traces = vec![Vec::new(); devices];
        let mut segments = Vec::new();
        for s in snapshots {
            device_traces[s.device.index as usize].extend(s.history.iter().cloned());
            segments.extend(s.segments.iter().cloned());
        }
        segments.sort_by_key(|s| (s.device, s.address));
        Snapshot {
            segments,
            device_traces,
            allocator_settings,
            external_annotations: Vec::new(),
            stream_handles: Vec::new(),
        }
    }

    /// Parse a PyTorch snapshot pickle (`file` names it in errors).
    pub fn from_pickle(file: &str, bytes: &[u8]) -> Result<Snapshot> {
        pytorch::import(file, bytes)
    }

    /// The snapshot as a PyTorch pickle (protocol 4): `segments`, `device_traces`,
    /// `allocator_settings`, `external_annotations`, with PyTorch's keys.
    pub fn to_pickle(&self) -> Vec<u8> {
        pytorch::export(self)
    }

    /// Parse accelrt's JSON snapshot (`file` names it in errors).
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<Snapshot> {
        let err = |at: String, message: String| FormatError::Snapshot {
            file: file.to_string(),
            at,
            message,
        };
        let parsed: JsonIn = serde_json::from_slice(bytes).map_err(|e| {
            err(
                format!("line {} column {}", e.line(), e.column()),
                format!(
                    "not a valid accelrt JSON snapshot ({e}); write one with `accelrt replay \
                     TRACE --snapshot OUT.json`"
                ),
            )
        })?;
        if parsed.format != JSON_FORMAT || parsed.version != 1 {
            return Err(err(
                "format".into(),
                format!(
                    "format '{}' version {} is not '{JSON_FORMAT}' version 1",
                    parsed.format, parsed.version
                ),
            ));
        }
        let snapshot = parsed.snapshot;
        snapshot.validate(file)?;
        Ok(snapshot)
    }

    /// The snapshot as accelrt's JSON (`format`, `version`, then the fields of [`Snapshot`]).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&JsonOut {
            format: JSON_FORMAT,
            version: 1,
            snapshot: self,
        })
        .expect("a snapshot always serializes")
    }

    /// Write the snapshot: JSON when `path` ends in `.json`, else a PyTorch pickle.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let bytes = if json {
            self.to_json().into_bytes()
        } else {
            self.to_pickle()
        };
        std::fs::write(path, bytes).map_err(|e| {
            FormatError::io(
                path.display().to_string(),
                format!("cannot write the snapshot: {e}"),
                e,
            )
        })
    }

    /// Devices that have history entries or segments, in index order.
    pub fn devices(&self) -> Vec<u32> {
        let mut d: Vec<u32> = (0..self.device_traces.len() as u32)
            .filter(|&i| !self.device_traces[i as usize].is_empty())
            .chain(self.segments.iter().map(|s| s.device))
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    /// Checks that hold for any snapshot accelrt accepts (sizes within bounds, blocks inside
    /// their segments).
    fn validate(&self, file: &str) -> Result<()> {
        let err = |at: String, message: String| FormatError::Snapshot {
            file: file.to_string(),
            at,
            message,
        };
        // The same bounds for both readers, so that what one accepts the other reads back.
        if self.device_traces.len() > MAX_DEVICES {
            return Err(err(
                "device_traces".into(),
                format!(
                    "{} devices is more than the {MAX_DEVICES} a snapshot may describe",
                    self.device_traces.len()
                ),
            ));
        }
        for (i, s) in self.segments.iter().enumerate() {
            if s.device as usize >= MAX_DEVICES {
                return Err(err(
                    format!("segments[{i}].device"),
                    format!(
                        "device {} is not one of the {MAX_DEVICES} a snapshot may describe \
                         (0 to {})",
                        s.device,
                        MAX_DEVICES - 1
                    ),
                ));
            }
            if s.total_size > MAX_SIZE || s.address.checked_add(s.total_size).is_none() {
                return Err(err(
                    format!("segments[{i}]"),
                    format!(
                        "segment of {} bytes at {:#x} is larger than 2^48 bytes or wraps \
                         around the address space",
                        s.total_size, s.address
                    ),
                ));
            }
            for (j, b) in s.blocks.iter().enumerate() {
                let inside = b.address >= s.address
                    && b.address
                        .checked_add(b.size)
                        .is_some_and(|end| end <= s.address + s.total_size);
                if !inside {
                    return Err(err(
                        format!("segments[{i}].blocks[{j}]"),
                        format!(
                            "block [{:#x}, +{}) lies outside its segment [{:#x}, +{})",
                            b.address, b.size, s.address, s.total_size
                        ),
                    ));
                }
            }
            for (j, &(a, size)) in s.unmapped.iter().enumerate() {
                if a.checked_add(size).is_none() {
                    return Err(err(
                        format!("segments[{i}].unmapped[{j}]"),
                        wraps("unmapped range", a, size),
                    ));
                }
            }
        }
        for (d, entries) in self.device_traces.iter().enumerate() {
            for (i, e) in entries.iter().enumerate() {
                // An oom entry's `addr` is the device's free memory, a snapshot entry's
                // nothing: neither is a range.
                let range = !matches!(e.action, TraceAction::Oom | TraceAction::Snapshot);
                if range && e.addr.checked_add(e.size).is_none() {
                    return Err(err(
                        format!("device_traces[{d}][{i}]"),
                        wraps(e.action.name(), e.addr, e.size),
                    ));
                }
                if e.action != TraceAction::Oom && e.size > MAX_SIZE {
                    return Err(err(
                        format!("device_traces[{d}][{i}].size"),
                        format!(
                            "{} of {} bytes is over 2^48 bytes (256 TiB), the largest size \
                             accelrt accepts",
                            e.action.name(),
                            e.size
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Peak reserved bytes of device `d` over its history: the segments held when the
    /// history starts (the final segments minus the net change the history records) plus
    /// the largest rise the segment entries show. `None` without segment entries.
    pub fn recorded_peak_reserved(&self, device: u32) -> Option<u64> {
        let entries = self.device_traces.get(device as usize)?;
        let mut current: i128 = 0;
        let mut peak: i128 = 0;
        let mut seen = false;
        for e in entries {
            match e.action {
                TraceAction::SegmentAlloc | TraceAction::SegmentMap => {
                    current += e.size as i128;
                    peak = peak.max(current);
                    seen = true;
                }
                TraceAction::SegmentFree | TraceAction::SegmentUnmap => {
                    current -= e.size as i128;
                    seen = true;
                }
                _ => {}
            }
        }
        if !seen {
            return None;
        }
        let final_total: i128 = self
            .segments
            .iter()
            .filter(|s| s.device == device)
            .map(|s| s.total_size as i128)
            .sum();
        let initial = (final_total - current).max(0);
        Some((initial + peak) as u64)
    }
}

/// The message for a range `[addr, addr + size)` past 2^64.
fn wraps(what: &str, addr: u64, size: u64) -> String {
    format!(
        "{what} of {size} bytes at {addr:#x} ends at or past 2^64 (address + size wraps \
         around the address space): the file is corrupt or was edited"
    )
}

/// PyTorch's name of a block state.
pub(crate) fn block_status_from_name(name: &str) -> Option<BlockStatus> {
    [
        BlockStatus::ActiveAllocated,
        BlockStatus::ActivePendingFree,
        BlockStatus::Inactive,
    ]
    .into_iter()
    .find(|s| s.name() == name)
}
