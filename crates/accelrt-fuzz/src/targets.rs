//! The targets: one per input surface. See [`ALL`].

use std::ffi::{c_int, c_void, CStr};
use std::io::{Read, Write};
use std::ptr::null_mut;
use std::sync::Arc;
use std::time::Duration;

use accelrt::alloc::{AllocatorConfig, CachingAllocator};
use accelrt::backend::host::HostMemory;
use accelrt::snapshot::{self, HtmlOptions, Snapshot};
use accelrt::trace::{self, ReplayOptions};
use accelrt::{Device, DeviceType, Stream};

use crate::{repo_root, Outcome, Target};

/// Every target, in the order reports list them.
pub const ALL: &[Target] = &[
    TRACE_TEXT,
    TRACE_GZIP,
    SNAPSHOT_PICKLE,
    SNAPSHOT_JSON,
    CONFIG,
    CLI,
    CABI,
    CABI_THREADS,
];

/// A target by name.
pub fn by_name(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}

const DEV: Device = Device {
    kind: DeviceType::Host,
    index: 0,
};

/// The first `lines` lines of a shipped gzip trace, as text.
fn shipped_head(file: &str, lines: usize) -> Vec<u8> {
    let path = repo_root().join("traces").join(file);
    let Ok(f) = std::fs::File::open(&path) else {
        return Vec::new();
    };
    let mut text = String::new();
    let _ = flate2::read::GzDecoder::new(f)
        .take(1 << 20)
        .read_to_string(&mut text);
    let mut out: String = text.lines().take(lines).collect::<Vec<_>>().join("\n");
    out.push('\n');
    out.into_bytes()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("writing to a Vec");
    e.finish().expect("writing to a Vec")
}

fn first_chars(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

// ---- traces ---------------------------------------------------------------------------------

fn trace_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = [
        "gpt2_train.trace.gz",
        "resnet50_train.trace.gz",
        "bert_varlen.trace.gz",
        "gpt2_generate.trace.gz",
    ]
    .iter()
    .map(|f| shipped_head(f, 300))
    .filter(|s| s.len() > 1)
    .collect();
    seeds.extend(
        [
            "a 0 1 0\nf 0\n",
            "# accelrt trace v1\n#torch peak_allocated=1024 peak_reserved=2097152 conf=\na 0 512 0\na 1 1048577 1\nf 0\nf 1\n",
            "a 0 281474976710656 0\n",
            "a 0 1 0\na 0 1 0\n",
            "f 7\n",
            "a 0 4096 4095\nf 0\n",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec()),
    );
    seeds
}

/// Parse, and replay what parses (small traces only: the replay engine is the replay
/// engineer's; the point here is that hostile traces are errors, never panics).
fn parse_and_replay(bytes: &[u8]) -> Outcome {
    let trace = match trace::parse_bytes("fuzz.trace", bytes) {
        Ok(t) => t,
        Err(e) => {
            let text = e.to_string();
            if !text.contains("fuzz.trace") {
                return Err(format!("a trace error does not name the file: {text}"));
            }
            return Ok(format!("parse error: {text}"));
        }
    };
    if trace.ops.len() > 2000 {
        return Ok("parsed (large)".into());
    }
    let conf = if bytes.len() % 2 == 0 {
        ""
    } else {
        "expandable_segments:false"
    };
    let opts = ReplayOptions {
        config: AllocatorConfig::parse(conf).expect("a valid configuration"),
        capacity: Some(256 << 20),
        ..ReplayOptions::default()
    };
    let outcome = trace::replay(&trace, &opts);
    Ok(match outcome.error {
        // Shape of what replayed: the feedback for growing varied traces.
        None => format!(
            "replayed 2^{} ops, {} stream(s), torch line {}, {conf}",
            usize::BITS - trace.ops.len().leading_zeros(),
            trace.stream_count().min(9),
            trace.torch.is_some()
        ),
        Some(e) => format!("replay error: {e}"),
    })
}

/// Trace text: `accelrt replay FILE` on a plain trace.
pub const TRACE_TEXT: Target = Target {
    name: "trace_text",
    about: "trace text (v1 format): parse, then replay what parses",
    seeds: trace_seeds,
    run: parse_and_replay,
    max_len: 64 << 10,
    dictionary: &[
        b"a ",
        b"f ",
        b"\n",
        b"#torch ",
        b"peak_allocated=",
        b"peak_reserved=",
        b"conf=",
        b" ",
        b"\t",
        b"\r\n",
        b"#",
        b"-",
        b"+",
    ],
    case_timeout: Duration::from_secs(20),
};

