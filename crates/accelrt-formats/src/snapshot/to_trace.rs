//! Snapshots as replayable traces: each device's history as a v2 trace (times, later
//! `free_completed` entries as markers) and the recorded allocator's accelrt configuration.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use crate::error::{FormatError, Result};
use crate::trace::{Header, Markers, TorchPeaks, Trace, TraceOp, MAX_SIZE, MAX_STREAM};
use accelrt_alloc::{TraceAction, TraceEntry};

use super::{Snapshot, SnapshotTrace};

impl Snapshot {
    /// Each device's `alloc` / `free_requested` entries as a replayable [`Trace`] named
    /// `name` (`name:dev1` for devices other than the only one). `source` (the file) names
    /// the trace in replay errors. Devices without allocations are skipped.
    ///
    /// Errors ([`FormatError::Snapshot`], naming the entry): a free of an address no earlier entry
    /// allocated (the history did not start at the beginning of the run), a double free, an
    /// allocation at an address that is still live, more than 4096 streams on a device, no
    /// allocation at all.
    pub fn traces(&self, name: &str, source: &str) -> Result<Vec<SnapshotTrace>> {
        let conf = self
            .allocator_settings
            .get("PYTORCH_CUDA_ALLOC_CONF")
            .and_then(|v| v.as_str())
            .map(|c| if c.is_empty() { "native" } else { c }.to_string());
        let mut out = Vec::new();
        let devices: Vec<usize> = (0..self.device_traces.len())
            .filter(|&d| {
                self.device_traces[d]
                    .iter()
                    .any(|e| e.action == TraceAction::Alloc)
            })
            .collect();
        for &d in &devices {
            let trace_name = if devices.len() == 1 && d == 0 {
                name.to_string()
            } else {
                format!("{name}:dev{d}")
            };
            let mut t = device_trace(
                &self.device_traces[d],
                d,
                &trace_name,
                &format!("{source}[device {d}]"),
                source,
            )?;
            let reserved = self.recorded_peak_reserved(d as u32);
            if t.trace.is_timed() {
                t.trace.header = Header {
                    version: 2,
                    ..self.recorded_header()
                };
            }
            t.trace.torch = Some(TorchPeaks {
                peak_allocated: Some(crate::trace::peak_live_bytes(&t.trace)),
                peak_reserved: reserved,
                conf: conf.clone(),
            });
            out.push(t);
        }
        if out.is_empty() {
            return Err(FormatError::Snapshot {
                file: source.to_string(),
                at: "device_traces".into(),
                message: format!(
                    "no 'alloc' entry on any of {} device(s): nothing to replay. Record the \
                     history before the workload runs: \
                     torch.cuda.memory._record_memory_history(max_entries=100000)",
                    self.device_traces.len()
                ),
            });
        }
        Ok(out)
    }
}

/// Turn one device's history into a trace.
fn device_trace(
    entries: &[TraceEntry],
    device: usize,
    name: &str,
    trace_source: &str,
    file: &str,
) -> Result<SnapshotTrace> {
    let err = |i: usize, message: String| FormatError::Snapshot {
        file: file.to_string(),
        at: format!("device_traces[{device}][{i}]"),
        message,
    };
    // Times relative to the first entry; a history without times (older PyTorch) is untimed.
    let start = entries.first().map_or(0, |e| e.time_us);
    let timed = entries.iter().any(|e| e.time_us != start);
    let rel = |i: usize, e: &TraceEntry| -> Result<u64> {
        e.time_us.checked_sub(start).ok_or_else(|| {
            err(
                i,
                format!(
                    "time_us {} is earlier than the first entry's {start}: entries are in the \
                     order they happened",
                    e.time_us
                ),
            )
        })
    };
    // Live address -> (trace id, entry index); freed address -> its free, until completed.
    let mut live: HashMap<u64, (u64, usize)> = HashMap::new();
    let mut freed: HashMap<u64, Request> = HashMap::new();
    let mut ops = Vec::new();
    let mut lines = Vec::new();
    let mut times = Vec::new();
    let mut frames = Vec::new();
    let mut next_id = 0u64;
    let mut last_time = (0u64, 0usize);
    for (i, e) in entries.iter().enumerate() {
        let time = if timed { rel(i, e)? } else { 0 };
        let call = matches!(e.action, TraceAction::Alloc | TraceAction::FreeRequested);
        if call && time < last_time.0 {
            return Err(err(
                i,
                format!(
                    "time_us goes backwards: {} after {} at entry {}; the allocator's calls are \
                     recorded in the order they happened",
                    e.time_us,
                    last_time.0 + start,
                    last_time.1
                ),
            ));
        }
        match e.action {
            TraceAction::Alloc => {
                if e.size > MAX_SIZE {
                    return Err(err(
                        i,
                        format!("alloc of {} bytes is over 2^48 bytes (256 TiB)", e.size),
                    ));
                }
                if e.stream > MAX_STREAM {
                    return Err(err(
                        i,
                        format!("stream index {} is over {MAX_STREAM}", e.stream),
                    ));
                }
                match live.entry(e.addr) {
                    Entry::Occupied(o) => {
                        return Err(err(
                            i,
                            format!(
                                "alloc at {:#x}, which is still live: entry {} allocated it \
                                 and no free_requested since frees it",
                                e.addr,
                                o.get().1
                            ),
                        ))
                    }
                    Entry::Vacant(v) => {
                        v.insert((next_id, i));
                    }
                }
                freed.remove(&e.addr);
                ops.push(TraceOp::Alloc {
                    id: next_id,
                    size: e.size,
                    stream: e.stream,
                });
                frames.push(e.frames.clone());
                next_id += 1;
            }
            TraceAction::FreeRequested => {
                let Some((id, _)) = live.remove(&e.addr) else {
                    return Err(err(
                        i,
                        match freed.get(&e.addr) {
                            Some(r) => format!(
                                "free_requested of {:#x}, which entry {} already freed \
                                 (double free)",
                                e.addr, r.entry
                            ),
                            None => format!(
                                "free_requested of {:#x}, which no earlier alloc entry \
                                 allocated: the history does not start at the beginning of \
                                 the run (recording started late, or max_entries dropped the \
                                 oldest entries). Record before the workload starts, with \
                                 torch.cuda.memory._record_memory_history(max_entries=N) large \
                                 enough for the whole run",
                                e.addr
                            ),
                        },
                    ));
                };
                freed.insert(
                    e.addr,
                    Request {
                        id,
                        entry: i,
                        time,
                        completed: false,
                    },
                );
                ops.push(TraceOp::Free { id });
                frames.push(None);
            }
            TraceAction::FreeCompleted if timed => {
                // PyTorch (and accelrt) write free_completed as the entry right after
                // free_requested for a block no other stream used (its time may be a few
                // microseconds later: it is read again); only one that comes after other
                // entries (events on other streams had to complete first) says anything
                // about the device.
                let Some(r) = freed.get_mut(&e.addr) else {
                    continue;
                };
                if r.completed {
                    continue;
                }
                r.completed = true;
                if i == r.entry + 1 {
                    continue;
                }
                if time < r.time {
                    return Err(err(
                        i,
                        format!(
                            "free_completed at time_us {} is earlier than its free_requested \
                             (entry {})",
                            e.time_us, r.entry
                        ),
                    ));
                }
                ops.push(TraceOp::Complete { id: r.id });
                frames.push(None);
            }
            _ => continue,
        }
        if call {
            last_time = (time, i);
        }
        lines.push(i as u64 + 1);
        if timed {
            times.push(time);
        }
    }
    Ok(SnapshotTrace {
        device: device as u32,
        trace: Trace {
            name: name.to_string(),
            ops,
            torch: None,
            lines,
            source: trace_source.to_string(),
            header: if timed {
                Header::v2()
            } else {
                Header::default()
            },
            times,
        },
        frames,
    })
}

