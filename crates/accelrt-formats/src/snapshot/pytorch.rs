//! PyTorch's snapshot layout (`torch.cuda.memory._snapshot()`), read from and written to a
//! pickle.
//!
//! Import is strict about types (a size that is a string, a negative address, an unknown
//! action are errors naming the entry) and lenient about keys that older PyTorch versions
//! lack (`requested_size`, `segment_pool_id`, `is_expandable`, `time_us`, `frames`, block
//! `address`), which get PyTorch's defaults.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::pickle::{Pickle, PickleFault, PickleWriter, Value};
use super::{block_status_from_name, Snapshot};
use crate::error::{FormatError, Result};
use crate::trace::MAX_STREAM;
use accelrt_alloc::{BlockInfo, Frame, Frames, PoolKind, SegmentInfo, TraceAction, TraceEntry};

/// Most frames kept per stack (deeper stacks are cut; PyTorch's are ~100 deep at most).
const MAX_FRAMES: usize = 1024;

use super::MAX_DEVICES;

struct Reader<'a> {
    p: &'a Pickle,
    file: &'a str,
    /// Frames already converted, by list node (files share them through the memo).
    frames: HashMap<u32, Frames>,
    /// Per device: raw stream handle -> index, and the handles in index order.
    streams: Vec<(HashMap<u64, u32>, Vec<u64>)>,
}

fn shown(p: &Pickle, v: Value) -> String {
    match v {
        Value::Str(_) => {
            let s = p.as_str(v).unwrap_or_default();
            let mut t: String = s.chars().take(40).flat_map(char::escape_debug).collect();
            if s.chars().count() > 40 {
                t.push('…');
            }
            format!("str '{t}'")
        }
        Value::Int(i) => format!("int {i}"),
        Value::Float(f) => format!("float {f}"),
        Value::Bool(b) => format!("bool {}", if b { "True" } else { "False" }),
        Value::None => "None".into(),
        Value::List(_) => format!("list of {}", p.as_seq(v).map_or(0, <[_]>::len)),
        Value::Tuple(_) => format!("tuple of {}", p.as_seq(v).map_or(0, <[_]>::len)),
        Value::Dict(_) => format!("dict of {} key(s)", p.as_dict(v).map_or(0, <[_]>::len)),
    }
}

impl<'a> Reader<'a> {
    fn err(&self, at: impl Into<String>, message: impl Into<String>) -> FormatError {
        FormatError::Snapshot {
            file: self.file.to_string(),
            at: at.into(),
            message: message.into(),
        }
    }

    fn wrong(&self, at: &str, want: &str, found: Value) -> FormatError {
        self.err(
            at,
            format!("expected {want}, found {}", shown(self.p, found)),
        )
    }

    fn dict(&self, v: Value, at: &str) -> Result<Value> {
        match v {
            Value::Dict(_) => Ok(v),
            other => Err(self.wrong(at, "a dict", other)),
        }
    }

