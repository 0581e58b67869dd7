//! The trace recorder: every allocation, free and `record_stream` PyTorch makes through the
//! library, written as an allocator trace in format v2 (`traces/FORMAT.md`), with the CPU
//! time of each call and completion markers observed from accelrt's pooled events.
//!
//! Format v2, as written here:
//!
//! ```text
//! #accelrt-trace v2
//! #! workload=NAME            (then recorded_on, recorded_with, allocator, conf,
//! #! real_peak_reserved=N      real_peak_allocated, time_unit=us)
//! a ID BYTES STREAM T         allocate
//! f ID T                      free requested
//! u ID STREAM T               record_stream
//! c ID T                      completion: all work queued before the free of ID, on every
//!                             stream that used it, had completed by T (T >= the free's T)
//! ```
//!
//! Streams are small integers in order of appearance (0 = the default stream); T is in
//! microseconds since the recording started (monotonic clock), never going backwards in the
//! file. On each free, a pooled event is recorded on every stream the block was used on and
//! queued; at each later call the oldest queued frees are polled (non-blocking) and a marker
//! is written for each one found complete, with the time it was observed. At stop (or process
//! exit) the device is synchronized and the remaining markers written. Events go to a
//! buffered temporary file next to the output; the header (which carries the run's real peaks)
//! is written first when the file is finished. Memory stays bounded by the live set and the
//! queue of frees whose work has not completed.
//!
//! While a route to a private pool is in force (a graph may be capturing), no event is
//! recorded or queried (either would break a capture): those frees get their markers from
//! events recorded at the next call made without a route.

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, CStr};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use accelrt::{Backend, EventId, Stream};
use parking_lot::Mutex;

use crate::errors::Failure;
use crate::state::{state, State};
use crate::status;

/// Whether a recording is in progress (one relaxed load on every call while not).
static ON: AtomicBool = AtomicBool::new(false);
static RECORDER: Mutex<Option<Recorder>> = Mutex::new(None);

/// Frees polled at most per call (the rest wait for later calls).
const POLL_LIMIT: usize = 64;

/// A block the recorder knows: its id, device, and the streams that used it (the
/// allocation's first).
struct Live {
    id: u64,
    device: u32,
    streams: Vec<(Stream, u32)>,
}

/// A free whose completion has not been observed yet.
struct Queued {
    id: u64,
    device: u32,
    streams: Vec<Stream>,
    /// Events recorded on `streams` (empty while deferred).
    events: Vec<EventId>,
}

/// What a recording knows besides the file.
pub struct Recorder {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    start: Instant,
    last_t: u64,
    workload: String,
    next_id: u64,
    live: HashMap<usize, Live>,
    /// Native stream handle -> trace stream number.
    streams: HashMap<(u32, usize), u32>,
    queue: VecDeque<Queued>,
    /// Frees made while a route to a private pool was in force (no event recorded yet).
    deferred: Vec<Queued>,
    devices: Vec<u32>,
    error: Option<String>,
}

impl Recorder {
    fn create(path: &Path, workload: &str) -> Result<Recorder, Failure> {
        let tmp = path.with_extension(format!(
            "{}events.tmp",
            path.extension()
                .map(|e| format!("{}.", e.to_string_lossy()))
                .unwrap_or_default()
        ));
        let file = File::create(&tmp).map_err(|e| {
            format!(
                "cannot record a trace: cannot create {}: {e} (is the folder writable?)",
                tmp.display()
            )
        })?;
        Ok(Recorder {
            path: path.to_path_buf(),
            tmp,
            out: BufWriter::with_capacity(1 << 20, file),
            start: Instant::now(),
            last_t: 0,
            workload: sanitize(workload),
            next_id: 0,
            live: HashMap::new(),
            streams: HashMap::new(),
            queue: VecDeque::new(),
            deferred: Vec::new(),
            devices: Vec::new(),
            error: None,
        })
    }

    /// Microseconds since the start, never less than the last time written.
    fn now(&mut self) -> u64 {
        let t = (self.start.elapsed().as_micros() as u64).max(self.last_t);
        self.last_t = t;
        t
    }

    fn stream_number(&mut self, device: u32, handle: usize) -> u32 {
        if handle == 0 {
            return 0;
        }
        let next = self.streams.len() as u32 + 1;
        *self.streams.entry((device, handle)).or_insert(next)
    }

    fn line(&mut self, args: std::fmt::Arguments) {
        if self.error.is_none() {
            if let Err(e) = self.out.write_fmt(args) {
                self.error = Some(format!("writing {}: {e}", self.tmp.display()));
            }
        }
    }

