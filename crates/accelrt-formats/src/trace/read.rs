//! The streaming text reader: v1 and v2 lines, plain or gzip, one event at a time.
//!
//! This layer checks what one line can show (fields, numbers, value ranges, times that never
//! go backwards, header keys); what needs the history of the trace (ids live or freed,
//! markers after their frees) is `check.rs`'s.

use std::cell::Cell;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::rc::Rc;

use super::{
    shown, Header, Markers, TorchPeaks, TraceOp, MAX_HEADER_BYTES, MAX_HEADER_KEYS, MAX_LINE_LEN,
    MAX_SIZE, MAX_STREAM, MAX_TIME_US, V2_MAGIC,
};
use crate::error::{FormatError, Result};

/// The gzip magic bytes.
pub(crate) const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Open `path` for reading, with the trace reader's messages for a missing file or a
/// directory.
pub(crate) fn open_file(path: &Path, what: &str) -> Result<std::fs::File> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| {
        FormatError::io(
            shown.clone(),
            format!("cannot open the {what} file: {e}"),
            e,
        )
    })?;
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(FormatError::io(
            shown,
            "is a directory: pass a trace file (e.g. traces/resnet50_train.trace.gz)",
            std::io::Error::from(std::io::ErrorKind::IsADirectory),
        ));
    }
    Ok(file)
}

/// One event as read, with where it was read and (v2) its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEvent {
    /// The event.
    pub op: TraceOp,
    /// The CPU time in microseconds (v2), `None` in an untimed trace.
    pub time: Option<u64>,
    /// 1-based line (or entry) number.
    pub line: u64,
}

/// Counts the bytes read from the underlying input (before decompression), for progress.
struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// A trace file read one event at a time: the header is read when the reader is made, then
/// [`TraceReader::next_event`] hands out events as the input is read. Memory does not grow
/// with the input.
pub struct TraceReader<'a> {
    file: String,
    gzip: bool,
    input: Box<dyn BufRead + 'a>,
    consumed: Rc<Cell<u64>>,
    line: u64,
    buf: Vec<u8>,
    header: Header,
    torch: Option<TorchPeaks>,
    /// The first event, read while looking for the end of the header.
    first: Option<TraceEvent>,
    events: u64,
}

enum LineRead {
    Eof,
    Line,
    TooLong,
}