    fn seq(&self, v: Value, at: &str) -> Result<&'a [Value]> {
        match v {
            Value::List(_) | Value::Tuple(_) => Ok(self.p.as_seq(v).unwrap_or_default()),
            other => Err(self.wrong(at, "a list", other)),
        }
    }

    fn required(&self, dict: Value, key: &str, at: &str) -> Result<Value> {
        self.p.get(dict, key).ok_or_else(|| {
            let keys: Vec<&str> = self
                .p
                .as_dict(dict)
                .unwrap_or_default()
                .iter()
                .filter_map(|(k, _)| self.p.as_str(*k))
                .take(16)
                .collect();
            self.err(
                at,
                format!(
                    "missing key '{key}' (keys present: {}); is this a \
                     torch.cuda.memory._dump_snapshot() file?",
                    if keys.is_empty() {
                        "none".to_string()
                    } else {
                        keys.join(", ")
                    }
                ),
            )
        })
    }

    fn u64_value(&self, v: Value, at: &str) -> Result<u64> {
        match v {
            Value::Int(i) if i < 0 => Err(self.err(
                at,
                format!("{i} is negative; expected a non-negative integer"),
            )),
            Value::Int(i) => {
                u64::try_from(i).map_err(|_| self.err(at, format!("{i} does not fit in 64 bits")))
            }
            other => Err(self.wrong(at, "a non-negative integer", other)),
        }
    }

    /// accelrt's optional `unmapped` list of (address, size) pairs.
    fn unmapped_key(&self, dict: Value, at: &str) -> Result<Vec<(u64, u64)>> {
        let Some(list) = self.p.get(dict, "unmapped") else {
            return Ok(Vec::new());
        };
        let pat = format!("{at}.unmapped");
        let mut out = Vec::new();
        for (i, &pair) in self.seq(list, &pat)?.iter().enumerate() {
            let pat = format!("{pat}[{i}]");
            match self.seq(pair, &pat)? {
                &[a, b] => out.push((self.u64_value(a, &pat)?, self.u64_value(b, &pat)?)),
                other => {
                    return Err(self.err(
                        pat,
                        format!(
                            "expected an (address, size) pair, found {} item(s)",
                            other.len()
                        ),
                    ))
                }
            }
        }
        Ok(out)
    }

    fn u64_key(&self, dict: Value, key: &str, at: &str, default: Option<u64>) -> Result<u64> {
        let at = format!("{at}.{key}");
        match (self.p.get(dict, key), default) {
            (Some(v), _) => self.u64_value(v, &at),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(self.err(at, "missing (a non-negative integer is required)")),
        }
    }

    fn str_key(&self, dict: Value, key: &str, at: &str) -> Result<Option<&'a str>> {
        match self.p.get(dict, key) {
            None => Ok(None),
            Some(v) => self
                .p
                .as_str(v)
                .map(Some)
                .ok_or_else(|| self.wrong(&format!("{at}.{key}"), "a string", v)),
        }
    }

    fn bool_key(&self, dict: Value, key: &str, at: &str) -> Result<bool> {
        match self.p.get(dict, key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(b),
            Some(other) => Err(self.wrong(&format!("{at}.{key}"), "True or False", other)),
        }
    }

    /// The stream index of a raw handle on `device` (0 stays 0; others in order of first
    /// appearance).
    fn stream(&mut self, device: u32, raw: u64, at: &str) -> Result<u32> {
        let d = device as usize;
        if self.streams.len() <= d {
            self.streams
                .resize_with(d + 1, || (HashMap::new(), vec![0]));
        }
        let (map, handles) = &mut self.streams[d];
        if raw == 0 {
            return Ok(0);
        }
        if let Some(&i) = map.get(&raw) {
            return Ok(i);
        }
        let index = handles.len() as u32;
        if index > MAX_STREAM {
            return Err(self.err(
                at,
                format!(
                    "more than {} distinct streams on device {device}",
                    MAX_STREAM + 1
                ),
            ));
        }
        map.insert(raw, index);
        handles.push(raw);
        Ok(index)
    }

    fn frames(&mut self, dict: Value, at: &str) -> Result<Option<Frames>> {
        let Some(list) = self.p.get(dict, "frames") else {
            return Ok(None);
        };
        if let Some(f) = list.container_id().and_then(|id| self.frames.get(&id)) {
            return Ok(Some(Arc::clone(f)));
        }
        let at = format!("{at}.frames");
        let items = self.seq(list, &at)?;
        if items.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(items.len().min(MAX_FRAMES));
        for (k, &f) in items.iter().take(MAX_FRAMES).enumerate() {
            let fat = format!("{at}[{k}]");
            let f = self.dict(f, &fat)?;
            let line = self.u64_key(f, "line", &fat, Some(0))?;
            out.push(Frame {
                name: self.str_key(f, "name", &fat)?.unwrap_or("").to_string(),
                filename: self.str_key(f, "filename", &fat)?.unwrap_or("").to_string(),
                line: u32::try_from(line)
                    .map_err(|_| self.err(format!("{fat}.line"), format!("{line} is over 2^32")))?,
            });
        }
        let frames: Frames = out.into();
        if let Some(id) = list.container_id() {
            self.frames.insert(id, Arc::clone(&frames));
        }
        Ok(Some(frames))
    }

    fn entry(&mut self, device: u32, v: Value, at: &str) -> Result<TraceEntry> {
        let e = self.dict(v, at)?;
        let action_value = self.required(e, "action", at)?;
        let name = self
            .p
            .as_str(action_value)
            .ok_or_else(|| self.wrong(&format!("{at}.action"), "a string", action_value))?;
        let action = TraceAction::from_name(name).ok_or_else(|| {
            let known: Vec<&str> = TraceAction::ALL.iter().map(|a| a.name()).collect();
            self.err(
                format!("{at}.action"),
                format!(
                    "unknown action '{}' (known: {})",
                    name.escape_debug(),
                    known.join(", ")
                ),
            )
        })?;
        // PyTorch stores an OOM's free device memory under `device_free` instead of `addr`.
        let addr = if action == TraceAction::Oom {
            self.u64_key(e, "device_free", at, Some(0))?
        } else {
            self.u64_key(e, "addr", at, None)?
        };
        let size = self.u64_key(e, "size", at, None)?;
        let raw_stream = self.u64_key(e, "stream", at, Some(0))?;
        let stream = if action == TraceAction::Snapshot {
            u32::MAX // belongs to no stream, as accelrt records it
        } else {
            self.stream(device, raw_stream, &format!("{at}.stream"))?
        };
        let time_us = match self.p.get(e, "time_us") {
            None => 0,
            Some(Value::Float(f)) if f >= 0.0 && f.is_finite() => f as u64,
            Some(v) => self.u64_value(v, &format!("{at}.time_us"))?,
        };
        let frames = self.frames(e, at)?;
        Ok(TraceEntry {
            action,
            addr,
            size,
            stream,
            time_us,
            frames,
        })
    }

    fn segment(&mut self, v: Value, at: &str) -> Result<SegmentInfo> {
        let s = self.dict(v, at)?;
        let device = self.u64_key(s, "device", at, Some(0))?;
        let device = u32::try_from(device)
            .ok()
            .filter(|&d| (d as usize) < MAX_DEVICES)
            .ok_or_else(|| {
                self.err(
                    format!("{at}.device"),
                    format!(
                        "device {device} is not one of the {MAX_DEVICES} a snapshot may \
                         describe (0 to {})",
                        MAX_DEVICES - 1
                    ),
                )
            })?;
        let address = self.u64_key(s, "address", at, None)?;
        let total_size = self.u64_key(s, "total_size", at, None)?;
        let raw_stream = self.u64_key(s, "stream", at, Some(0))?;
        let stream = self.stream(device, raw_stream, &format!("{at}.stream"))?;
        let segment_type = match self.str_key(s, "segment_type", at)? {
            Some("small") => PoolKind::Small,
            Some("large") | None => PoolKind::Large,
            Some(other) => {
                return Err(self.err(
                    format!("{at}.segment_type"),
                    format!("'{}' is neither 'small' nor 'large'", other.escape_debug()),
                ))
            }
        };
        let segment_pool_id = match self.p.get(s, "segment_pool_id") {
            None => (0, 0),
            Some(v) => {
                let pat = format!("{at}.segment_pool_id");
                match self.seq(v, &pat)? {
                    &[a, b] => (self.u64_value(a, &pat)?, self.u64_value(b, &pat)?),
                    other => {
                        return Err(self.err(
                            pat,
                            format!("expected a pair of integers, found {} item(s)", other.len()),
                        ))
                    }
                }
            }
        };
        let mut info = SegmentInfo {
            device,
            address,
            total_size,
            stream,
            segment_type,
            segment_pool_id,
            is_expandable: self.bool_key(s, "is_expandable", at)?,
            unmapped: self.unmapped_key(s, at)?,
            allocated_size: self.u64_key(s, "allocated_size", at, Some(0))?,
            active_size: self.u64_key(s, "active_size", at, Some(0))?,
            requested_size: self.u64_key(s, "requested_size", at, Some(0))?,
            blocks: Vec::new(),
        };
        let blocks = match self.p.get(s, "blocks") {
            None => &[][..],
            Some(b) => self.seq(b, &format!("{at}.blocks"))?,
        };
        let mut offset = address;
        for (j, &b) in blocks.iter().enumerate() {
            let bat = format!("{at}.blocks[{j}]");
            let bd = self.dict(b, &bat)?;
            let size = self.u64_key(bd, "size", &bat, None)?;
            let block_address = self.u64_key(bd, "address", &bat, Some(offset))?;
            let state_name = self.str_key(bd, "state", &bat)?.ok_or_else(|| {
                self.err(
                    format!("{bat}.state"),
                    "missing (a block state is required)",
                )
            })?;
            let state = block_status_from_name(state_name).ok_or_else(|| {
                self.err(
                    format!("{bat}.state"),
                    format!(
                        "unknown block state '{}' (known: active_allocated, \
                         active_pending_free, inactive)",
                        state_name.escape_debug()
                    ),
                )
            })?;
            let requested_size = self.u64_key(bd, "requested_size", &bat, Some(size))?;
            let frames = self.frames(bd, &bat)?;
            info.blocks.push(BlockInfo {
                address: block_address,
                size,
                requested_size,
                state,
                frames,
            });
            offset = block_address.saturating_add(size);
        }
        Ok(info)
    }
}

