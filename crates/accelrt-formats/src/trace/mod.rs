//! Allocator traces: the text formats of `traces/FORMAT.md` (v1 and v2), read as a stream,
//! and one replay engine for them and for memory snapshots.
//!
//! A trace is the sequence of allocate and free calls a real program made to its device
//! allocator. One event a line, optionally gzip-compressed (detected by the gzip magic bytes,
//! not by the file name). Version 1:
//!
//! ```text
//! # comment lines start with '#'
//! a ID BYTES STREAM     allocate BYTES on stream number STREAM; ID names this allocation
//! f ID                  free the allocation named ID
//! ```
//!
//! Version 2 starts with the line `#accelrt-trace v2`, has `#! key=value` header lines
//! (the recorded run: its device, allocator, configuration and real peaks), and gives every
//! event the CPU time of the call in microseconds, plus record-stream (`u ID STREAM T`) and
//! completion-marker (`c ID T`) events.
//!
//! The reader treats its input as hostile: every malformed line is an [`FormatError::Parse`]
//! naming the file, the 1-based line and the problem, never a panic. Id liveness (no
//! duplicate live id, no free of an unknown or already-freed id), markers and times are
//! checked as events are read, with memory that follows the live allocations, not the
//! length of the file.
//!
//! - [`load`] / [`parse_bytes`] / [`parse_reader`]: a whole [`Trace`] in memory.
//! - [`open`]: a file of any kind `accelrt replay` takes (trace, PyTorch snapshot pickle,
//!   accelrt JSON snapshot, plain or gzip), as [`ReplayInput`]s that replay by streaming.
//! - [`replay()`], [`replay_reader`], [`ReplayInput::replay`]: the replay engine
//!   ([`replay`](mod@replay)), with a simulated device ([`device_model`]).
//!
//! ```
//! let text = "# torch peak_allocated=1536 peak_reserved=2097152 conf=native\n\
//!             a 0 1024 0\na 1 512 0\nf 0\n";
//! let trace = accelrt_formats::trace::parse_bytes("example", text.as_bytes()).unwrap();
//! assert_eq!(trace.ops.len(), 3);
//! assert_eq!(accelrt_formats::trace::peak_live_bytes(&trace), 1536);
//! assert_eq!(trace.torch.as_ref().unwrap().peak_reserved, Some(2 << 20));
//! ```

pub mod device_model;
pub mod replay;

mod check;
mod input;
mod memory_source;
mod read;
mod write;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use crate::error::{FormatError, Result};

pub use device_model::{
    DeviceModel, ModelSource, ResolvedModel, SimulatedDevice, DEFAULT_LAG_EVENTS, DEFAULT_LAG_US,
};
pub use input::{open, InputKind, ReplayInput};
pub use read::{TraceEvent, TraceReader};
pub use replay::{
    replay, replay_into, replay_reader, Progress, ReplayOptions, ReplayOutcome, ReplayReport,
    ReplayTarget,
};

/// The largest size one trace event may request: 2^48 bytes (256 TiB).
pub const MAX_SIZE: u64 = 1 << 48;

/// The largest stream number a trace may use.
pub const MAX_STREAM: u32 = 4095;

/// The longest line the reader accepts, comments included (a valid event line is < 100 bytes).
pub const MAX_LINE_LEN: usize = 64 * 1024;

/// The largest time a v2 event may carry: 2^48 microseconds (about 8.9 years).
pub const MAX_TIME_US: u64 = 1 << 48;

/// The largest peak a v2 header may state: 2^60 bytes.
pub const MAX_HEADER_BYTES: u64 = 1 << 60;

/// Most `#!` header lines a v2 trace may have.
pub const MAX_HEADER_KEYS: usize = 256;

/// How many of the latest frees the reader remembers at least (at most twice as many): a
/// completion marker must follow its free within this many frees, and a double free further
/// back than this may be reported as a free of an unknown id. Keeps the reader's memory
/// bounded by the live set plus this window.
pub const FREED_WINDOW: usize = 1 << 16;

/// The first line of a v2 trace.
pub const V2_MAGIC: &str = "#accelrt-trace v2";