    /// Turn deferred frees into queued ones (events recorded now, after the free in stream
    /// order), then write markers for the oldest queued frees whose events completed.
    fn poll(&mut self, backend: &dyn Backend) {
        for mut q in std::mem::take(&mut self.deferred) {
            q.events = record_events(backend, q.device, &q.streams);
            self.queue.push_back(q);
        }
        for _ in 0..POLL_LIMIT {
            let Some(head) = self.queue.front() else {
                break;
            };
            let done = head
                .events
                .iter()
                .all(|&e| backend.event_query(e).unwrap_or(true));
            if !done {
                break;
            }
            let q = self.queue.pop_front().expect("checked above");
            release(backend, &q.events);
            let t = self.now();
            self.line(format_args!("c {} {t}\n", q.id));
        }
    }
}

/// Replace what would break a header line.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// One pooled event recorded on each stream (none for a stream that refuses: its frees then
/// complete at the next poll, the conservative direction is lost only for a broken stream).
fn record_events(backend: &dyn Backend, device: u32, streams: &[Stream]) -> Vec<EventId> {
    let mut events = Vec::with_capacity(streams.len());
    for &s in streams {
        if let Ok(e) = backend.event_acquire(device, false) {
            if backend.event_record(e, s).is_ok() {
                events.push(e);
            } else {
                let _ = backend.event_release(e);
            }
        }
    }
    events
}

fn release(backend: &dyn Backend, events: &[EventId]) {
    for &e in events {
        let _ = backend.event_release(e);
    }
}

/// Whether a recording is in progress.
#[inline]
pub(crate) fn active() -> bool {
    ON.load(Ordering::Relaxed)
}

/// An allocation of `size` bytes at `ptr` on `stream` (native handle `handle`).
#[cold]
pub(crate) fn on_alloc(
    st: &State,
    ptr: usize,
    size: usize,
    device: u32,
    handle: usize,
    stream: Stream,
) {
    let mut guard = RECORDER.lock();
    let Some(r) = guard.as_mut() else { return };
    if !st.routes_active() {
        r.poll(st.backend);
    }
    let id = r.next_id;
    r.next_id += 1;
    let number = r.stream_number(device, handle);
    if !r.devices.contains(&device) {
        r.devices.push(device);
    }
    r.live.insert(
        ptr,
        Live {
            id,
            device,
            streams: vec![(stream, number)],
        },
    );
    let t = r.now();
    r.line(format_args!("a {id} {size} {number} {t}\n"));
}

/// A free of `ptr` (that the allocator accepted).
#[cold]
pub(crate) fn on_free(st: &State, ptr: usize) {
    let mut guard = RECORDER.lock();
    let Some(r) = guard.as_mut() else { return };
    let routed = st.routes_active();
    if !routed {
        r.poll(st.backend);
    }
    let Some(live) = r.live.remove(&ptr) else {
        return; // allocated before the recording started
    };
    let t = r.now();
    r.line(format_args!("f {} {t}\n", live.id));
    let streams: Vec<Stream> = live.streams.iter().map(|&(s, _)| s).collect();
    let mut q = Queued {
        id: live.id,
        device: live.device,
        streams,
        events: Vec::new(),
    };
    if routed {
        r.deferred.push(q);
    } else {
        q.events = record_events(st.backend, q.device, &q.streams);
        r.queue.push_back(q);
    }
}

/// `record_stream(ptr, stream)`.
#[cold]
pub(crate) fn on_record_stream(st: &State, ptr: usize, device: u32, handle: usize, stream: Stream) {
    let mut guard = RECORDER.lock();
    let Some(r) = guard.as_mut() else { return };
    if !st.routes_active() {
        r.poll(st.backend);
    }
    let number = r.stream_number(device, handle);
    let Some(live) = r.live.get_mut(&ptr) else {
        return;
    };
    if !live.streams.iter().any(|&(s, _)| s == stream) {
        live.streams.push((stream, number));
    }
    let id = live.id;
    let t = r.now();
    r.line(format_args!("u {id} {number} {t}\n"));
}

/// Start recording to `path` (gzip when it ends in `.gz`).
pub fn start(path: &Path, workload: &str) -> Result<(), Failure> {
    let st = state()?;
    let mut guard = RECORDER.lock();
    if let Some(r) = guard.as_ref() {
        return Err(format!(
            "already recording a trace to {}: stop it first",
            r.path.display()
        )
        .into());
    }
    *guard = Some(Recorder::create(path, workload)?);
    ON.store(true, Ordering::Relaxed);
    drop(guard);
    register_exit_hook();
    let _ = st;
    Ok(())
}

/// Finish the recording: synchronize, write the remaining markers, write the file (header
/// first). Returns the path written; an error when nothing was recording.
pub fn stop() -> Result<PathBuf, Failure> {
    let st = state()?;
    let mut guard = RECORDER.lock();
    let mut r = guard.take().ok_or("no trace is being recorded")?;
    ON.store(false, Ordering::Relaxed);
    for &d in &r.devices {
        let _ = st.backend.device_synchronize(d);
    }
    for mut q in std::mem::take(&mut r.deferred) {
        q.events.clear();
        r.queue.push_back(q);
    }
    while let Some(q) = r.queue.pop_front() {
        for &e in &q.events {
            let _ = st.backend.event_synchronize(e);
        }
        release(st.backend, &q.events);
        let t = r.now();
        r.line(format_args!("c {} {t}\n", q.id));
    }
    drop(guard);
    finish(st, r)
}

