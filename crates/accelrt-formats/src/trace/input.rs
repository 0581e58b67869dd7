//! What `accelrt replay` takes, told apart by content (never by name): v1 and v2 trace text,
//! PyTorch snapshot pickles (first byte `0x80`) and accelrt JSON snapshots (`{`), each plain
//! or gzip-compressed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::memory_source::MemorySource;
use super::read::{open_file, GZIP_MAGIC};
use super::replay::{failed_before_start, replay_source, Progress, ReplayOptions, ReplayOutcome};
use super::{Header, TorchPeaks, Trace, TraceReader};
use crate::error::{FormatError, Result};
use crate::snapshot::{self, FileKind};
use accelrt_alloc::Frames;

/// The most a gzip-compressed snapshot may decompress to (a guard against gzip bombs;
/// snapshots are read whole).
pub const MAX_GZIP_SNAPSHOT_BYTES: u64 = 4 << 30;

/// What an input file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A trace (v1 or v2), streamed as it is replayed.
    Trace,
    /// A PyTorch `torch.cuda.memory._dump_snapshot()` pickle: one input per device.
    PyTorchSnapshot,
    /// accelrt's JSON snapshot: one input per device.
    AccelrtSnapshot,
}

impl InputKind {
    /// `trace`, `PyTorch snapshot`, `accelrt snapshot`.
    pub fn name(self) -> &'static str {
        match self {
            InputKind::Trace => "trace",
            InputKind::PyTorchSnapshot => "PyTorch snapshot",
            InputKind::AccelrtSnapshot => "accelrt snapshot",
        }
    }
}

#[derive(Debug, Clone)]
enum Data {
    /// Read again, streaming, for every replay.
    File { path: PathBuf, len: u64 },
    /// A trace held in memory (a snapshot's device), with its allocations' stack frames.
    Memory {
        trace: Arc<Trace>,
        frames: Option<Arc<[Option<Frames>]>>,
    },
}

/// One replayable input: a trace file, or one device of a snapshot. Replaying it more than
/// once (several configurations) reads a file again each time, so memory never holds it.
#[derive(Debug, Clone)]
pub struct ReplayInput {
    /// The trace's name (the file name without `.trace`, `.gz`, `.pickle`...; `name:devN`
    /// for devices of a snapshot other than the only one).
    pub name: String,
    /// Where it came from, for messages (the path as given; `path[device N]` for snapshots).
    pub source: String,
    /// What the file is.
    pub kind: InputKind,
    /// The header: version and the recorded run.
    pub header: Header,
    /// PyTorch's figures: a v1 `# torch` comment, or a PyTorch snapshot's own history.
    pub torch: Option<TorchPeaks>,
    /// Whether the file is gzip-compressed.
    pub gzip: bool,
    /// For a snapshot: the device index this input is.
    pub device: Option<u32>,
    data: Data,
}

impl ReplayInput {
    /// An input of a trace in memory, with the stack frames of its events (`frames[i]` for
    /// event `i`) when known.
    pub fn from_trace(trace: Trace, frames: Option<Vec<Option<Frames>>>) -> ReplayInput {
        ReplayInput {
            name: trace.name.clone(),
            source: trace.source.clone(),
            kind: InputKind::Trace,
            header: trace.header.clone(),
            torch: trace.torch.clone(),
            gzip: false,
            device: None,
            data: Data::Memory {
                trace: Arc::new(trace),
                frames: frames.map(Into::into),
            },
        }
    }

    /// The trace, for an input held in memory (a snapshot's device).
    pub fn trace(&self) -> Option<&Trace> {
        match &self.data {
            Data::File { .. } => None,
            Data::Memory { trace, .. } => Some(trace),
        }
    }

    /// Whether the events carry times (v2).
    pub fn is_timed(&self) -> bool {
        self.header.version >= 2
    }

    /// The size of the file in bytes (what [`Progress::input_bytes`] counts up to), for a
    /// file read by streaming.
    pub fn input_len(&self) -> Option<u64> {
        match &self.data {
            Data::File { len, .. } => Some(*len),
            Data::Memory { .. } => None,
        }
    }