/// One allocator call of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TraceOp {
    /// `a ID BYTES STREAM`: allocate `size` bytes on trace stream `stream`, naming it `id`.
    Alloc {
        /// Name of the allocation, unique among live allocations.
        id: u64,
        /// Requested size in bytes, before any rounding (at most [`MAX_SIZE`]).
        size: u64,
        /// Trace stream number (at most [`MAX_STREAM`]); 0 is the default stream.
        stream: u32,
    },
    /// `f ID`: free the live allocation named `id`.
    Free {
        /// Name of a live allocation.
        id: u64,
    },
    /// `u ID STREAM` (v2): the live allocation `id` is used on trace stream `stream` too
    /// (PyTorch's `record_stream`).
    RecordStream {
        /// Name of a live allocation.
        id: u64,
        /// Trace stream number (at most [`MAX_STREAM`]).
        stream: u32,
    },
    /// `c ID` (v2): by this event's time, every piece of work queued before the free of
    /// `id` (on its stream and every stream a `u` named) had completed on the device.
    Complete {
        /// Name of a freed allocation.
        id: u64,
    },
}

/// What PyTorch's own allocator reached on the run a v1 trace was recorded from, from the
/// header comment `torch peak_allocated=N peak_reserved=N conf=...`. Each field is present
/// only when the header carries it in a readable form.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TorchPeaks {
    /// PyTorch's `max_memory_allocated()` on the recorded run.
    pub peak_allocated: Option<u64>,
    /// PyTorch's `max_memory_reserved()` on the recorded run.
    pub peak_reserved: Option<u64>,
    /// The `PYTORCH_CUDA_ALLOC_CONF` in effect (`native` when unset).
    pub conf: Option<String>,
}

impl TorchPeaks {
    /// PyTorch's peak reserved / peak allocated, when both are known and allocated is non-zero.
    pub fn ratio(&self) -> Option<f64> {
        ratio(self.peak_reserved, self.peak_allocated)
    }
}

fn ratio(reserved: Option<u64>, allocated: Option<u64>) -> Option<f64> {
    match (reserved, allocated) {
        (Some(r), Some(a)) if a > 0 => Some(r as f64 / a as f64),
        _ => None,
    }
}

/// Which frees of a v2 trace carry completion markers (header key `markers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Markers {
    /// The header does not say.
    #[default]
    Unstated,
    /// `markers=all`: the recorder wrote a marker for every free whose completion it
    /// observed (accelrt's recorder). The default device model then follows the markers.
    All,
    /// `markers=cross_stream`: only frees whose completion came later than the request, as
    /// PyTorch's snapshots record them (`free_completed`).
    CrossStream,
    /// `markers=none`.
    None,
}

impl Markers {
    /// The header value (`all`, `cross_stream`, `none`); `None` when unstated.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Markers::Unstated => None,
            Markers::All => Some("all"),
            Markers::CrossStream => Some("cross_stream"),
            Markers::None => Some("none"),
        }
    }
}

/// A trace's header: the format version and, for v2, the recorded run (`#! key=value`
/// lines). Known keys are parsed into fields; unknown ones are kept in [`Header::other`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 1 or 2.
    pub version: u32,
    /// `workload`: what ran.
    pub workload: Option<String>,
    /// `recorded_on`: the device's name.
    pub recorded_on: Option<String>,
    /// `recorded_with`: e.g. `PyTorch 2.11.0+cu130`.
    pub recorded_with: Option<String>,
    /// `allocator`: `accelrt`, `pytorch-native`, `pytorch-expandable`, ...
    pub allocator: Option<String>,
    /// `conf`: the accelrt configuration the recorded allocator corresponds to.
    pub conf: Option<String>,
    /// `real_peak_reserved`: the recorded run's `max_memory_reserved()`, bytes.
    pub real_peak_reserved: Option<u64>,
    /// `real_peak_allocated`: the recorded run's `max_memory_allocated()`, bytes.
    pub real_peak_allocated: Option<u64>,
    /// `markers`: which frees carry completion markers.
    pub markers: Markers,
    /// Every other `#! key=value`, in file order.
    pub other: Vec<(String, String)>,
}

impl Default for Header {
    fn default() -> Self {
        Header {
            version: 1,
            workload: None,
            recorded_on: None,
            recorded_with: None,
            allocator: None,
            conf: None,
            real_peak_reserved: None,
            real_peak_allocated: None,
            markers: Markers::Unstated,
            other: Vec::new(),
        }
    }
}

impl Header {
    /// A v2 header with nothing recorded yet.
    pub fn v2() -> Header {
        Header {
            version: 2,
            ..Header::default()
        }
    }

    /// The real run's peak reserved / peak allocated, when both are known.
    pub fn real_ratio(&self) -> Option<f64> {
        ratio(self.real_peak_reserved, self.real_peak_allocated)
    }

    /// The recorded configuration, parsed; `None` without a `conf` key or when this accelrt
    /// cannot read it (then no configuration matches it).
    pub fn recorded_config(&self) -> Option<accelrt_alloc::AllocatorConfig> {
        let conf = self.conf.as_deref()?;
        accelrt_alloc::AllocatorConfig::parse(conf).ok()
    }

