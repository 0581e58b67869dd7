//! The picture: one self-contained HTML page (inline CSS, JavaScript and canvas; nothing
//! fetched) with memory over time and the segment map at the peak.
//!
//! The data is computed here, in Rust, and embedded compactly: the history is cut into at
//! most [`HtmlOptions::columns`] columns, each keeping its **maximum** (so peaks survive
//! downsampling); the largest allocations (up to [`HtmlOptions::bands`]) are drawn as
//! stacked bands coloured by where they were allocated, the rest as one grey area; the
//! segment map lists each segment's ranges at the moment of peak allocated memory.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use serde_json::json;

use super::timeline::{RangeState, Timeline};
use super::Snapshot;
use crate::error::{FormatError, Result};
use accelrt_alloc::{format_size, Frame, TraceAction};

/// What to draw.
#[derive(Debug, Clone)]
pub struct HtmlOptions {
    /// Page title (e.g. the trace name).
    pub title: String,
    /// Lines shown under the title (configuration, source file, ...).
    pub subtitle: Vec<String>,
    /// Device to draw; `None`: the first device with history or segments.
    pub device: Option<u32>,
    /// Most time columns (the history is downsampled to this many, keeping maxima).
    pub columns: usize,
    /// Most allocations drawn as their own band.
    pub bands: usize,
}

impl Default for HtmlOptions {
    fn default() -> Self {
        HtmlOptions {
            title: "memory snapshot".into(),
            subtitle: Vec::new(),
            device: None,
            columns: 1000,
            bands: 400,
        }
    }
}

/// Render `snapshot` as one HTML page. Errors when `opts.device` names a device the
/// snapshot does not describe.
pub fn render_html(snapshot: &Snapshot, opts: &HtmlOptions) -> Result<String> {
    let devices = snapshot.devices();
    let device = match opts.device {
        Some(d) if devices.contains(&d) || (devices.is_empty() && d == 0) => d,
        Some(d) => {
            return Err(FormatError::InvalidArgument(format!(
                "device {d} is not in the snapshot (devices with history or segments: {devices:?})"
            )))
        }
        None => devices.first().copied().unwrap_or(0),
    };
    let data = build_data(snapshot, device, opts);
    // `<` is escaped so no string in the data can close the script element.
    let data = data.to_string().replace('<', "\\u003c");
    let mut page = String::with_capacity(TEMPLATE.len() + data.len() + 256);
    let title = escape_html(&opts.title);
    for (i, part) in TEMPLATE.split("@@").enumerate() {
        match (i % 2, part) {
            (0, text) => page.push_str(text),
            (_, "TITLE") => page.push_str(&title),
            (_, "DATA") => page.push_str(&data),
            (_, other) => {
                let _ = write!(page, "@@{other}@@");
            }
        }
    }
    Ok(page)
}