/// Read a PyTorch snapshot pickle.
pub(super) fn import(file: &str, bytes: &[u8]) -> Result<Snapshot> {
    let p = Pickle::parse(bytes).map_err(|e| FormatError::Snapshot {
        file: file.to_string(),
        at: format!("byte {}", e.offset),
        message: match e.fault {
            PickleFault::Malformed => format!(
                "{} (not a readable pickle: the file is truncated or corrupt)",
                e.message
            ),
            PickleFault::Refused => format!(
                "{} (not a memory snapshot; accelrt never runs code from a file)",
                e.message
            ),
            PickleFault::Unsupported => format!(
                "{} (accelrt reads the pickle subset torch.cuda.memory._dump_snapshot() \
                 writes)",
                e.message
            ),
            PickleFault::Limit => e.message,
        },
    })?;
    let mut r = Reader {
        p: &p,
        file,
        frames: HashMap::new(),
        streams: Vec::new(),
    };
    let root = r.dict(p.root(), "top level")?;
    let traces_value = r.required(root, "device_traces", "top level")?;
    let traces = r.seq(traces_value, "device_traces")?;
    if traces.len() > MAX_DEVICES {
        return Err(r.err(
            "device_traces",
            format!("{} devices is more than {MAX_DEVICES}", traces.len()),
        ));
    }
    // A list shared between two places would be processed twice: real files never do it,
    // and a hostile one could multiply the work.
    let mut seen_lists: HashSet<u32> = HashSet::new();
    let mut device_traces = Vec::with_capacity(traces.len());
    for (d, &list) in traces.iter().enumerate() {
        let at = format!("device_traces[{d}]");
        let entries = r.seq(list, &at)?;
        if !seen_lists.insert(list.container_id().unwrap_or(u32::MAX)) {
            return Err(r.err(at, "the same list appears twice in the file"));
        }
        let mut out = Vec::with_capacity(entries.len());
        for (i, &e) in entries.iter().enumerate() {
            out.push(r.entry(d as u32, e, &format!("{at}[{i}]"))?);
        }
        device_traces.push(out);
    }
    let segments_value = r.required(root, "segments", "top level")?;
    let mut segments = Vec::new();
    for (i, &s) in r.seq(segments_value, "segments")?.iter().enumerate() {
        let at = format!("segments[{i}]");
        if let Some(blocks) = p.get(s, "blocks").and_then(Value::container_id) {
            if !seen_lists.insert(blocks) {
                return Err(r.err(at, "its blocks list is shared with another segment"));
            }
        }
        segments.push(r.segment(s, &at)?);
    }
    let allocator_settings = p
        .get(root, "allocator_settings")
        .map_or(serde_json::Value::Null, |v| p.to_json(v, 16));
    let external_annotations = match p.get(root, "external_annotations") {
        None => Vec::new(),
        Some(v) => match p.to_json(v, 16) {
            serde_json::Value::Array(items) => items,
            _ => return Err(r.wrong("external_annotations", "a list", v)),
        },
    };
    let stream_handles = r.streams.into_iter().map(|(_, h)| h).collect();
    let snapshot = Snapshot {
        segments,
        device_traces,
        allocator_settings,
        external_annotations,
        stream_handles,
    };
    snapshot.validate(file)?;
    Ok(snapshot)
}