fn header(st: &State, r: &Recorder) -> String {
    let (mut reserved, mut allocated) = (0u64, 0u64);
    let mut conf = String::new();
    let mut on = Vec::new();
    for &d in &r.devices {
        if let Some(a) = st.existing_allocator(d) {
            let s = a.stats();
            reserved += s.reserved_bytes_peak.max(s.all().reserved_bytes.peak);
            allocated += s.all().allocated_bytes.peak;
            conf = a.config().to_conf_string();
        }
        if let Ok(p) = st.backend.device_properties(d) {
            on.push(p.name);
        }
    }
    if on.is_empty() {
        on.push(st.kind.to_string());
    }
    format!(
        "#accelrt-trace v2\n#! workload={}\n#! recorded_on={}\n#! recorded_with=accelrt-torch {}\n\
         #! allocator=accelrt\n#! conf={}\n#! real_peak_reserved={reserved}\n\
         #! real_peak_allocated={allocated}\n#! time_unit=us\n#! markers=all\n",
        r.workload,
        sanitize(&on.join(", ")),
        env!("CARGO_PKG_VERSION"),
        sanitize(&conf),
    )
}

fn finish(st: &State, mut r: Recorder) -> Result<PathBuf, Failure> {
    let head = header(st, &r);
    if let Err(e) = r.out.flush() {
        r.error
            .get_or_insert(format!("writing {}: {e}", r.tmp.display()));
    }
    if let Some(e) = r.error.take() {
        let _ = std::fs::remove_file(&r.tmp);
        return Err(format!("the trace {} is incomplete: {e}", r.path.display()).into());
    }
    let result = write_final(&r.path, &r.tmp, head.as_bytes());
    let _ = std::fs::remove_file(&r.tmp);
    result
        .map(|()| r.path.clone())
        .map_err(|e| format!("cannot write the trace {}: {e}", r.path.display()).into())
}

/// `header` then the events of `tmp`, into `path` (gzip when it ends in `.gz`), streamed.
fn write_final(path: &Path, tmp: &Path, header: &[u8]) -> std::io::Result<()> {
    let mut events = File::open(tmp)?;
    let file = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let gz = path.extension().is_some_and(|e| e == "gz");
    let mut out: Box<dyn Write> = if gz {
        Box::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::default(),
        ))
    } else {
        Box::new(file)
    };
    out.write_all(header)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = events.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    drop(out);
    Ok(())
}

fn stop_at_exit() {
    if active() {
        if let Err(f) = stop() {
            eprintln!("accelrt_torch: finishing the trace at exit: {}", f.message);
        }
    }
}

fn register_exit_hook() {
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    if !REGISTERED.swap(true, Ordering::Relaxed) {
        // SAFETY: `stop_at_exit_guarded` is a plain `extern "C" fn()` that lets nothing unwind
        // out of it (`stop` returns errors; panics are caught).
        unsafe { libc::atexit(stop_at_exit_guarded) };
    }
}

extern "C" fn stop_at_exit_guarded() {
    let _ = std::panic::catch_unwind(stop_at_exit);
}

// ---- C ABI ----------------------------------------------------------------------------------

/// Start recording a v2 trace to `path` (gzip when it ends in `.gz`); `workload` names it in
/// the header (NULL: the file's name). 0, or -1 (already recording, path not writable).
///
/// # Safety
/// `path` must be a NUL-terminated string; `workload` NULL or one.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_record_trace_start(
    path: *const c_char,
    workload: *const c_char,
) -> c_int {
    status("accelrt_torch_record_trace_start", || {
        if path.is_null() {
            return Err("path is NULL: pass the trace file to write".into());
        }
        // SAFETY: NUL-terminated (this function's contract).
        let path = unsafe { CStr::from_ptr(path) }
            .to_string_lossy()
            .into_owned();
        let workload = if workload.is_null() {
            Path::new(&path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            // SAFETY: NUL-terminated (this function's contract).
            unsafe { CStr::from_ptr(workload) }
                .to_string_lossy()
                .into_owned()
        };
        start(Path::new(&path), &workload)
    })
}

/// Finish the recording (synchronize, write the remaining markers, write the file). 0, or
/// -1 (nothing recording, the file could not be written).
#[no_mangle]
pub extern "C" fn accelrt_torch_record_trace_stop() -> c_int {
    status("accelrt_torch_record_trace_stop", || stop().map(|_| ()))
}

/// 1 while a trace is being recorded, else 0.
#[no_mangle]
pub extern "C" fn accelrt_torch_record_trace_active() -> c_int {
    c_int::from(active())
}