/// A `free_requested` whose `free_completed` may still come.
struct Request {
    id: u64,
    entry: usize,
    time: u64,
    completed: bool,
}

/// The accelrt configuration equivalent to a PyTorch `PYTORCH_CUDA_ALLOC_CONF` and the
/// allocator's name (`pytorch-native`, `pytorch-expandable`), or `None` for the configuration
/// when the string has options accelrt has no equivalent for (e.g. `backend:cudaMallocAsync`).
///
/// PyTorch's native allocator is accelrt's `expandable_segments:false,release_at_peak:false`,
/// its expandable segments `expandable_segments:true,release_at_peak:false`; the options both
/// share (`max_split_size_mb`, `roundup_power2_divisions`, `garbage_collection_threshold`,
/// `max_non_split_rounding_mb`) carry over, pinned-memory options do not matter.
pub fn pytorch_conf_equivalent(conf: &str) -> (String, Option<String>) {
    let mut expandable = false;
    let mut shared = Vec::new();
    let mut known = true;
    let mut allocator = None;
    let mut depth = 0i32;
    let mut items = Vec::new();
    let mut item = String::new();
    for c in conf.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut item));
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    items.push(item);
    for item in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
        let (key, value) = item.split_once(':').unwrap_or((item, ""));
        let (key, value) = (key.trim(), value.trim());
        match key {
            "expandable_segments" => {
                expandable = matches!(value.to_ascii_lowercase().as_str(), "true" | "1")
            }
            "max_split_size_mb"
            | "roundup_power2_divisions"
            | "garbage_collection_threshold"
            | "max_non_split_rounding_mb" => shared.push(format!("{key}:{value}")),
            "backend" if value == "native" => {}
            "backend" => {
                allocator = Some(format!("pytorch-{value}"));
                known = false;
            }
            k if k.starts_with("pinned_") || k == "release_lock_on_cudamalloc" => {}
            _ => known = false,
        }
    }
    let allocator = allocator.unwrap_or_else(|| {
        if expandable {
            "pytorch-expandable".into()
        } else {
            "pytorch-native".into()
        }
    });
    let mut accelrt = vec![
        format!("expandable_segments:{expandable}"),
        "release_at_peak:false".to_string(),
    ];
    accelrt.extend(shared);
    let accelrt = accelrt.join(",");
    let ok = known && accelrt_alloc::AllocatorConfig::parse(&accelrt).is_ok();
    (allocator, ok.then_some(accelrt))
}

impl Snapshot {
    /// What the snapshot says about the run it was taken of, as a trace header: the allocator
    /// (`accelrt` for accelrt's snapshots, else PyTorch's, from `PYTORCH_CUDA_ALLOC_CONF`),
    /// its accelrt configuration ([`pytorch_conf_equivalent`]), and `markers=cross_stream`
    /// (only later `free_completed` entries become markers). Real peaks are not derived: a
    /// snapshot's segment entries are not the run's `max_memory_reserved()`.
    pub fn recorded_header(&self) -> Header {
        let settings = &self.allocator_settings;
        let conf = settings
            .get("PYTORCH_CUDA_ALLOC_CONF")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let (allocator, conf) =
            if settings.get("allocator").and_then(|v| v.as_str()) == Some("accelrt") {
                ("accelrt".to_string(), Some(conf.to_string()))
            } else {
                pytorch_conf_equivalent(conf)
            };
        Header {
            version: 2,
            allocator: Some(allocator),
            conf,
            markers: Markers::CrossStream,
            ..Header::default()
        }
    }
}