fn gzip_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = trace_seeds().iter().map(|s| gzip(s)).collect();
    // A gzip bomb in miniature: 1 MiB of one repeated event compresses to a few KiB.
    seeds.push(gzip(&b"a 0 1 0\nf 0\n".repeat(90_000)));
    // A bomb of zeros.
    seeds.push(gzip(&vec![0u8; 1 << 20]));
    // Two gzip members back to back.
    let mut two = gzip(b"a 0 1 0\n");
    two.extend(gzip(b"f 0\n"));
    seeds.push(two);
    seeds
}

/// Gzip traces: the same, through the decompressor.
pub const TRACE_GZIP: Target = Target {
    name: "trace_gzip",
    about: "gzip-compressed traces (bombs, corrupt members, truncation): parse, then replay",
    seeds: gzip_seeds,
    run: parse_and_replay,
    max_len: 64 << 10,
    dictionary: &[
        b"\x1f\x8b\x08\x00",
        b"\x00\x00\x00\x00",
        b"\xff\xff\xff\xff",
    ],
    case_timeout: Duration::from_secs(20),
};

// ---- snapshots ------------------------------------------------------------------------------

/// A small real snapshot: the shipped one cut to its first entries and segments.
fn small_real_snapshot() -> Option<Snapshot> {
    let path = repo_root().join("traces/mlp_train.snapshot.pickle");
    let mut snap = snapshot::load(path).ok()?;
    for t in &mut snap.device_traces {
        t.truncate(40);
    }
    snap.segments.truncate(4);
    Some(snap)
}

/// A snapshot accelrt records itself, with expandable segments (segment_map entries).
fn recorded_snapshot() -> Option<Snapshot> {
    let t = trace::parse_bytes(
        "seed",
        b"a 0 1048576 0\na 1 512 0\na 2 3145728 1\nf 1\nf 0\na 3 2048 0\n",
    )
    .ok()?;
    let opts = ReplayOptions {
        config: AllocatorConfig::default(),
        capacity: Some(64 << 20),
        ..ReplayOptions::default()
    };
    snapshot::replay_recorded(&t, None, &opts, &mut |_| {})
        .ok()
        .map(|r| r.snapshot)
}

