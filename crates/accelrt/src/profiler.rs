//! The profiler behind [`crate::Backend::profiler_start_trace`] /
//! [`crate::Backend::profiler_stop_trace`]: a timeline of what a backend did — event
//! records, waits and synchronizations, host tasks with their start and end as executed,
//! and the allocators' allocations, frees and segment allocations (read from their memory
//! history) — written as Chrome trace JSON, which Perfetto (<https://ui.perfetto.dev>) and
//! `chrome://tracing` open. This timeline is a *profile* (PyTorch's name, kept in the API, is
//! a profiler trace); an allocator *trace* is something else: the file `accelrt replay` reads.
//!
//! While no profile is being recorded, the cost on the event and launch paths is one relaxed
//! atomic load.
//!
//! Tracks: one process per device (`pid` = device index), one thread per stream (`tid` =
//! stream index + 1); `tid` 0 is the device itself (device synchronize, allocator counters).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use serde_json::json;

use crate::alloc::{format_size, TraceAction, TraceEntry};
use crate::device::DeviceType;
use crate::error::{DeviceError, Error, FormatError, Result};

/// What a profile records (PyTorch MPS's profiler has modes too; these are switches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfilerMode {
    /// Event record / wait / synchronize, stream and device synchronizations.
    pub events: bool,
    /// Host tasks launched on streams: a slice from their start to their end as executed.
    pub tasks: bool,
    /// Allocations, frees and segment allocations of the devices' allocators, with counters
    /// of allocated and reserved bytes (from the allocators' memory history).
    pub allocations: bool,
}

impl ProfilerMode {
    /// Everything.
    pub const ALL: ProfilerMode = ProfilerMode {
        events: true,
        tasks: true,
        allocations: true,
    };
}

impl Default for ProfilerMode {
    fn default() -> Self {
        ProfilerMode::ALL
    }
}

/// How a [`ProfileEvent`] is drawn.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// A slice with a duration (Chrome `ph: "X"`).
    Complete {
        /// Duration in microseconds.
        dur_us: f64,
    },
    /// A point in time (Chrome `ph: "i"`).
    Instant,
    /// Values of a counter track (Chrome `ph: "C"`), e.g. allocated and reserved bytes.
    Counter,
}

/// One thing that happened.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileEvent {
    /// What (`event_record`, `host task`, `alloc 4.00 MiB`, `memory`...).
    pub name: String,
    /// Category: `event`, `sync`, `task`, `alloc`, `segment`, `memory`.
    pub cat: &'static str,
    /// Slice, instant or counter.
    pub phase: Phase,
    /// Microseconds since the profile started.
    pub ts_us: f64,
    /// Device index (the Chrome `pid`).
    pub device: u32,
    /// Stream index on the device, `None` for the device itself.
    pub stream: Option<u32>,
    /// Details (addresses, sizes, event ids; counter values for counters).
    pub args: serde_json::Value,
}

/// A finished profile (PyTorch's profiler trace).
#[derive(Debug, Clone, PartialEq)]
pub struct ProfilerTrace {
    /// The backend profiled.
    pub device_type: DeviceType,
    /// When the profile started, in microseconds since the Unix epoch.
    pub start_unix_us: u64,
    /// How long it ran, in microseconds.
    pub duration_us: f64,
    /// Everything recorded, sorted by time.
    pub events: Vec<ProfileEvent>,
    /// Events dropped because the profile was full ([`MAX_EVENTS`]).
    pub dropped: u64,
}

/// Most events one profile keeps (later ones are counted in [`ProfilerTrace::dropped`]).
pub const MAX_EVENTS: usize = 2_000_000;