fn write_frames(w: &mut PickleWriter, frames: Option<&Frames>) {
    w.list_begin();
    for f in frames.map_or(&[][..], |f| &f[..]) {
        w.dict_begin();
        w.str("name");
        w.str(&f.name);
        w.str("filename");
        w.str(&f.filename);
        w.str("line");
        w.int(f.line.into());
        w.dict_end();
    }
    w.list_end();
}

/// Write a snapshot in PyTorch's layout.
pub(super) fn export(s: &Snapshot) -> Vec<u8> {
    let handle = |device: u32, stream: u32| -> i128 {
        if stream == u32::MAX {
            return 0; // `snapshot` and `oom` entries belong to no stream
        }
        s.stream_handles
            .get(device as usize)
            .and_then(|h| h.get(stream as usize))
            .map_or(stream.into(), |&raw| raw.into())
    };
    let mut w = PickleWriter::new();
    w.dict_begin();

    w.str("segments");
    w.list_begin();
    for seg in &s.segments {
        w.dict_begin();
        w.str("device");
        w.int(seg.device.into());
        w.str("address");
        w.int(seg.address.into());
        w.str("total_size");
        w.int(seg.total_size.into());
        w.str("allocated_size");
        w.int(seg.allocated_size.into());
        w.str("active_size");
        w.int(seg.active_size.into());
        w.str("requested_size");
        w.int(seg.requested_size.into());
        w.str("stream");
        w.int(handle(seg.device, seg.stream));
        w.str("segment_type");
        w.str(match seg.segment_type {
            PoolKind::Small => "small",
            PoolKind::Large => "large",
        });
        w.str("segment_pool_id");
        w.int_pair(seg.segment_pool_id.0.into(), seg.segment_pool_id.1.into());
        w.str("is_expandable");
        w.bool(seg.is_expandable);
        // accelrt's addition: holes of an expandable segment with no memory behind them
        // (PyTorch's visualiser ignores keys it does not know).
        if seg.is_expandable {
            w.str("unmapped");
            w.list_begin();
            for &(addr, len) in &seg.unmapped {
                w.int_pair(addr.into(), len.into());
            }
            w.list_end();
        }
        w.str("frames");
        // PyTorch: the frames of the allocation that made the segment; the first block's
        // allocation is the closest accelrt keeps.
        write_frames(&mut w, seg.blocks.first().and_then(|b| b.frames.as_ref()));
        w.str("blocks");
        w.list_begin();
        for b in &seg.blocks {
            w.dict_begin();
            w.str("address");
            w.int(b.address.into());
            w.str("size");
            w.int(b.size.into());
            w.str("requested_size");
            w.int(b.requested_size.into());
            w.str("state");
            w.str(b.state.name());
            w.str("frames");
            write_frames(&mut w, b.frames.as_ref());
            w.dict_end();
        }
        w.list_end();
        w.dict_end();
    }
    w.list_end();

    w.str("device_traces");
    w.list_begin();
    for (d, entries) in s.device_traces.iter().enumerate() {
        w.list_begin();
        for e in entries {
            w.dict_begin();
            w.str("action");
            w.str(e.action.name());
            w.str(if e.action == TraceAction::Oom {
                "device_free"
            } else {
                "addr"
            });
            w.int(e.addr.into());
            w.str("size");
            w.int(e.size.into());
            w.str("stream");
            w.int(handle(d as u32, e.stream));
            w.str("time_us");
            w.int(e.time_us.into());
            w.str("frames");
            write_frames(&mut w, e.frames.as_ref());
            w.str("compile_context");
            w.str("N/A");
            w.str("user_metadata");
            w.str("");
            w.dict_end();
        }
        w.list_end();
    }
    w.list_end();

    w.str("allocator_settings");
    match &s.allocator_settings {
        serde_json::Value::Null => {
            w.dict_begin();
            w.dict_end();
        }
        other => w.json(other),
    }
    w.str("external_annotations");
    w.list_begin();
    for a in &s.external_annotations {
        w.json(a);
    }
    w.list_end();

    w.dict_end();
    w.finish()
}