    /// The number of events, for an input held in memory.
    pub fn event_count(&self) -> Option<u64> {
        match &self.data {
            Data::File { .. } => None,
            Data::Memory { trace, .. } => Some(trace.ops.len() as u64),
        }
    }

    /// Replay the input under `opts`; `progress` is called after every block of events.
    pub fn replay(
        &self,
        opts: &ReplayOptions,
        progress: &mut dyn FnMut(&Progress),
    ) -> ReplayOutcome {
        match &self.data {
            Data::File { path, .. } => {
                let reader =
                    open_file(path, "trace").and_then(|f| TraceReader::new(&self.source, f));
                match reader {
                    Ok(mut r) => replay_source(&mut r, &self.name, opts, progress),
                    Err(e) => failed_before_start(&self.name, opts, e),
                }
            }
            Data::Memory { trace, frames } => {
                let mut source = MemorySource::new(trace, frames.as_deref());
                replay_source(&mut source, &self.name, opts, progress)
            }
        }
    }
}

/// Read up to `n` bytes (fewer only at the end of the input or on an error).
fn read_prefix(r: &mut impl Read, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let _ = r.take(n as u64).read_to_end(&mut out);
    out
}

/// The name of a snapshot file without its extensions: `dir/mlp_train.snapshot.pickle` →
/// `mlp_train`.
fn snapshot_name(path: &Path) -> String {
    super::strip_name(
        path,
        &[".gz", ".pickle", ".pkl", ".json", ".snapshot"],
        "snapshot",
    )
}

/// Open a file `accelrt replay` takes: a trace (v1 or v2; only its header is read now, the
/// events are streamed by each replay), or a snapshot (read whole; one input per device with
/// allocations). Plain or gzip; the kind is told by content.
pub fn open(path: impl AsRef<Path>) -> Result<Vec<ReplayInput>> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let mut file = open_file(path, "trace")?;
    let len = file.metadata().map_or(0, |m| m.len());
    let head = read_prefix(&mut file, 64);
    let gzip = head.starts_with(&GZIP_MAGIC);
    let prefix = if gzip {
        // Classify by the decompressed content; a damaged stream is left to the trace reader,
        // which says what is wrong with it.
        let f = open_file(path, "trace")?;
        read_prefix(&mut flate2::read::MultiGzDecoder::new(f), 64)
    } else {
        head
    };
    let kind = match snapshot::sniff(&prefix) {
        FileKind::Trace => {
            let reader = TraceReader::new(&shown, open_file(path, "trace")?)?;
            return Ok(vec![ReplayInput {
                name: super::name_from_path(path),
                source: shown,
                kind: InputKind::Trace,
                header: reader.header().clone(),
                torch: reader.torch().cloned(),
                gzip,
                device: None,
                data: Data::File {
                    path: path.to_path_buf(),
                    len,
                },
            }]);
        }
        FileKind::Pickle => InputKind::PyTorchSnapshot,
        FileKind::Json => InputKind::AccelrtSnapshot,
    };
    let bytes = if gzip {
        let f = open_file(path, "snapshot")?;
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(f)
            .take(MAX_GZIP_SNAPSHOT_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| {
                FormatError::io(
                    shown.clone(),
                    format!("cannot decompress the snapshot: {e}"),
                    e,
                )
            })?;
        if out.len() as u64 > MAX_GZIP_SNAPSHOT_BYTES {
            return Err(FormatError::Snapshot {
                file: shown,
                at: "byte 0".into(),
                message: format!(
                    "the gzip data decompresses to more than {} bytes, the most accepted for a \
                     snapshot",
                    MAX_GZIP_SNAPSHOT_BYTES
                ),
            });
        }
        out
    } else {
        std::fs::read(path).map_err(|e| {
            FormatError::io(shown.clone(), format!("cannot read the snapshot: {e}"), e)
        })?
    };
    let snap = snapshot::parse_bytes(&shown, &bytes)?;
    drop(bytes);
    Ok(snap
        .traces(&snapshot_name(path), &shown)?
        .into_iter()
        .map(|t| {
            let mut input = ReplayInput::from_trace(t.trace, Some(t.frames));
            input.kind = kind;
            input.gzip = gzip;
            input.device = Some(t.device);
            input
        })
        .collect())
}
