//! Allocator traces: the v1 text format of `traces/FORMAT.md`, and their replay.
//!
//! A trace is the sequence of allocate and free calls a real program made to its device
//! allocator. One event a line, optionally gzip-compressed (detected by the gzip magic bytes,
//! not by the file name):
//!
//! ```text
//! # comment lines start with '#'
//! a ID BYTES STREAM     allocate BYTES on stream number STREAM; ID names this allocation
//! f ID                  free the allocation named ID
//! ```
//!
//! The reader treats its input as hostile: every malformed line is an
//! [`Error::Parse`] naming the file, the 1-based line and the problem, never a panic. Id
//! liveness (no duplicate live id, no free of an unknown or already-freed id) is checked while
//! parsing, so a parsed [`Trace`] always replays without bookkeeping errors.
//!
//! ```
//! let text = "# torch peak_allocated=1536 peak_reserved=2097152 conf=native\n\
//!             a 0 1024 0\na 1 512 0\nf 0\n";
//! let trace = accelrt::trace::parse_bytes("example", text.as_bytes()).unwrap();
//! assert_eq!(trace.ops.len(), 3);
//! assert_eq!(accelrt::trace::peak_live_bytes(&trace), 1536);
//! assert_eq!(trace.torch.as_ref().unwrap().peak_reserved, Some(2 << 20));
//! ```

pub mod replay;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use crate::error::{Error, Result};

pub use replay::{replay, replay_into, replay_on, ReplayOptions, ReplayOutcome, ReplayReport};

/// The largest size one trace event may request: 2^48 bytes (256 TiB).
pub const MAX_SIZE: u64 = 1 << 48;

/// The largest stream number a trace may use.
pub const MAX_STREAM: u32 = 4095;

/// The longest line the reader accepts, comments included (a valid event line is < 64 bytes).
pub const MAX_LINE_LEN: usize = 64 * 1024;

/// The gzip magic bytes.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

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
}

/// What PyTorch's own allocator reached on the run the trace was recorded from, from the
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
        match (self.peak_reserved, self.peak_allocated) {
            (Some(r), Some(a)) if a > 0 => Some(r as f64 / a as f64),
            _ => None,
        }
    }
}

/// A parsed, validated allocator trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Short name: the file name without `.gz` and `.trace`, or the name given to [`parse_bytes`].
    pub name: String,
    /// The events in order.
    pub ops: Vec<TraceOp>,
    /// PyTorch's figures from the header comment, when present.
    pub torch: Option<TorchPeaks>,
    /// The 1-based source line of each event (same length as `ops`), for messages.
    pub lines: Vec<u64>,
    /// Where the trace came from (the path as given), for messages.
    pub source: String,
}

impl Trace {
    /// Build a trace from events made in code, validating them as the reader does
    /// (event `i` is reported as line `i + 1`).
    pub fn from_ops(name: &str, ops: Vec<TraceOp>, torch: Option<TorchPeaks>) -> Result<Trace> {
        let mut checker = Liveness::default();
        for (i, op) in ops.iter().enumerate() {
            let line = i as u64 + 1;
            let problem = match *op {
                TraceOp::Alloc { id, size, stream } => check_alloc_values(size, stream)
                    .err()
                    .or_else(|| checker.alloc(id, line).err()),
                TraceOp::Free { id } => checker.free(id, line).err(),
            };
            if let Some(message) = problem {
                return Err(Error::Parse {
                    file: name.to_string(),
                    line,
                    message,
                });
            }
        }
        let lines = (1..=ops.len() as u64).collect();
        Ok(Trace {
            name: name.to_string(),
            ops,
            torch,
            lines,
            source: name.to_string(),
        })
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
                TraceOp::Free { .. } => None,
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }

    /// Write the trace in the v1 text format (header comments, then one event a line).
    /// [`parse_bytes`] reads the result back to an equal trace (up to `lines` and `source`).
    pub fn write_to(&self, mut w: impl Write) -> std::io::Result<()> {
        // Names come from file names and may hold anything: keep the comment on one line.
        writeln!(w, "# allocator trace v1: '{}'", self.name.escape_debug())?;
        if let Some(t) = &self.torch {
            let mut header = String::from("# torch");
            if let Some(a) = t.peak_allocated {
                header.push_str(&format!(" peak_allocated={a}"));
            }
            if let Some(r) = t.peak_reserved {
                header.push_str(&format!(" peak_reserved={r}"));
            }
            if let Some(c) = &t.conf {
                // One whitespace-free word, as the reader expects.
                let word: String = c
                    .chars()
                    .map(|ch| {
                        if ch.is_whitespace() || ch.is_control() {
                            '_'
                        } else {
                            ch
                        }
                    })
                    .collect();
                header.push_str(&format!(" conf={word}"));
            }
            writeln!(w, "{header}")?;
        }
        for op in &self.ops {
            match *op {
                TraceOp::Alloc { id, size, stream } => writeln!(w, "a {id} {size} {stream}")?,
                TraceOp::Free { id } => writeln!(w, "f {id}")?,
            }
        }
        Ok(())
    }

    /// The trace in the v1 text format, as [`Trace::write_to`] writes it.
    pub fn to_text(&self) -> String {
        let mut out = Vec::new();
        self.write_to(&mut out)
            .expect("writing to a Vec cannot fail");
        String::from_utf8(out).expect("the trace writer writes only UTF-8 strings")
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
        }
    }
    peak
}

/// Read a trace file, plain text or gzip. The trace's name is the file name without `.gz`
/// and `.trace` (or `.txt`).
pub fn load(path: impl AsRef<Path>) -> Result<Trace> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| Error::Io {
        path: shown.clone(),
        message: format!("cannot open the trace file: {e}"),
    })?;
    if let Ok(meta) = file.metadata() {
        if meta.is_dir() {
            return Err(Error::Io {
                path: shown,
                message: "is a directory: pass a trace file (e.g. traces/resnet50_train.trace.gz)"
                    .into(),
            });
        }
    }
    let mut trace = parse_reader(&name_from_path(path), &shown, file)?;
    trace.source = shown;
    Ok(trace)
}

/// Parse a trace held in memory (plain text or gzip). `name` names it in the trace and in
/// error messages.
pub fn parse_bytes(name: &str, bytes: &[u8]) -> Result<Trace> {
    parse_reader(name, name, bytes)
}

/// Parse a trace from any reader (plain text or gzip). `name` becomes [`Trace::name`];
/// `file` is what error messages call the input.
pub fn parse_reader(name: &str, file: &str, reader: impl Read) -> Result<Trace> {
    let mut reader = reader;
    let (magic, n) = read_magic(&mut reader).map_err(|e| io_error(file, 1, &e, false))?;
    let gzip = n == GZIP_MAGIC.len() && magic == GZIP_MAGIC;
    // Put the peeked bytes back in front of the rest.
    let input = BufReader::with_capacity(64 * 1024, (&magic[..n]).chain(reader));
    let mut parser = Parser::new(name, file, gzip);
    if gzip {
        let decoder = flate2::bufread::MultiGzDecoder::new(input);
        parser.run(BufReader::with_capacity(64 * 1024, decoder))?;
    } else {
        parser.run(input)?;
    }
    parser.finish()
}

/// The trace name of a path: `dir/resnet50_train.trace.gz` → `resnet50_train`.
fn name_from_path(path: &Path) -> String {
    let mut name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for suffix in [".gz", ".txt", ".trace"] {
        if let Some(stripped) = name.strip_suffix(suffix) {
            if !stripped.is_empty() {
                name = stripped.to_string();
            }
        }
    }
    if name.is_empty() {
        "trace".to_string()
    } else {
        name
    }
}