/// Read one line (without its `\n`) into `buf`, refusing lines over [`MAX_LINE_LEN`].
fn read_line_limited<R: BufRead + ?Sized>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<LineRead> {
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

pub(crate) fn io_error(file: &str, line: u64, e: &std::io::Error, gzip: bool) -> FormatError {
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
    FormatError::Parse {
        file: file.to_string(),
        line,
        message,
    }
}

/// Parse a non-negative decimal integer field.
pub(crate) fn parse_u64_field(what: &str, token: &str) -> std::result::Result<u64, String> {
    if !token.is_empty() && token.len() <= 19 && token.bytes().all(|b| b.is_ascii_digit()) {
        // Fast path: at most 19 digits always fit in 64 bits.
        return Ok(token
            .bytes()
            .fold(0u64, |n, b| n * 10 + u64::from(b - b'0')));
    }
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

pub(crate) fn check_alloc_values(size: u64, stream: u32) -> std::result::Result<(), String> {
    if size > MAX_SIZE {
        return Err(format!(
            "size exceeds 256 TiB: {size} bytes requested, and a trace may request at most 2^48 bytes"
        ));
    }
    check_stream(stream)
}

pub(crate) fn check_stream(stream: u32) -> std::result::Result<(), String> {
    if stream > MAX_STREAM {
        return Err(format!(
            "stream {stream} is over {MAX_STREAM}, the largest stream number a trace may use"
        ));
    }
    Ok(())
}

fn parse_stream(token: &str) -> std::result::Result<u32, String> {
    let stream = parse_u64_field("stream", token)?;
    match u32::try_from(stream) {
        Ok(s) if s <= MAX_STREAM => Ok(s),
        _ => Err(format!(
            "stream {} is over {MAX_STREAM}, the largest stream number a trace may use",
            shown(token)
        )),
    }
}

fn parse_time(token: &str) -> std::result::Result<u64, String> {
    let t = parse_u64_field("time", token)?;
    if t > MAX_TIME_US {
        return Err(format!(
            "time {t} is over 2^48 microseconds (about 8.9 years), the largest time a trace may \
             carry; times count microseconds since the recording started"
        ));
    }
    Ok(t)
}

/// The words of an event line, without allocating: the letter, up to 5 fields, and how many
/// fields there were in all.
struct Words<'t> {
    letter: &'t str,
    fields: [&'t str; 5],
    count: usize,
}

fn words(text: &str) -> Words<'_> {
    let mut it = text.split_ascii_whitespace();
    let letter = it.next().unwrap_or_default();
    let mut fields = [""; 5];
    let mut count = 0;
    for w in it {
        if count < fields.len() {
            fields[count] = w;
        }
        count += 1;
    }
    Words {
        letter,
        fields,
        count,
    }
}

impl<'a> TraceReader<'a> {
    /// Start reading `reader` (plain text or gzip, told apart by the gzip magic bytes) and
    /// read the header. `file` names the input in errors.
    pub fn new(file: &str, reader: impl Read + 'a) -> Result<TraceReader<'a>> {
        let consumed = Rc::new(Cell::new(0));
        let mut reader = Counting {
            inner: reader,
            count: Rc::clone(&consumed),
        };
        let (magic, n) = read_magic(&mut reader).map_err(|e| io_error(file, 1, &e, false))?;
        let gzip = n == GZIP_MAGIC.len() && magic == GZIP_MAGIC;
        // Put the peeked bytes back in front of the rest.
        let peeked = std::io::Cursor::new(magic).take(n as u64);
        let input = BufReader::with_capacity(64 * 1024, peeked.chain(reader));
        let input: Box<dyn BufRead + 'a> = if gzip {
            let decoder = flate2::bufread::MultiGzDecoder::new(input);
            Box::new(BufReader::with_capacity(64 * 1024, decoder))
        } else {
            Box::new(input)
        };
        let mut r = TraceReader {
            file: file.to_string(),
            gzip,
            input,
            consumed,
            line: 0,
            buf: Vec::with_capacity(128),
            header: Header::default(),
            torch: None,
            first: None,
            events: 0,
        };
        r.read_header()?;
        Ok(r)
    }

    /// What error messages call the input.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The header: version and, for v2, the `#!` keys.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// PyTorch's figures from a v1 `# torch ...` comment before the first event.
    pub fn torch(&self) -> Option<&TorchPeaks> {
        self.torch.as_ref()
    }

    /// Whether the events carry times (v2).
    pub fn is_timed(&self) -> bool {
        self.header.version >= 2
    }

    /// Whether the input is gzip-compressed.
    pub fn is_gzip(&self) -> bool {
        self.gzip
    }

    /// Bytes read from the input so far (compressed bytes for gzip).
    pub fn input_bytes(&self) -> u64 {
        self.consumed.get()
    }

    /// Events handed out so far.
    pub fn events_read(&self) -> u64 {
        self.events
    }

    fn error(&self, message: String) -> FormatError {
        FormatError::Parse {
            file: self.file.clone(),
            line: self.line.max(1),
            message,
        }
    }

    /// Read the next line into `self.buf`; `Ok(None)` at the end of the input.
    fn next_line(&mut self) -> Result<Option<()>> {
        let read = read_line_limited(&mut *self.input, &mut self.buf)
            .map_err(|e| io_error(&self.file, self.line + 1, &e, self.gzip))?;
        match read {
            LineRead::Eof => Ok(None),
            LineRead::TooLong => {
                self.line += 1;
                Err(self.error(format!(
                    "line is longer than {MAX_LINE_LEN} bytes: this is not a trace file \
                     (event lines look like 'a ID BYTES STREAM' or 'f ID')"
                )))
            }
            LineRead::Line => {
                self.line += 1;
                Ok(Some(()))
            }
        }
    }

    /// Read lines up to the first event (kept for [`TraceReader::next_event`]).
    fn read_header(&mut self) -> Result<()> {
        let mut seen: Vec<(String, u64)> = Vec::new();
        while self.next_line()?.is_some() {
            let buf = std::mem::take(&mut self.buf);
            let found = self.header_or_event(&buf, &mut seen);
            self.buf = buf;
            if let Some(event) = found? {
                self.first = Some(event);
                return Ok(());
            }
        }
        // No event at all.
        let message = if self.line == 0 {
            "the file is empty: expected event lines 'a ID BYTES STREAM' or 'f ID'".to_string()
        } else {
            format!(
                "no events in {} line(s) of comments and blank lines: expected event lines \
                 'a ID BYTES STREAM' or 'f ID'",
                self.line
            )
        };
        Err(self.error(message))
    }

    /// One line before the first event: the version line, a header line, a comment, or the
    /// first event.
    fn header_or_event(
        &mut self,
        bytes: &[u8],
        seen: &mut Vec<(String, u64)>,
    ) -> Result<Option<TraceEvent>> {
        let text = line_text(bytes).map_err(|m| self.error(m))?;
        if self.line == 1 {
            if text == V2_MAGIC {
                self.header.version = 2;
                return Ok(None);
            }
            if let Some(rest) = text.strip_prefix("#accelrt-trace") {
                return Err(self.error(format!(
                    "unsupported trace format '{}': this reader knows v1 (no version line) \
                     and v2 (first line '{V2_MAGIC}')",
                    shown(rest.trim())
                )));
            }
        }
        if text.is_empty() {
            return Ok(None);
        }
        if let Some(comment) = text.strip_prefix('#') {
            if self.header.version >= 2 {
                if let Some(kv) = comment.strip_prefix('!') {
                    self.header_line(kv, seen)?;
                }
            } else if self.torch.is_none() {
                self.torch = parse_torch_header(comment);
            }
            return Ok(None);
        }
        self.event(text).map(Some).map_err(|m| self.error(m))
    }

    /// One `#! key=value` line.
    fn header_line(&mut self, kv: &str, seen: &mut Vec<(String, u64)>) -> Result<()> {
        let kv = kv.trim_start();
        let Some((key, value)) = kv.split_once('=') else {
            return Err(self.error(format!(
                "header line '#!{}' has no '=': expected '#! key=value'",
                shown(kv)
            )));
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(self.error(format!(
                "header key '{}' is not a name: keys are lowercase letters, digits and '_'",
                shown(key)
            )));
        }
        if let Some((_, at)) = seen.iter().find(|(k, _)| k == key) {
            return Err(self.error(format!(
                "header key '{key}' is given twice (first at line {at}): give each key once"
            )));
        }
        if seen.len() >= MAX_HEADER_KEYS {
            return Err(self.error(format!(
                "more than {MAX_HEADER_KEYS} header lines: this is not a trace header"
            )));
        }
        seen.push((key.to_string(), self.line));
        apply_header_key(&mut self.header, key, value).map_err(|m| self.error(m))
    }

    /// The next event, or `None` at the end of the input. Each line is checked on its own
    /// here; what needs the trace's history (ids live, markers after their frees, times
    /// forward) is checked by [`super::parse_reader`] and by the replay.
    pub fn next_event(&mut self) -> Result<Option<TraceEvent>> {
        if let Some(first) = self.first.take() {
            self.events += 1;
            return Ok(Some(first));
        }
        while self.next_line()?.is_some() {
            let buf = std::mem::take(&mut self.buf);
            let found = self.body_line(&buf);
            self.buf = buf;
            if let Some(event) = found? {
                self.events += 1;
                return Ok(Some(event));
            }
        }
        Ok(None)
    }

    /// One line after the first event: an event, a comment or a blank line.
    fn body_line(&mut self, bytes: &[u8]) -> Result<Option<TraceEvent>> {
        let text = line_text(bytes).map_err(|m| self.error(m))?;
        if text.is_empty() {
            return Ok(None);
        }
        if let Some(comment) = text.strip_prefix('#') {
            if self.header.version >= 2 && comment.starts_with('!') {
                return Err(self.error(
                    "header line after the first event: '#!' lines come before the first event"
                        .to_string(),
                ));
            }
            return Ok(None);
        }
        self.event(text).map(Some).map_err(|m| self.error(m))
    }

    /// Parse one event line.
    fn event(&mut self, text: &str) -> std::result::Result<TraceEvent, String> {
        let w = words(text);
        let v2 = self.header.version >= 2;
        let need = |fields: usize, form: &str| -> std::result::Result<(), String> {
            if w.count == fields {
                return Ok(());
            }
            Err(format!("{form}, found {}: '{}'", w.count, shown(text)))
        };
        let (op, time) = match (w.letter, v2) {
            ("a", false) => {
                need(3, "an allocation needs 3 fields after 'a' (ID BYTES STREAM)")?;
                (self.alloc(&w.fields)?, None)
            }
            ("a", true) => {
                need(
                    4,
                    "an allocation needs 4 fields after 'a' in a v2 trace (ID BYTES STREAM T)",
                )?;
                (self.alloc(&w.fields)?, Some(parse_time(w.fields[3])?))
            }
            ("f", false) => {
                need(1, "a free needs 1 field after 'f' (ID)")?;
                (
                    TraceOp::Free {
                        id: parse_u64_field("id", w.fields[0])?,
                    },
                    None,
                )
            }
            ("f", true) => {
                need(2, "a free needs 2 fields after 'f' in a v2 trace (ID T)")?;
                (
                    TraceOp::Free {
                        id: parse_u64_field("id", w.fields[0])?,
                    },
                    Some(parse_time(w.fields[1])?),
                )
            }
            ("u", true) => {
                need(3, "a record_stream needs 3 fields after 'u' (ID STREAM T)")?;
                (
                    TraceOp::RecordStream {
                        id: parse_u64_field("id", w.fields[0])?,
                        stream: parse_stream(w.fields[1])?,
                    },
                    Some(parse_time(w.fields[2])?),
                )
            }
            ("c", true) => {
                need(2, "a completion marker needs 2 fields after 'c' (ID T)")?;
                (
                    TraceOp::Complete {
                        id: parse_u64_field("id", w.fields[0])?,
                    },
                    Some(parse_time(w.fields[1])?),
                )
            }
            ("u" | "c", false) => {
                return Err(format!(
                    "'{}' lines exist only in v2 traces: this file does not start with \
                     '{V2_MAGIC}'",
                    w.letter
                ))
            }
            (other, false) => {
                return Err(format!(
                    "unknown event '{}': expected 'a ID BYTES STREAM' (allocate), 'f ID' (free) or a '#' comment",
                    shown(other)
                ))
            }
            (other, true) => {
                return Err(format!(
                    "unknown event '{}': expected 'a ID BYTES STREAM T', 'f ID T', 'u ID STREAM T', \
                     'c ID T' or a '#' comment",
                    shown(other)
                ))
            }
        };
        Ok(TraceEvent {
            op,
            time,
            line: self.line,
        })
    }

    fn alloc(&self, f: &[&str; 5]) -> std::result::Result<TraceOp, String> {
        let id = parse_u64_field("id", f[0])?;
        let size = parse_u64_field("size", f[1])?;
        let stream = parse_stream(f[2])?;
        check_alloc_values(size, stream)?;
        Ok(TraceOp::Alloc { id, size, stream })
    }
}

/// Set the header field of `key` (or keep an unknown key in `other`).
fn apply_header_key(h: &mut Header, key: &str, value: &str) -> std::result::Result<(), String> {
    let bytes = |what: &str| -> std::result::Result<Option<u64>, String> {
        let n = parse_u64_field(what, value)?;
        if n > MAX_HEADER_BYTES {
            return Err(format!(
                "{what}={n} is over 2^60 bytes: a peak is a byte count of the recorded run"
            ));
        }
        Ok(Some(n))
    };
    let text = Some(value.to_string());
    match key {
        "workload" => h.workload = text,
        "recorded_on" => h.recorded_on = text,
        "recorded_with" => h.recorded_with = text,
        "allocator" => h.allocator = text,
        "conf" => h.conf = text,
        "real_peak_reserved" => h.real_peak_reserved = bytes(key)?,
        "real_peak_allocated" => h.real_peak_allocated = bytes(key)?,
        "time_unit" if value == "us" => {}
        "time_unit" => {
            return Err(format!(
                "time_unit '{}' is not supported: v2 times are integer microseconds \
                 (time_unit=us)",
                shown(value)
            ))
        }
        "markers" => {
            h.markers = match value {
                "all" => Markers::All,
                "cross_stream" => Markers::CrossStream,
                "none" => Markers::None,
                other => {
                    return Err(format!(
                        "markers '{}' is not one of all, cross_stream, none",
                        shown(other)
                    ))
                }
            }
        }
        _ => h.other.push((key.to_string(), value.to_string())),
    }
    Ok(())
}

/// A line as trimmed text, or why it is not text.
fn line_text(bytes: &[u8]) -> std::result::Result<&str, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "line is not text (invalid UTF-8 at byte {}): binary data, not a trace file",
            e.valid_up_to() + 1
        )
    })?;
    if let Some(pos) = text.bytes().position(|b| b == 0) {
        return Err(format!(
            "line contains a NUL byte at byte {}: binary data, not a trace file",
            pos + 1
        ));
    }
    Ok(text.trim())
}

/// Read `torch peak_allocated=N peak_reserved=N conf=...` out of a comment. The words after
/// `torch` are `key=value` pairs; unreadable values leave their field empty.
pub(crate) fn parse_torch_header(comment: &str) -> Option<TorchPeaks> {
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
mod tests;
