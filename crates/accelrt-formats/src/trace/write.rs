//! Writing traces: v1 for untimed traces, v2 for timed ones.

use std::io::Write;
use std::path::Path;

use super::{Trace, TraceOp, V2_MAGIC};
use crate::error::{FormatError, Result};

/// `text` on one line: control characters (newlines included) become `_`.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '_' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

fn is_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Trace {
    /// Write the trace as text: v1 for an untimed trace (header comments, then one event a
    /// line), v2 for a timed one (`#accelrt-trace v2`, the `#!` header, events with times).
    /// [`super::parse_bytes`] reads the result back to an equal trace (up to `lines`,
    /// `source`, header values cut to one line and, for v2, the v1-only `torch` figures).
    pub fn write_to(&self, mut w: impl Write) -> std::io::Result<()> {
        if self.is_timed() {
            return self.write_v2(w);
        }
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
                // An untimed trace cannot hold these (the checks refuse them).
                TraceOp::RecordStream { .. } | TraceOp::Complete { .. } => {}
            }
        }
        Ok(())
    }

    fn write_v2(&self, mut w: impl Write) -> std::io::Result<()> {
        let h = &self.header;
        writeln!(w, "{V2_MAGIC}")?;
        writeln!(w, "# allocator trace '{}'", self.name.escape_debug())?;
        let text_keys = [
            ("workload", &h.workload),
            ("recorded_on", &h.recorded_on),
            ("recorded_with", &h.recorded_with),
            ("allocator", &h.allocator),
            ("conf", &h.conf),
        ];
        for (key, value) in text_keys {
            if let Some(v) = value {
                writeln!(w, "#! {key}={}", one_line(v))?;
            }
        }
        for (key, value) in [
            ("real_peak_reserved", h.real_peak_reserved),
            ("real_peak_allocated", h.real_peak_allocated),
        ] {
            if let Some(v) = value {
                writeln!(w, "#! {key}={v}")?;
            }
        }
        if let Some(m) = h.markers.name() {
            writeln!(w, "#! markers={m}")?;
        }
        writeln!(w, "#! time_unit=us")?;
        for (key, value) in &h.other {
            if is_key(key) && key != "time_unit" {
                writeln!(w, "#! {key}={}", one_line(value))?;
            }
        }
        for (op, t) in self.ops.iter().zip(&self.times) {
            match *op {
                TraceOp::Alloc { id, size, stream } => writeln!(w, "a {id} {size} {stream} {t}")?,
                TraceOp::Free { id } => writeln!(w, "f {id} {t}")?,
                TraceOp::RecordStream { id, stream } => writeln!(w, "u {id} {stream} {t}")?,
                TraceOp::Complete { id } => writeln!(w, "c {id} {t}")?,
            }
        }
        Ok(())
    }

    /// The trace as text, as [`Trace::write_to`] writes it.
    pub fn to_text(&self) -> String {
        let mut out = Vec::new();
        self.write_to(&mut out)
            .expect("writing to a Vec cannot fail");
        String::from_utf8(out).expect("the trace writer writes only UTF-8 strings")
    }

    /// Write the trace to `path`, gzip-compressed when the name ends in `.gz`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io = |e: std::io::Error| {
            FormatError::io(
                path.display().to_string(),
                format!("cannot write the trace: {e}"),
                e,
            )
        };
        let file = std::fs::File::create(path).map_err(io)?;
        let mut out = std::io::BufWriter::new(file);
        let gzip = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".gz"));
        if gzip {
            let mut enc = flate2::write::GzEncoder::new(&mut out, flate2::Compression::default());
            self.write_to(&mut enc).map_err(io)?;
            enc.finish().map_err(io)?;
        } else {
            self.write_to(&mut out).map_err(io)?;
        }
        out.flush().map_err(io)
    }
}