/// Read up to the first two bytes (fewer only at end of input).
fn read_magic(r: &mut impl Read) -> std::io::Result<([u8; 2], usize)> {
    let mut magic = [0u8; 2];
    let mut n = 0;
    while n < magic.len() {
        match r.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok((magic, n))
}

fn io_error(file: &str, line: u64, e: &std::io::Error, gzip: bool) -> Error {
    let message = if gzip {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof => format!(
                "the gzip data is truncated ({e}): the file was cut short; copy or record it again"
            ),
            _ => format!("the gzip data is corrupt ({e}): the file is damaged or not a gzip-compressed trace"),
        }
    } else {
        format!("read error: {e}")
    };
    Error::Parse {
        file: file.to_string(),
        line,
        message,
    }
}

/// Which allocation ids are live, and where each live or freed id was last seen.
#[derive(Default)]
struct Liveness {
    /// Live id → line of its allocation.
    live: HashMap<u64, u64>,
    /// Freed id → line of its free (until the id is allocated again).
    freed: HashMap<u64, u64>,
}

impl Liveness {
    fn alloc(&mut self, id: u64, line: u64) -> std::result::Result<(), String> {
        match self.live.entry(id) {
            Entry::Occupied(e) => Err(format!(
                "duplicate live id {id}: it was allocated at line {} and not freed since; \
                 ids must be unique among live allocations",
                e.get()
            )),
            Entry::Vacant(v) => {
                v.insert(line);
                self.freed.remove(&id);
                Ok(())
            }
        }
    }

    fn free(&mut self, id: u64, line: u64) -> std::result::Result<(), String> {
        if self.live.remove(&id).is_some() {
            self.freed.insert(id, line);
            return Ok(());
        }
        Err(match self.freed.get(&id) {
            Some(at) => {
                format!("free of id {id}, which was already freed at line {at} (double free)")
            }
            None => format!("free of unknown id {id}: no earlier line allocates it"),
        })
    }
}

fn check_alloc_values(size: u64, stream: u32) -> std::result::Result<(), String> {
    if size > MAX_SIZE {
        return Err(format!(
            "size exceeds 256 TiB: {size} bytes requested, and a trace may request at most 2^48 bytes"
        ));
    }
    if stream > MAX_STREAM {
        return Err(format!(
            "stream {stream} is over {MAX_STREAM}, the largest stream number a trace may use"
        ));
    }
    Ok(())
}

/// Show an untrusted token in a message: escaped and cut short.
fn shown(token: &str) -> String {
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

/// Parse a non-negative decimal integer field.
fn parse_u64_field(what: &str, token: &str) -> std::result::Result<u64, String> {
    if token.is_empty() {
        return Err(format!("{what} is empty; expected a non-negative integer"));
    }
    if let Some(rest) = token.strip_prefix('-') {
        if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{what} {} is negative; expected a non-negative integer",
                shown(token)
            ));
        }
    }
    if !token.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{what} '{}' is not a non-negative integer",
            shown(token)
        ));
    }
    token
        .parse::<u64>()
        .map_err(|_| format!("{what} {} does not fit in 64 bits", shown(token)))
}

/// Streaming line parser with its state.
struct Parser {
    name: String,
    file: String,
    gzip: bool,
    line: u64,
    ops: Vec<TraceOp>,
    lines: Vec<u64>,
    torch: Option<TorchPeaks>,
    liveness: Liveness,
}

enum LineRead {
    Eof,
    Line,
    TooLong,
}

/// Read one line (without its `\n`) into `buf`, refusing lines over [`MAX_LINE_LEN`].
fn read_line_limited<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<LineRead> {
    buf.clear();
    loop {
        let available = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if buf.len() + take > MAX_LINE_LEN {
            return Ok(LineRead::TooLong);
        }
        buf.extend_from_slice(&available[..take]);
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(LineRead::Line);
        }
    }
}