    /// Whether `config` is the recorded configuration (compared as parsed configurations;
    /// `debug_checks`, which changes no decision, is ignored).
    pub fn is_recorded_config(&self, config: &accelrt_alloc::AllocatorConfig) -> bool {
        let Some(recorded) = self.recorded_config() else {
            return false;
        };
        let plain = |c: &accelrt_alloc::AllocatorConfig| accelrt_alloc::AllocatorConfig {
            debug_checks: false,
            ..c.clone()
        };
        plain(&recorded) == plain(config)
    }
}

/// A parsed, validated allocator trace held in memory. Files are better replayed by
/// streaming ([`open`], [`replay_reader`]); this form is for traces made in code, snapshots,
/// and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Short name: the file name without `.gz` and `.trace`, or the name given to [`parse_bytes`].
    pub name: String,
    /// The events in order.
    pub ops: Vec<TraceOp>,
    /// PyTorch's figures from a v1 header comment, when present.
    pub torch: Option<TorchPeaks>,
    /// The 1-based source line of each event (same length as `ops`), for messages.
    pub lines: Vec<u64>,
    /// Where the trace came from (the path as given), for messages.
    pub source: String,
    /// The header (version 1 for untimed traces).
    pub header: Header,
    /// The CPU time of each event in microseconds (same length as `ops`), or empty for an
    /// untimed (v1) trace.
    pub times: Vec<u64>,
}

impl Trace {
    /// Build an untimed (v1) trace from events made in code, validating them as the reader
    /// does (event `i` is reported as line `i + 1`). `RecordStream` and `Complete` events
    /// need times: use [`Trace::from_timed_ops`].
    pub fn from_ops(name: &str, ops: Vec<TraceOp>, torch: Option<TorchPeaks>) -> Result<Trace> {
        let lines = (1..=ops.len() as u64).collect();
        let trace = Trace {
            name: name.to_string(),
            ops,
            torch,
            lines,
            source: name.to_string(),
            header: Header::default(),
            times: Vec::new(),
        };
        trace.validate()?;
        Ok(trace)
    }

    /// Build a timed (v2) trace from `(event, time in microseconds)` pairs made in code,
    /// validating them as the reader does.
    pub fn from_timed_ops(name: &str, ops: Vec<(TraceOp, u64)>, header: Header) -> Result<Trace> {
        let lines = (1..=ops.len() as u64).collect();
        let (ops, times) = ops.into_iter().unzip();
        let trace = Trace {
            name: name.to_string(),
            ops,
            torch: None,
            lines,
            source: name.to_string(),
            header: Header {
                version: 2,
                ..header
            },
            times,
        };
        trace.validate()?;
        Ok(trace)
    }

    /// Whether the events carry times (a v2 trace).
    pub fn is_timed(&self) -> bool {
        self.header.version >= 2
    }

    /// Check the events as the reader checks a file: values in range, ids live where they
    /// must be, times never going backwards, markers after their frees.
    pub fn validate(&self) -> Result<()> {
        let mut source = memory_source::MemorySource::new(self, None);
        let mut planner = check::Planner::new(self.is_timed());
        let mut steps = Vec::new();
        while let Some((event, _)) = source.next_event()? {
            steps.clear();
            planner
                .plan(&event, None, &mut steps)
                .map_err(|message| FormatError::Parse {
                    file: self.source.clone(),
                    line: event.line,
                    message,
                })?;
        }
        Ok(())
    }

    /// The source line of event `index` (its position + 1 when the line is not recorded).
    pub fn line_of(&self, index: usize) -> u64 {
        self.lines.get(index).copied().unwrap_or(index as u64 + 1)
    }

    /// Number of allocation events.
    pub fn alloc_count(&self) -> usize {
        self.ops
            .iter()
            .filter(|op| matches!(op, TraceOp::Alloc { .. }))
            .count()
    }