impl ProfilerTrace {
    /// The profile as Chrome trace JSON: `{"traceEvents": [...], "displayTimeUnit": "ms",
    /// "otherData": {...}}`, with process and thread names as metadata events.
    pub fn to_chrome_json(&self) -> serde_json::Value {
        let mut out = Vec::with_capacity(self.events.len() + 16);
        let mut tracks: Vec<(u32, Option<u32>)> =
            self.events.iter().map(|e| (e.device, e.stream)).collect();
        tracks.sort_unstable();
        tracks.dedup();
        let mut last_device = None;
        for &(device, stream) in &tracks {
            if last_device != Some(device) {
                out.push(
                    json!({"ph": "M", "name": "process_name", "pid": device, "tid": 0,
                    "args": {"name": format!("{}:{device}", self.device_type)}}),
                );
                out.push(
                    json!({"ph": "M", "name": "thread_name", "pid": device, "tid": 0,
                    "args": {"name": "device"}}),
                );
                last_device = Some(device);
            }
            if let Some(s) = stream {
                out.push(
                    json!({"ph": "M", "name": "thread_name", "pid": device, "tid": s + 1,
                    "args": {"name": format!("stream {s}")}}),
                );
            }
        }
        for e in &self.events {
            let tid = e.stream.map_or(0, |s| s + 1);
            let mut v = json!({
                "name": e.name, "cat": e.cat, "ts": e.ts_us, "pid": e.device, "tid": tid,
                "args": e.args,
            });
            match e.phase {
                Phase::Complete { dur_us } => {
                    v["ph"] = "X".into();
                    v["dur"] = dur_us.into();
                }
                Phase::Instant => {
                    v["ph"] = "i".into();
                    v["s"] = "t".into();
                }
                Phase::Counter => v["ph"] = "C".into(),
            }
            out.push(v);
        }
        json!({
            "traceEvents": out,
            "displayTimeUnit": "ms",
            "otherData": {
                "producer": format!("accelrt {}", env!("CARGO_PKG_VERSION")),
                "backend": self.device_type.name(),
                "start_unix_us": self.start_unix_us,
                "duration_us": self.duration_us,
                "dropped_events": self.dropped,
            },
        })
    }

    /// Write [`ProfilerTrace::to_chrome_json`] to `path`.
    pub fn write_chrome_trace(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_chrome_json().to_string()).map_err(|e| {
            FormatError::io(
                path.display().to_string(),
                format!("cannot write the profiler trace: {e}"),
                e,
            )
            .into()
        })
    }
}

/// Allocator history entries of `device` as profile events: an instant per allocation, free
/// and segment change on its stream's track, and a `memory` counter (allocated and reserved
/// bytes) on the device track. `origin_unix_us` is time zero; earlier entries are skipped.
pub fn history_events(
    device: u32,
    entries: &[TraceEntry],
    origin_unix_us: u64,
) -> Vec<ProfileEvent> {
    let mut out = Vec::with_capacity(entries.len() * 2);
    let (mut allocated, mut reserved) = (0i128, 0i128);
    for e in entries {
        let (delta_a, delta_r, cat) = match e.action {
            TraceAction::Alloc => (e.size as i128, 0, "alloc"),
            TraceAction::FreeRequested => (-(e.size as i128), 0, "alloc"),
            TraceAction::FreeCompleted => (0, 0, "alloc"),
            TraceAction::SegmentAlloc | TraceAction::SegmentMap => (0, e.size as i128, "segment"),
            TraceAction::SegmentFree | TraceAction::SegmentUnmap => {
                (0, -(e.size as i128), "segment")
            }
            TraceAction::Oom => (0, 0, "oom"),
            TraceAction::Snapshot => (0, 0, "snapshot"),
        };
        allocated += delta_a;
        reserved += delta_r;
        if e.time_us < origin_unix_us {
            continue;
        }
        let ts_us = (e.time_us - origin_unix_us) as f64;
        let stream = (e.stream != u32::MAX).then_some(e.stream);
        let name = match e.action {
            TraceAction::Oom => format!("oom ({} requested)", format_size(e.size)),
            TraceAction::Snapshot => "snapshot".to_string(),
            a => format!("{} {}", a.name(), format_size(e.size)),
        };
        out.push(ProfileEvent {
            name,
            cat,
            phase: Phase::Instant,
            ts_us,
            device,
            stream,
            args: json!({"addr": format!("{:#x}", e.addr), "size": e.size}),
        });
        if delta_a != 0 || delta_r != 0 {
            out.push(ProfileEvent {
                name: "memory".into(),
                cat: "memory",
                phase: Phase::Counter,
                ts_us,
                device,
                stream: None,
                args: json!({"allocated": allocated.max(0) as u64, "reserved": reserved.max(0) as u64}),
            });
        }
    }
    out
}

/// A profile being recorded.
struct Session {
    id: u64,
    mode: ProfilerMode,
    wait_until_completed: bool,
    start: Instant,
    start_unix_us: u64,
    events: Vec<ProfileEvent>,
    dropped: u64,
}