fn escape_html(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '&' => "&amp;".to_string(),
            '"' => "&quot;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// A frame a person would recognise: Python source outside the framework.
fn is_user_frame(f: &Frame) -> bool {
    f.filename.ends_with(".py")
        && !f.filename.contains("site-packages")
        && !f.filename.contains("/torch/")
}

fn frame_text(f: &Frame) -> String {
    if f.line > 0 {
        format!("{} ({}:{})", f.name, f.filename, f.line)
    } else if f.filename.is_empty() || f.filename == "??" {
        f.name.clone()
    } else {
        format!("{} ({})", f.name, f.filename)
    }
}

/// A short label (where it was allocated) and a stack excerpt for a lifetime's frames.
fn describe(frames: Option<&[Frame]>) -> (String, String) {
    let Some(frames) = frames.filter(|f| !f.is_empty()) else {
        return (String::new(), String::new());
    };
    let user: Vec<&Frame> = frames.iter().filter(|f| is_user_frame(f)).collect();
    let python: Vec<&Frame> = frames
        .iter()
        .filter(|f| f.filename.ends_with(".py"))
        .collect();
    let shown: Vec<&Frame> = if !python.is_empty() {
        python.into_iter().take(8).collect()
    } else {
        frames.iter().take(8).collect()
    };
    let label_frame = user.first().copied().unwrap_or(shown[0]);
    let label = frame_text(label_frame);
    let stack = shown
        .iter()
        .map(|f| frame_text(f))
        .collect::<Vec<_>>()
        .join("\n");
    (label, stack)
}

fn build_data(snapshot: &Snapshot, device: u32, opts: &HtmlOptions) -> serde_json::Value {
    let tl = Timeline::build(snapshot, device);
    let n = tl.len();
    let columns = opts.columns.max(1).min(n.max(1));

    // Columns: maximum allocated and reserved, and the entry of the allocated maximum.
    let mut col_alloc = Vec::with_capacity(columns);
    let mut col_res = Vec::with_capacity(columns);
    let mut samples = Vec::with_capacity(columns);
    if n > 0 {
        for j in 0..columns {
            let (lo, hi) = (
                j * n / columns,
                ((j + 1) * n / columns).max(j * n / columns + 1),
            );
            let mut best = lo;
            for i in lo..hi.min(n) {
                if tl.allocated[i] > tl.allocated[best] {
                    best = i;
                }
            }
            col_alloc.push(tl.allocated[best]);
            col_res.push(
                tl.reserved[lo..hi.min(n)]
                    .iter()
                    .copied()
                    .max()
                    .unwrap_or(0),
            );
            samples.push(best);
        }
    }

    // Bands: the largest lifetimes visible at some sample, stacked in allocation order.
    let visible = |start: Option<usize>, end: Option<usize>| -> Option<(usize, usize)> {
        let lo = start.map_or(0, |s| samples.partition_point(|&x| x < s));
        let hi = end.map_or(samples.len(), |e| samples.partition_point(|&x| x < e));
        (lo < hi).then_some((lo, hi))
    };
    let floor = tl.peak_allocated.allocated / 2000;
    let mut by_size: Vec<usize> = (0..tl.lifetimes.len())
        .filter(|&i| tl.lifetimes[i].size > floor)
        .collect();
    by_size.sort_by(|&a, &b| tl.lifetimes[b].size.cmp(&tl.lifetimes[a].size));
    let mut chosen: Vec<(usize, usize, usize)> = Vec::new(); // (lifetime, lo, hi)
    for i in by_size {
        if chosen.len() >= opts.bands {
            break;
        }
        let l = &tl.lifetimes[i];
        if let Some((lo, hi)) = visible(l.start, l.end) {
            chosen.push((i, lo, hi));
        }
    }
    chosen.sort_unstable();

    // Labels and stacks, deduplicated.
    let mut labels: Vec<String> = Vec::new();
    let mut label_ids: HashMap<String, usize> = HashMap::new();
    let mut stacks: Vec<String> = Vec::new();
    let mut stack_ids: HashMap<String, usize> = HashMap::new();
    let intern = |table: &mut Vec<String>, ids: &mut HashMap<String, usize>, s: String| {
        *ids.entry(s.clone()).or_insert_with(|| {
            table.push(s);
            table.len() - 1
        })
    };
    let mut band_of: HashMap<usize, usize> = HashMap::new();
    let mut bands = Vec::with_capacity(chosen.len());
    for (b, &(i, lo, hi)) in chosen.iter().enumerate() {
        let l = &tl.lifetimes[i];
        let (label, stack) = describe(l.frames.as_deref());
        let label = if label.is_empty() {
            format!("{} allocation", format_size(l.size))
        } else {
            label
        };
        let li = intern(&mut labels, &mut label_ids, label);
        let si = intern(&mut stacks, &mut stack_ids, stack);
        band_of.insert(i, b);
        bands.push((
            lo,
            hi,
            l.size,
            li,
            si,
            l.start,
            l.end,
            Vec::<(usize, u64)>::new(),
        ));
    }

    // Offsets per column, recorded where they change.
    let mut starts: Vec<Vec<usize>> = vec![Vec::new(); samples.len() + 1];
    let mut ends: Vec<Vec<usize>> = vec![Vec::new(); samples.len() + 1];
    for (b, band) in bands.iter().enumerate() {
        starts[band.0].push(b);
        ends[band.1].push(b);
    }
    let mut active: BTreeSet<usize> = BTreeSet::new();
    let mut small = Vec::with_capacity(samples.len());
    let mut last: Vec<Option<u64>> = vec![None; bands.len()];
    for j in 0..samples.len() {
        for &b in &ends[j] {
            active.remove(&b);
        }
        for &b in &starts[j] {
            active.insert(b);
        }
        // Saturating: sizes come from the file (a snapshot built in code is not validated).
        let big: u64 = active
            .iter()
            .fold(0u64, |sum, &b| sum.saturating_add(bands[b].2));
        let base = col_alloc[j].saturating_sub(big);
        small.push(base);
        let mut offset = base;
        for &b in &active {
            if last[b] != Some(offset) {
                bands[b].7.push((j, offset));
                last[b] = Some(offset);
            }
            offset = offset.saturating_add(bands[b].2);
        }
    }

    // The segment map at peak allocated.
    // The map moment: peak allocated, after the segment entries that directly follow it
    // (an allocator may record the memory it maps for an allocation after the allocation).
    let entries = snapshot
        .device_traces
        .get(device as usize)
        .map_or(&[][..], Vec::as_slice);
    let peak_event = (n > 0).then(|| {
        let mut e = tl.peak_allocated.event;
        while entries.get(e + 1).is_some_and(|x| {
            matches!(
                x.action,
                TraceAction::SegmentMap | TraceAction::SegmentAlloc
            )
        }) {
            e += 1;
        }
        e
    });
    let state = tl.state_at(snapshot, peak_event);
    let mut cached_total = 0u64;
    let mut largest_cached = 0u64;
    let mut unmapped_total = 0u64;
    let segments: Vec<serde_json::Value> = state
        .segments
        .iter()
        .map(|s| {
            let ranges: Vec<serde_json::Value> = s
                .ranges
                .iter()
                .map(|&(a, size, st)| {
                    let off = a - s.address;
                    match st {
                        RangeState::Allocated(i) => {
                            let band = band_of.get(&i).map_or(-1, |&b| b as i64);
                            json!([off, size, 0, band])
                        }
                        RangeState::Cached => {
                            cached_total = cached_total.saturating_add(size);
                            largest_cached = largest_cached.max(size);
                            json!([off, size, 1, -1])
                        }
                        RangeState::Unmapped => {
                            unmapped_total = unmapped_total.saturating_add(size);
                            json!([off, size, 2, -1])
                        }
                    }
                })
                .collect();
            json!({
                "a": format!("{:#x}", s.address),
                "s": s.size,
                "t": s.stream,
                "x": s.expandable,
                "r": ranges,
            })
        })
        .collect();

    let allocs = tl.lifetimes.iter().filter(|l| l.start.is_some()).count();
    json!({
        "title": opts.title,
        "subtitle": opts.subtitle,
        "device": device,
        "events": n,
        "allocs": allocs,
        "initial": [tl.initial.0, tl.initial.1],
        "cols": {
            "n": samples.len(),
            "alloc": col_alloc,
            "res": col_res,
            "small": small,
        },
        "peak_alloc": [tl.peak_allocated.event, tl.peak_allocated.allocated, tl.peak_allocated.reserved],
        "peak_res": [tl.peak_reserved.event, tl.peak_reserved.allocated, tl.peak_reserved.reserved],
        "segment_allocs": tl.segment_allocs,
        "ooms": tl.ooms,
        "labels": labels,
        "stacks": stacks,
        "bands": bands.iter().map(|b| json!([b.0, b.1, b.2, b.3, b.4, b.5, b.6, b.7])).collect::<Vec<_>>(),
        "map": {
            "event": peak_event,
            "allocated": state.at.allocated,
            "reserved": state
                .segments
                .iter()
                .fold(0u64, |sum, s| sum.saturating_add(s.size))
                .saturating_sub(unmapped_total),
            "cached": cached_total,
            "largest_cached": largest_cached,
            "unmapped": unmapped_total,
            "segments": segments,
        },
        "version": env!("CARGO_PKG_VERSION"),
    })
}

const TEMPLATE: &str = include_str!("timeline.html");