    /// Number of distinct trace streams used by allocations.
    pub fn stream_count(&self) -> usize {
        let mut seen: Vec<u32> = self
            .ops
            .iter()
            .filter_map(|op| match op {
                TraceOp::Alloc { stream, .. } => Some(*stream),
                _ => None,
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }
}

/// Peak of the sum of live requested sizes over the trace: the least memory any allocator
/// needs to replay it (before rounding).
pub fn peak_live_bytes(trace: &Trace) -> u64 {
    let mut live: HashMap<u64, u64> = HashMap::with_capacity(trace.ops.len() / 2 + 1);
    let (mut current, mut peak) = (0u64, 0u64);
    for op in &trace.ops {
        match *op {
            TraceOp::Alloc { id, size, .. } => {
                // A trace built by hand may repeat a live id; count the newer size only.
                if let Some(old) = live.insert(id, size) {
                    current -= old;
                }
                current += size;
                peak = peak.max(current);
            }
            TraceOp::Free { id } => {
                if let Some(size) = live.remove(&id) {
                    current -= size;
                }
            }
            TraceOp::RecordStream { .. } | TraceOp::Complete { .. } => {}
        }
    }
    peak
}

/// Read a whole trace file, plain text or gzip, into memory. The trace's name is the file
/// name without `.gz` and `.trace` (or `.txt`). To replay a file, [`open`] streams it
/// instead.
pub fn load(path: impl AsRef<Path>) -> Result<Trace> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let file = read::open_file(path, "trace")?;
    let mut trace = parse_reader(&name_from_path(path), &shown, file)?;
    trace.source = shown;
    Ok(trace)
}

/// Parse a trace held in memory (plain text or gzip). `name` names it in the trace and in
/// error messages.
pub fn parse_bytes(name: &str, bytes: &[u8]) -> Result<Trace> {
    parse_reader(name, name, bytes)
}

/// Parse a whole trace from any reader (plain text or gzip). `name` becomes [`Trace::name`];
/// `file` is what error messages call the input.
pub fn parse_reader(name: &str, file: &str, reader: impl Read) -> Result<Trace> {
    let mut r = TraceReader::new(file, reader)?;
    let header = r.header().clone();
    let torch = r.torch().cloned();
    let timed = r.is_timed();
    let mut planner = check::Planner::new(timed);
    let (mut ops, mut lines, mut times) = (Vec::new(), Vec::new(), Vec::new());
    let mut steps = Vec::new();
    while let Some(event) = r.next_event()? {
        steps.clear();
        planner
            .plan(&event, None, &mut steps)
            .map_err(|message| FormatError::Parse {
                file: file.to_string(),
                line: event.line,
                message,
            })?;
        ops.push(event.op);
        lines.push(event.line);
        if let Some(t) = event.time {
            times.push(t);
        }
    }
    Ok(Trace {
        name: name.to_string(),
        ops,
        torch,
        lines,
        source: file.to_string(),
        header,
        times,
    })
}

/// The trace name of a path: `dir/resnet50_train.trace.gz` → `resnet50_train`.
pub(crate) fn name_from_path(path: &Path) -> String {
    strip_name(path, &[".gz", ".txt", ".trace"], "trace")
}

/// The file name of `path` without the given suffixes (each stripped once, in order, as
/// long as something is left), or `fallback`.
pub(crate) fn strip_name(path: &Path, suffixes: &[&str], fallback: &str) -> String {
    let mut name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for suffix in suffixes {
        if let Some(stripped) = name.strip_suffix(suffix) {
            if !stripped.is_empty() {
                name = stripped.to_string();
            }
        }
    }
    if name.is_empty() {
        fallback.to_string()
    } else {
        name
    }
}

/// Show an untrusted token in a message: escaped and cut short.
pub(crate) fn shown(token: &str) -> String {
    let mut out: String = token
        .chars()
        .take(24)
        .flat_map(char::escape_debug)
        .collect();
    if token.chars().count() > 24 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_paths() {
        for (path, want) in [
            ("traces/resnet50_train.trace.gz", "resnet50_train"),
            ("x.trace", "x"),
            (".gz", ".gz"),
            ("/", "trace"),
        ] {
            assert_eq!(name_from_path(Path::new(path)), want, "{path}");
        }
    }

    #[test]
    fn recorded_configs_compare_parsed() {
        use accelrt_alloc::AllocatorConfig;
        // (header conf, replayed conf, equal)
        let cases = [
            (
                Some("expandable_segments:false,release_at_peak:false"),
                "release_at_peak:false,expandable_segments:false",
                true,
            ),
            (
                Some("expandable_segments:true"),
                "expandable_segments:true,debug_checks:true",
                true,
            ),
            (Some(""), "", true),
            (
                Some("expandable_segments:true"),
                "max_split_size_mb:64",
                false,
            ),
            (Some("bogus:1"), "", false),
            (None, "", false),
        ];
        for (conf, replayed, equal) in cases {
            let h = Header {
                conf: conf.map(str::to_string),
                ..Header::v2()
            };
            let c = AllocatorConfig::parse(replayed).unwrap();
            assert_eq!(h.is_recorded_config(&c), equal, "{conf:?} vs {replayed}");
        }
    }
}