/// How an allocator's history was set before the profile, to put it back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SavedHistory {
    pub device: u32,
    /// The history held entries at start: the user was recording (accelrt cannot read an
    /// allocator's history setting, so this is the evidence), and recording stays on.
    pub was_recording: bool,
}

/// What [`Profiler::stop`] hands back.
pub(crate) struct Stopped {
    pub events: Vec<ProfileEvent>,
    pub start_unix_us: u64,
    pub duration_us: f64,
    pub dropped: u64,
    pub saved: Vec<SavedHistory>,
}

/// The profiler state a runtime shares with its host-task wrappers.
#[derive(Default)]
pub(crate) struct Profiler {
    active: AtomicBool,
    next_id: AtomicU64,
    session: Mutex<Option<Session>>,
    saved: Mutex<Vec<SavedHistory>>,
}

impl Profiler {
    /// One relaxed load: true while a profile is being recorded.
    #[inline(always)]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// The mode of the profile being recorded, if any.
    pub fn mode(&self) -> Option<ProfilerMode> {
        self.session.lock().as_ref().map(|s| s.mode)
    }

    pub fn start(&self, mode: ProfilerMode, wait_until_completed: bool) -> Result<u64> {
        let mut s = self.session.lock();
        if s.is_some() {
            return Err(DeviceError::InvalidArgument(
                "a profiler trace is already running on this backend: call \
                 profiler_stop_trace() before starting another"
                    .into(),
            )
            .into());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        *s = Some(Session {
            id,
            mode,
            wait_until_completed,
            start: Instant::now(),
            start_unix_us: now_unix_us(),
            events: Vec::new(),
            dropped: 0,
        });
        self.saved.lock().clear();
        self.active.store(true, Ordering::Release);
        Ok(id)
    }

    pub fn save_history(&self, saved: SavedHistory) {
        self.saved.lock().push(saved);
    }

    /// Whether the profile being recorded asked to wait for devices before stopping.
    pub fn wait_until_completed(&self) -> Result<bool> {
        self.session
            .lock()
            .as_ref()
            .map(|s| s.wait_until_completed)
            .ok_or_else(not_running)
    }

    /// End the profile: its events (unsorted), times, and the saved history settings.
    pub fn stop(&self) -> Result<Stopped> {
        self.active.store(false, Ordering::Release);
        let s = self.session.lock().take().ok_or_else(not_running)?;
        let saved = std::mem::take(&mut *self.saved.lock());
        Ok(Stopped {
            events: s.events,
            start_unix_us: s.start_unix_us,
            duration_us: s.start.elapsed().as_secs_f64() * 1e6,
            dropped: s.dropped,
            saved,
        })
    }

    /// Microseconds since the profile being recorded started, and its id (`None` when
    /// stopped).
    pub fn now(&self) -> Option<(f64, u64)> {
        self.session
            .lock()
            .as_ref()
            .map(|s| (s.start.elapsed().as_secs_f64() * 1e6, s.id))
    }

    /// Record an event of `kind` if the profile being recorded records that kind (`session`:
    /// the profile the event belongs to; events of an ended profile are dropped).
    #[cold]
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        session: Option<u64>,
        wants: fn(&ProfilerMode) -> bool,
        name: &str,
        cat: &'static str,
        phase: Phase,
        ts_us: Option<f64>,
        device: u32,
        stream: Option<u32>,
        args: serde_json::Value,
    ) {
        let mut guard = self.session.lock();
        let Some(s) = guard.as_mut() else { return };
        if session.is_some_and(|id| id != s.id) || !wants(&s.mode) {
            return;
        }
        if s.events.len() >= MAX_EVENTS {
            s.dropped += 1;
            return;
        }
        let ts_us = ts_us.unwrap_or_else(|| s.start.elapsed().as_secs_f64() * 1e6);
        s.events.push(ProfileEvent {
            name: name.to_string(),
            cat,
            phase,
            ts_us,
            device,
            stream,
            args,
        });
    }
}

/// Microseconds since the Unix epoch (the clock of the allocators' history).
fn now_unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn not_running() -> Error {
    DeviceError::InvalidArgument(
        "no profiler trace is running on this backend: call profiler_start_trace() first".into(),
    )
    .into()
}