fn snapshot_seeds(json: bool) -> Vec<Vec<u8>> {
    let snaps: Vec<Snapshot> = [small_real_snapshot(), recorded_snapshot()]
        .into_iter()
        .flatten()
        .collect();
    let mut seeds: Vec<Vec<u8>> = snaps
        .iter()
        .map(|s| {
            if json {
                s.to_json().into_bytes()
            } else {
                s.to_pickle()
            }
        })
        .collect();
    if !json {
        // Code-running pickles: refused.
        seeds.push(b"\x80\x04cos\nsystem\n\x8c\x02id\x85R.".to_vec());
        seeds.push(b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x02id\x85R.".to_vec());
        // Deep nesting.
        let mut deep = b"\x80\x04".to_vec();
        deep.extend(std::iter::repeat_n(b"](".as_slice(), 600).flatten());
        deep.push(b'.');
        seeds.push(deep);
        let path = repo_root().join("traces/mlp_train.snapshot.pickle");
        if let Ok(full) = std::fs::read(path) {
            seeds.push(full[..full.len().min(6000)].to_vec()); // truncated
        }
    }
    seeds
}

/// What must hold for any snapshot input: an error names the file; a snapshot that reads
/// renders, yields traces or a reason, and what accelrt writes of it reads back.
fn check_snapshot(bytes: &[u8]) -> Outcome {
    let snap = match snapshot::parse_bytes("fuzz.snapshot", bytes) {
        Ok(s) => s,
        Err(e) => {
            let text = e.to_string();
            if !text.contains("fuzz.snapshot") {
                return Err(format!("a snapshot error does not name the file: {text}"));
            }
            if text.contains("Failed(") || text.contains("Some(") {
                return Err(format!("debug formatting in a message: {text}"));
            }
            return Ok(format!("read error: {text}"));
        }
    };
    let entries: usize = snap.device_traces.iter().map(Vec::len).sum();
    let traces = match snap.traces("fuzz", "fuzz.snapshot") {
        Ok(t) => format!("{} trace(s)", t.len()),
        Err(e) => format!("no traces: {e}"),
    };
    if entries <= 20_000 {
        for device in snap.devices().into_iter().take(2) {
            let opts = HtmlOptions {
                device: Some(device),
                columns: 200,
                ..HtmlOptions::default()
            };
            snapshot::render_html(&snap, &opts)
                .map_err(|e| format!("rendering a readable snapshot failed: {e}"))?;
        }
    }
    let pickle = snap.to_pickle();
    let back = Snapshot::from_pickle("written.pickle", &pickle)
        .map_err(|e| format!("accelrt's own pickle does not read back: {e}"))?;
    if back.device_traces.len() != snap.device_traces.len()
        || back.segments.len() != snap.segments.len()
    {
        return Err("accelrt's own pickle reads back with other contents".into());
    }
    let json = snap.to_json();
    Snapshot::from_json("written.json", json.as_bytes())
        .map_err(|e| format!("accelrt's own JSON does not read back: {e}"))?;
    Ok(format!(
        "read: {traces}, {} device(s), {} segment(s), 2^{} entries",
        snap.device_traces.len().min(9),
        snap.segments.len().min(9),
        usize::BITS - entries.leading_zeros()
    ))
}

/// Snapshot pickles: `accelrt replay|snapshot render|snapshot convert` on a pickle.
pub const SNAPSHOT_PICKLE: Target = Target {
    name: "snapshot_pickle",
    about: "PyTorch snapshot pickles: read, render, import as traces, write and read back",
    seeds: || snapshot_seeds(false),
    run: check_snapshot,
    max_len: 256 << 10,
    dictionary: &[
        b"(",
        b".",
        b"0",
        b"1",
        b"2",
        b"N",
        b"J",
        b"K",
        b"M",
        b"X",
        b"a",
        b"d",
        b"}",
        b"e",
        b"h",
        b"j",
        b"l",
        b"]",
        b"q",
        b"r",
        b"s",
        b"t",
        b")",
        b"u",
        b"\x85",
        b"\x86",
        b"\x87",
        b"\x88",
        b"\x89",
        b"\x8a",
        b"\x8c",
        b"\x8d",
        b"\x94",
        b"\x95",
        b"c",
        b"R",
        b"\x93",
        b"\x8c\x06action",
        b"\x8c\x04addr",
        b"\x8c\x04size",
        b"\x8c\x06stream",
        b"\x8c\x0bsegment_map",
        b"\x8c\x05alloc",
        b"\x8c\x0efree_requested",
        b"\x8c\x0dsegment_alloc",
        b"\x8c\x08segments",
        b"\x8c\x0ddevice_traces",
    ],
    case_timeout: Duration::from_secs(20),
};

/// accelrt's JSON snapshots.
pub const SNAPSHOT_JSON: Target = Target {
    name: "snapshot_json",
    about: "accelrt JSON snapshots: read, render, import as traces, write and read back",
    seeds: || snapshot_seeds(true),
    run: check_snapshot,
    max_len: 256 << 10,
    dictionary: &[
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"\"",
        b"null",
        b"true",
        b"1e999",
        b"-1",
        b"\"segment_map\"",
        b"\"segment_unmap\"",
        b"\"alloc\"",
        b"\"free_requested\"",
        b"\"segment_alloc\"",
        b"\"segment_free\"",
        b"\"oom\"",
        b"\"addr\":",
        b"\"size\":",
        b"18446744073709547520",
        b"\"unmapped\":",
        b"\\u0000",
    ],
    case_timeout: Duration::from_secs(20),
};

// ---- configuration strings ------------------------------------------------------------------

fn config_seeds() -> Vec<Vec<u8>> {
    [
        "",
        "expandable_segments:false",
        "max_split_size_mb:128,roundup_power2_divisions:[256:1,512:2,>:8]",
        "roundup_power2_divisions:4",
        "garbage_collection_threshold:0.6,per_process_memory_fraction:0.5",
        "high_watermark_ratio:1.7,low_watermark_ratio:1.4",
        "expandable_page_mb:4,release_at_peak:false",
        "max_non_split_rounding_mb:20,expandable_segments:false,max_split_size_mb:20",
        "debug_checks:true",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Parse a configuration; a valid one must print back to itself and run an allocator.
fn check_config(bytes: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(bytes);
    let config = match AllocatorConfig::parse(&text) {
        Ok(c) => c,
        Err(e) => {
            let m = e.to_string();
            if m.contains("Some(") || m.contains("Failed(") {
                return Err(format!("debug formatting in a message: {m}"));
            }
            return Ok(format!("refused: {m}"));
        }
    };
    let again = AllocatorConfig::parse(&config.to_conf_string()).map_err(|e| {
        format!(
            "'{}' printed from a valid configuration does not parse: {e}",
            config.to_conf_string()
        )
    })?;
    if again.to_conf_string() != config.to_conf_string() {
        return Err(format!(
            "configuration does not survive printing: '{}' then '{}'",
            config.to_conf_string(),
            again.to_conf_string()
        ));
    }
    let a = match CachingAllocator::new(DEV, Arc::new(HostMemory::new(64 << 20)), None, config) {
        Ok(a) => a,
        Err(e) => return Ok(format!("no allocator: {e}")),
    };
    let stream = Stream {
        device: DEV,
        index: 0,
    };
    let mut live = Vec::new();
    for (i, size) in [512usize, 3 << 20, 1 << 20, 700, 40 << 20, 5 << 20]
        .into_iter()
        .enumerate()
    {
        if let Ok(p) = a.raw_alloc(size, stream) {
            live.push(p);
        }
        if i % 2 == 1 {
            if let Some(p) = live.pop() {
                a.raw_free(p)
                    .map_err(|e| format!("freeing a live pointer failed: {e}"))?;
            }
        }
    }
    for p in live {
        a.raw_free(p)
            .map_err(|e| format!("freeing a live pointer failed: {e}"))?;
    }
    a.empty_cache()
        .map_err(|e| format!("empty_cache failed: {e}"))?;
    a.check_invariants()
        .map_err(|e| format!("invariant broken: {e}"))?;
    Ok(format!("ran {}", a.config().to_conf_string()))
}

/// `ACCELRT_ALLOC_CONF` / `--alloc-conf` strings.
pub const CONFIG: Target = Target {
    name: "config",
    about: "allocator configuration strings: parse, print back, run an allocator under them",
    seeds: config_seeds,
    run: check_config,
    max_len: 8 << 10,
    dictionary: &[
        b",",
        b":",
        b"[",
        b"]",
        b">",
        b"max_split_size_mb",
        b"roundup_power2_divisions",
        b"expandable_segments",
        b"expandable_page_mb",
        b"garbage_collection_threshold",
        b"per_process_memory_fraction",
        b"high_watermark_ratio",
        b"low_watermark_ratio",
        b"release_at_peak",
        b"max_non_split_rounding_mb",
        b"true",
        b"false",
        b"True",
        b"1",
    ],
    case_timeout: Duration::from_secs(20),
};

// ---- the CLI's size and configuration arguments ---------------------------------------------

/// Environment variable naming the `accelrt` binary for the CLI target.
pub const BIN_ENV: &str = "ACCELRT_FUZZ_BIN";

fn cli_seeds() -> Vec<Vec<u8>> {
    [
        "24GiB\n\na 0 1 0\nf 0\n",
        "512MiB\nexpandable_segments:false\na 0 1048576 0\na 1 512 1\nf 0\n",
        "1GB\nmax_split_size_mb:20\na 0 30000000 0\nf 0\n",
        "4096\n\na 0 8192 0\n",
        "1.5GiB\nroundup_power2_divisions:4\na 0 123456 0\nf 0\n",
        "\n\na 0 1 0\n",
        "64 MiB\nexpandable_page_mb:4\na 0 10485760 0\nf 0\na 1 10485760 0\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Line 1: `--capacity`, line 2: `--alloc-conf`, the rest: a trace. Runs the real binary
/// (`ACCELRT_FUZZ_BIN`): exit 0 or 1 with a message; never a panic, a signal or a hang.
fn check_cli(bytes: &[u8]) -> Outcome {
    let Ok(bin) = std::env::var(BIN_ENV) else {
        return Err(format!(
            "{BIN_ENV} is not set: point it at the accelrt binary"
        ));
    };
    // A command line cannot hold NUL bytes: what a shell could pass, and only that.
    let text = String::from_utf8_lossy(bytes).replace('\0', "");
    let mut lines = text.splitn(3, '\n');
    let capacity = lines.next().unwrap_or("").to_string();
    let conf = lines.next().unwrap_or("").to_string();
    let body = lines.next().unwrap_or("");
    let dir = std::env::temp_dir().join(format!("accelrt-fuzz-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
    let file = dir.join("case.trace");
    std::fs::write(&file, body).map_err(|e| format!("temp file: {e}"))?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("replay").arg(&file).arg("--json");
    if !capacity.is_empty() {
        cmd.arg(format!("--capacity={capacity}"));
    }
    if !conf.is_empty() {
        cmd.arg(format!("--alloc-conf={conf}"));
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {bin}: {e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("accelrt replay ran past 15 s (a hang)".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    use std::os::unix::process::ExitStatusExt;
    if let Some(signal) = status.signal() {
        return Err(format!("accelrt replay died of signal {signal}: {stderr}"));
    }
    if stderr.contains("panicked") {
        panic!("accelrt replay panicked: {}", first_chars(&stderr, 600));
    }
    match status.code() {
        Some(0) => Ok("ok".into()),
        Some(1) | Some(2) => {
            if stderr.trim().is_empty() {
                return Err("accelrt replay failed without saying why".into());
            }
            Ok(format!(
                "exit {:?}: {}",
                status.code(),
                first_chars(stderr.trim(), 60)
            ))
        }
        other => Err(format!("accelrt replay exited with {other:?}: {stderr}")),
    }
}

/// The CLI: `--capacity` size strings and `--alloc-conf` strings, end to end.
pub const CLI: Target = Target {
    name: "cli",
    about: "accelrt replay --capacity SIZE --alloc-conf CONF on a small trace (the real binary)",
    seeds: cli_seeds,
    run: check_cli,
    max_len: 4 << 10,
    dictionary: &[
        b"KiB",
        b"MiB",
        b"GiB",
        b"TiB",
        b"KB",
        b"MB",
        b"GB",
        b"TB",
        b"K",
        b"G",
        b".",
        b"_",
        b" ",
        b"e",
        b"-",
        b"expandable_segments:",
        b"max_split_size_mb:",
        b",",
        b"\n",
    ],
    case_timeout: Duration::from_secs(30),
};

// ---- the C ABI ------------------------------------------------------------------------------

/// Reads structured values out of fuzz bytes (zeros once they run out).
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next error.
    unsafe { CStr::from_ptr(accelrt_torch::accelrt_torch_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A failed call must give a reason, and never a caught panic.
fn check_failure(what: &str) -> Result<(), String> {
    let e = last_error();
    if e.contains("panicked") {
        panic!("{what}: the C ABI caught a panic: {e}");
    }
    if e.is_empty() {
        return Err(format!("{what} failed without a reason"));
    }
    let prefix = e.split(':').next().unwrap_or("");
    if prefix.len() > 10 && e.matches(prefix).count() > 2 {
        return Err(format!("{what}: a message repeats itself: {e}"));
    }
    Ok(())
}

static CABI_INIT: std::sync::Once = std::sync::Once::new();

fn host_stream_handles() -> &'static [usize] {
    static HANDLES: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    HANDLES.get_or_init(|| {
        let host = accelrt::backend(DeviceType::Host);
        std::iter::once(0)
            .chain((0..3).filter_map(|_| {
                let s = host
                    .stream_from_pool(0, accelrt::StreamPriority::Normal)
                    .ok()?;
                host.stream_native_handle(s).ok().map(|h| h as usize)
            }))
            .collect()
    })
}

fn cabi_init() {
    CABI_INIT.call_once(|| {
        accelrt_torch::use_backend(DeviceType::Host)
            .expect("the fuzz process uses the host backend");
        accelrt_torch::accelrt_torch_set_log_alloc_failures(0);
        let _ = host_stream_handles();
    });
}

/// What one sequence of calls leaves to clean up.
#[derive(Default)]
struct Held {
    ptrs: Vec<usize>,
    pools: Vec<(u64, u64)>,
}

extern "C" fn odd_streams(_ctx: *mut c_void, stream: *mut c_void) -> c_int {
    (stream as usize % 2) as c_int
}

/// Run one call sequence (one thread's share).
fn cabi_sequence(mut b: Bytes<'_>, held: &mut Held) -> Result<u64, String> {
    use accelrt_torch::*;
    let streams = host_stream_handles();
    let mut steps = 0;
    // Which calls ran, and which of them failed: the outcome signature.
    let mut seen = 0u64;
    while !b.is_empty() && steps < 200 {
        steps += 1;
        let op = b.u8() % 24;
        seen |= 1 << op;
        if last_error_changed() {
            seen |= 1 << (32 + op);
        }
        let pick = |held: &Held, i: u8| held.ptrs.get(i as usize % held.ptrs.len().max(1)).copied();
        match op {
            0..=5 => {
                let shift = b.u8() % 28;
                let size = (b.u32() as isize) & ((1isize << shift) - 1);
                let size = if b.u8() == 255 { -size - 1 } else { size };
                let stream = streams[b.u8() as usize % streams.len()];
                // SAFETY: `stream` is 0 or a live host stream's handle.
                let p = unsafe { accelrt_torch_alloc(size, 0, stream as *mut c_void) };
                if p.is_null() {
                    if size > 0 {
                        check_failure("alloc")?;
                    }
                } else {
                    held.ptrs.push(p as usize);
                }
            }
            6..=8 => {
                if !held.ptrs.is_empty() {
                    let i = b.u8() as usize % held.ptrs.len();
                    let p = held.ptrs.swap_remove(i);
                    // SAFETY: checked by the library.
                    unsafe { accelrt_torch_free(p as *mut c_void, 0, 0, null_mut()) };
                }
            }
            9 => {
                // A double free, or a free of a pointer another sequence owns.
                if let Some(p) = pick(held, b.u8()) {
                    // SAFETY: checked by the library.
                    unsafe { accelrt_torch_free(p as *mut c_void, 0, 0, null_mut()) };
                    // SAFETY: as above: the second is stale.
                    unsafe { accelrt_torch_free(p as *mut c_void, 0, 0, null_mut()) };
                    held.ptrs.retain(|&q| q != p);
                }
            }
            10 => {
                // Foreign pointers: inside live blocks, unaligned, wild.
                let base = pick(held, b.u8()).unwrap_or(0x10_0000);
                let p = match b.u8() % 4 {
                    0 => base.wrapping_add(512),
                    1 => base.wrapping_add(1),
                    2 => b.u32() as usize,
                    _ => (b.u32() as usize) << 20 | 0x7f00_0000_0000,
                };
                let device = (b.u8() % 3) as c_int - 1;
                // SAFETY: checked by the library: an unknown pointer is refused.
                unsafe { accelrt_torch_free(p as *mut c_void, 0, device, null_mut()) };
            }
            11 => {
                if accelrt_torch_empty_cache() != 0 {
                    check_failure("empty_cache")?;
                }
            }
            12 => {
                let p = pick(held, b.u8()).unwrap_or(b.u32() as usize);
                let stream = streams[b.u8() as usize % streams.len()];
                // SAFETY: `stream` is 0 or a live host stream's handle; `p` is checked.
                if unsafe { accelrt_torch_record_stream(p as *mut c_void, stream as *mut c_void) }
                    != 0
                {
                    check_failure("record_stream")?;
                }
            }
            13 => {
                let id = (b.u8() as u64 % 4, b.u8() as u64 % 3);
                let filter: FilterFn = if b.u8() % 2 == 0 {
                    None
                } else {
                    Some(odd_streams)
                };
                // SAFETY: the filter is thread-safe and never unwinds; no context.
                let rc = unsafe {
                    accelrt_torch_begin_allocate_to_pool(0, id.0, id.1, filter, null_mut(), None)
                };
                if rc == 0 {
                    held.pools.push(id);
                } else {
                    check_failure("begin_allocate_to_pool")?;
                }
            }
            14 => {
                let id = (b.u8() as u64 % 4, b.u8() as u64 % 3);
                if accelrt_torch_end_allocate_to_pool(0, id.0, id.1) != 0 {
                    check_failure("end_allocate_to_pool")?;
                }
            }
            15 => {
                let id = (b.u8() as u64 % 4, b.u8() as u64 % 3);
                if accelrt_torch_release_pool(0, id.0, id.1) != 0 {
                    check_failure("release_pool")?;
                }
                let uses = accelrt_torch_pool_use_count(0, id.0, id.1);
                if !(-1..=100_000).contains(&uses) {
                    return Err(format!("pool {id:?} has {uses} uses after a release"));
                }
            }
            16 => {
                let id = (b.u8() as u64 % 4, b.u8() as u64 % 3);
                if accelrt_torch_create_or_incref_pool(0, id.0, id.1) == 0 {
                    held.pools.push(id);
                } else {
                    check_failure("create_or_incref_pool")?;
                }
            }
            17 => {
                let mut len = 0usize;
                let device = (b.u8() % 3) as c_int - 1;
                // SAFETY: `len` is a live local.
                let p = unsafe { accelrt_torch_snapshot_pickle(device, &mut len) };
                if p.is_null() {
                    check_failure("snapshot_pickle")?;
                } else {
                    // SAFETY: `len` bytes from the library, freed right after.
                    let bytes = unsafe { std::slice::from_raw_parts(p, len) }.to_vec();
                    // SAFETY: from accelrt_torch_snapshot_pickle, freed once.
                    unsafe { accelrt_torch_free_buffer(p.cast()) };
                    snapshot::parse_bytes("abi.pickle", &bytes)
                        .map_err(|e| format!("the C ABI's snapshot does not read back: {e}"))?;
                }
            }
            18 => {
                let device = (b.u8() % 3) as c_int - 1;
                let p = accelrt_torch_memory_stats_json(device);
                if p.is_null() {
                    check_failure("memory_stats_json")?;
                } else {
                    // SAFETY: a NUL-terminated buffer from the library, freed right after.
                    let json = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
                    // SAFETY: from accelrt_torch_memory_stats_json, freed once.
                    unsafe { accelrt_torch_free_buffer(p.cast()) };
                    serde_json::from_str::<serde_json::Value>(&json)
                        .map_err(|e| format!("stats JSON does not parse: {e}"))?;
                }
            }
            19 => {
                let mut out = vec![0i64; STATS_LEN + 1];
                let len = b.u8() as usize % (STATS_LEN + 2);
                let len = len.min(out.len());
                // SAFETY: `out` holds at least `len` values.
                if unsafe { accelrt_torch_stats_array(0, out.as_mut_ptr(), len) } < 0 {
                    check_failure("stats_array")?;
                }
            }
            20 => {
                let f = match b.u8() % 5 {
                    0 => 0.0,
                    1 => f64::NAN,
                    2 => 1.5,
                    3 => 1.0,
                    _ => (b.u8() as f64 + 1.0) / 256.0,
                };
                if accelrt_torch_set_memory_fraction(f, 0) != 0 {
                    check_failure("set_memory_fraction")?;
                }
            }
            21 => {
                let enabled = b.u8() as c_int % 2;
                let max = b.u8() as usize * 100;
                let device = (b.u8() % 3) as c_int - 1;
                if accelrt_torch_record_history(device, enabled, max) != 0 {
                    check_failure("record_history")?;
                }
            }
            22 => {
                let mut largest = 0usize;
                // SAFETY: `largest` is a live local.
                if unsafe { accelrt_torch_cache_info(0, &mut largest) } != 0 {
                    check_failure("cache_info")?;
                }
                let _ = accelrt_torch_reset_peak_stats(0);
            }
            _ => {
                // Bad devices everywhere.
                let d = b.u8() as c_int - 128;
                let _ = accelrt_torch_get_memory_fraction(d);
                let _ = accelrt_torch_pool_use_count(d, 1, 1);
                // SAFETY: refused before the stream is used (bad device) or NULL stream.
                let p = unsafe { accelrt_torch_alloc(512, d, null_mut()) };
                if !p.is_null() {
                    held.ptrs.push(p as usize);
                }
            }
        }
    }
    if last_error_changed() {
        seen |= 1 << 63;
    }
    Ok(seen)
}

thread_local! {
    static LAST_SEEN: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Whether this thread's last C ABI error changed since the last look.
fn last_error_changed() -> bool {
    let now = last_error();
    LAST_SEEN.with(|l| {
        let changed = *l.borrow() != now;
        *l.borrow_mut() = now;
        changed
    })
}

/// After a case: free what it holds, close its routes and pools, and check the allocator.
fn cabi_cleanup(held: Vec<Held>) -> Result<(), String> {
    use accelrt_torch::*;
    for h in &held {
        for &p in &h.ptrs {
            // SAFETY: checked by the library (some were freed by another sequence).
            unsafe { accelrt_torch_free(p as *mut c_void, 0, 0, null_mut()) };
        }
    }
    for h in &held {
        for &(a, b) in &h.pools {
            let _ = accelrt_torch_end_allocate_to_pool(0, a, b);
            let mut guard = 0;
            while accelrt_torch_pool_use_count(0, a, b) > 0 && guard < 10_000 {
                if accelrt_torch_release_pool(0, a, b) != 0 {
                    break;
                }
                guard += 1;
            }
        }
    }
    let _ = accelrt_torch_set_memory_fraction(1.0, 0);
    let _ = accelrt_torch_record_history(-1, 0, 0);
    let host = accelrt::backend(DeviceType::Host);
    host.device_synchronize(0).map_err(|e| e.to_string())?;
    if accelrt_torch_empty_cache() != 0 {
        check_failure("empty_cache")?;
    }
    let a = host.allocator(0).map_err(|e| e.to_string())?;
    a.check_invariants()
        .map_err(|e| format!("invariant broken after the calls: {e}"))?;
    Ok(())
}

fn cabi_seeds() -> Vec<Vec<u8>> {
    vec![
        vec![0, 10, 0, 16, 0, 0, 0, 0, 6, 0],
        vec![
            13, 1, 0, 0, 0, 20, 0, 0, 0, 0, 0, 14, 1, 0, 15, 1, 0, 15, 1, 0, 7, 0,
        ],
        vec![
            1, 20, 255, 255, 255, 255, 0, 1, 9, 0, 11, 12, 0, 1, 17, 1, 18, 1, 19, 200,
        ],
        vec![
            20, 4, 5, 27, 255, 255, 255, 127, 0, 0, 11, 16, 2, 1, 15, 2, 1, 15, 2, 1,
        ],
        vec![21, 1, 10, 1, 2, 10, 0, 16, 0, 0, 1, 17, 0, 6, 0, 23, 7],
    ]
}

/// C ABI call sequences, one thread.
fn check_cabi(bytes: &[u8]) -> Outcome {
    cabi_init();
    let mut held = Held::default();
    let r = cabi_sequence(Bytes(bytes), &mut held);
    cabi_cleanup(vec![held])?;
    r.map(|seen| format!("calls {seen:016x}"))
}

/// The same, split between four threads running at once.
fn check_cabi_threads(bytes: &[u8]) -> Outcome {
    cabi_init();
    let quarter = bytes.len().div_ceil(4).max(1);
    let results: Vec<(Held, Result<u64, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = bytes
            .chunks(quarter)
            .map(|chunk| {
                s.spawn(move || {
                    let mut held = Held::default();
                    let r = cabi_sequence(Bytes(chunk), &mut held);
                    (held, r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(x) => x,
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    });
    let mut first = Ok(0u64);
    let mut held = Vec::new();
    for (h, r) in results {
        held.push(h);
        first = match (first, r) {
            (Ok(a), Ok(b)) => Ok(a | b),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
    }
    cabi_cleanup(held)?;
    first.map(|seen| format!("calls {seen:016x}"))
}

/// The C ABI (`libaccelrt_torch`), one thread: hostile call sequences.
pub const CABI: Target = Target {
    name: "cabi",
    about: "C ABI call sequences: double frees, foreign pointers, pool misuse, bad devices",
    seeds: cabi_seeds,
    run: check_cabi,
    max_len: 2048,
    dictionary: &[
        &[9],
        &[10],
        &[11],
        &[15],
        &[13],
        &[16],
        &[255, 255, 255, 255],
    ],
    case_timeout: Duration::from_secs(30),
};

/// The C ABI from four threads at once.
pub const CABI_THREADS: Target = Target {
    name: "cabi_threads",
    about: "C ABI call sequences from four threads at once (the item 4 race's surface)",
    seeds: cabi_seeds,
    run: check_cabi_threads,
    max_len: 4096,
    dictionary: &[
        &[9],
        &[10],
        &[11],
        &[15],
        &[13],
        &[16],
        &[255, 255, 255, 255],
    ],
    case_timeout: Duration::from_secs(30),
};