impl Parser {
    fn new(name: &str, file: &str, gzip: bool) -> Self {
        Parser {
            name: name.to_string(),
            file: file.to_string(),
            gzip,
            line: 0,
            ops: Vec::new(),
            lines: Vec::new(),
            torch: None,
            liveness: Liveness::default(),
        }
    }

    fn error(&self, message: String) -> Error {
        Error::Parse {
            file: self.file.clone(),
            line: self.line.max(1),
            message,
        }
    }

    fn run<R: BufRead>(&mut self, mut input: R) -> Result<()> {
        let mut buf = Vec::with_capacity(128);
        loop {
            let read = read_line_limited(&mut input, &mut buf)
                .map_err(|e| io_error(&self.file, self.line + 1, &e, self.gzip))?;
            match read {
                LineRead::Eof => return Ok(()),
                LineRead::TooLong => {
                    self.line += 1;
                    return Err(self.error(format!(
                        "line is longer than {MAX_LINE_LEN} bytes: this is not a trace file \
                         (event lines look like 'a ID BYTES STREAM' or 'f ID')"
                    )));
                }
                LineRead::Line => {
                    self.line += 1;
                    self.line_bytes(&buf)?;
                }
            }
        }
    }

    fn line_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                return Err(self.error(format!(
                    "line is not text (invalid UTF-8 at byte {}): binary data, not a trace file",
                    e.valid_up_to() + 1
                )))
            }
        };
        if let Some(pos) = text.bytes().position(|b| b == 0) {
            return Err(self.error(format!(
                "line contains a NUL byte at byte {}: binary data, not a trace file",
                pos + 1
            )));
        }
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        if let Some(comment) = text.strip_prefix('#') {
            if self.torch.is_none() {
                self.torch = parse_torch_header(comment);
            }
            return Ok(());
        }
        let op = self.event(text).map_err(|m| self.error(m))?;
        self.ops.push(op);
        self.lines.push(self.line);
        Ok(())
    }

    fn event(&mut self, text: &str) -> std::result::Result<TraceOp, String> {
        let mut fields = text.split_ascii_whitespace();
        let letter = fields.next().unwrap_or_default();
        let rest: Vec<&str> = fields.collect();
        match letter {
            "a" => {
                if rest.len() != 3 {
                    return Err(format!(
                        "an allocation needs 3 fields after 'a' (ID BYTES STREAM), found {}: '{}'",
                        rest.len(),
                        shown(text)
                    ));
                }
                let id = parse_u64_field("id", rest[0])?;
                let size = parse_u64_field("size", rest[1])?;
                let stream = parse_u64_field("stream", rest[2])?;
                let stream = u32::try_from(stream).unwrap_or(u32::MAX);
                if stream > MAX_STREAM {
                    return Err(format!(
                        "stream {} is over {MAX_STREAM}, the largest stream number a trace may use",
                        shown(rest[2])
                    ));
                }
                check_alloc_values(size, stream)?;
                self.liveness.alloc(id, self.line)?;
                Ok(TraceOp::Alloc { id, size, stream })
            }
            "f" => {
                if rest.len() != 1 {
                    return Err(format!(
                        "a free needs 1 field after 'f' (ID), found {}: '{}'",
                        rest.len(),
                        shown(text)
                    ));
                }
                let id = parse_u64_field("id", rest[0])?;
                self.liveness.free(id, self.line)?;
                Ok(TraceOp::Free { id })
            }
            other => Err(format!(
                "unknown event '{}': expected 'a ID BYTES STREAM' (allocate), 'f ID' (free) or a '#' comment",
                shown(other)
            )),
        }
    }

    fn finish(self) -> Result<Trace> {
        if self.ops.is_empty() {
            let message = if self.line == 0 {
                "the file is empty: expected event lines 'a ID BYTES STREAM' or 'f ID'".to_string()
            } else {
                format!(
                    "no events in {} line(s) of comments and blank lines: expected event lines \
                     'a ID BYTES STREAM' or 'f ID'",
                    self.line
                )
            };
            return Err(self.error(message));
        }
        Ok(Trace {
            name: self.name,
            ops: self.ops,
            torch: self.torch,
            lines: self.lines,
            source: self.file,
        })
    }
}

/// Read `torch peak_allocated=N peak_reserved=N conf=...` out of a comment. The words after
/// `torch` are `key=value` pairs; unreadable values leave their field empty.
fn parse_torch_header(comment: &str) -> Option<TorchPeaks> {
    let words: Vec<&str> = comment.split_ascii_whitespace().collect();
    let start = words
        .windows(2)
        .position(|w| w[0] == "torch" && w[1].contains('='))?;
    let mut peaks = TorchPeaks::default();
    for word in &words[start + 1..] {
        let Some((key, value)) = word.split_once('=') else {
            break;
        };
        match key {
            "peak_allocated" => peaks.peak_allocated = value.parse().ok(),
            "peak_reserved" => peaks.peak_reserved = value.parse().ok(),
            "conf" if !value.is_empty() => peaks.conf = Some(value.to_string()),
            _ => {}
        }
    }
    if peaks == TorchPeaks::default() {
        None
    } else {
        Some(peaks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_are_optional() {
        let p = parse_torch_header(
            " lines: 'a ID' = allocate. torch peak_allocated=10 peak_reserved=20 conf=native",
        )
        .unwrap();
        assert_eq!(p.peak_allocated, Some(10));
        assert_eq!(p.peak_reserved, Some(20));
        assert_eq!(p.conf.as_deref(), Some("native"));
        assert_eq!(p.ratio(), Some(2.0));
        let p = parse_torch_header(" torch peak_reserved=x conf=expandable_segments:True").unwrap();
        assert_eq!(p.peak_reserved, None);
        assert_eq!(p.conf.as_deref(), Some("expandable_segments:True"));
        assert!(parse_torch_header(" recorded with torch 2.11").is_none());
        assert!(parse_torch_header("").is_none());
    }

    #[test]
    fn names_come_from_paths() {
        assert_eq!(
            name_from_path(Path::new("traces/resnet50_train.trace.gz")),
            "resnet50_train"
        );
        assert_eq!(name_from_path(Path::new("x.trace")), "x");
        assert_eq!(name_from_path(Path::new(".gz")), ".gz");
        assert_eq!(name_from_path(Path::new("/")), "trace");
    }

    #[test]
    fn number_fields() {
        assert_eq!(parse_u64_field("id", "007"), Ok(7));
        assert!(parse_u64_field("id", "-3")
            .unwrap_err()
            .contains("negative"));
        assert!(parse_u64_field("id", "+3")
            .unwrap_err()
            .contains("not a non-negative integer"));
        assert!(parse_u64_field("id", "1e3")
            .unwrap_err()
            .contains("not a non-negative integer"));
        assert!(parse_u64_field("id", "18446744073709551616")
            .unwrap_err()
            .contains("64 bits"));
        assert_eq!(parse_u64_field("id", "18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn one_byte_reader_parses_plain_and_gzip() {
        // A reader that hands out one byte at a time must still be read correctly.
        struct OneByte<'a>(&'a [u8]);
        impl Read for OneByte<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0.is_empty() || buf.is_empty() {
                    return Ok(0);
                }
                buf[0] = self.0[0];
                self.0 = &self.0[1..];
                Ok(1)
            }
        }
        let text = b"a 1 2 0\nf 1\n";
        let t = parse_reader("t", "t", OneByte(text)).unwrap();
        assert_eq!(t.ops.len(), 2);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(text).unwrap();
        let gz = gz.finish().unwrap();
        let t2 = parse_reader("t", "t", OneByte(&gz)).unwrap();
        assert_eq!(t2, t);
    }
}
