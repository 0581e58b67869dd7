//! What the C++ shim's full allocator (PyTorch's `CUDAAllocator`) asks of the library, on the
//! host backend: a private pool's live blocks and checkpoints, where a pointer lives, the
//! structured snapshot with context ids, segment events, IPC refusals, and the v2 trace
//! recorder. The tests share device 0, so they run one at a time.

use std::ffi::{c_int, c_void, CStr, CString};
use std::io::Read;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use accelrt::{Backend, DeviceType, StreamPriority};
use accelrt_torch::full::{BlockRecord, RawSnapshot};
use accelrt_torch::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn setup() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use_backend(DeviceType::Host).expect("these tests use the host backend");
    guard
}

fn host() -> &'static dyn Backend {
    accelrt::backend(DeviceType::Host)
}

fn last() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next error.
    unsafe { CStr::from_ptr(accelrt_torch_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn side_stream() -> *mut c_void {
    let s = host().stream_from_pool(0, StreamPriority::Normal).unwrap();
    host().stream_native_handle(s).unwrap() as usize as *mut c_void
}

fn alloc(size: isize, stream: *mut c_void) -> usize {
    // SAFETY: `stream` is NULL (the default stream) or a live host stream's handle.
    let p = unsafe { accelrt_torch_alloc(size, 0, stream) } as usize;
    assert_ne!(p, 0, "alloc({size}) failed: {}", last());
    p
}

fn free(p: usize) {
    // SAFETY: freeing is checked; nothing uses the memory.
    unsafe { accelrt_torch_free(p as *mut c_void, 0, 0, null_mut()) }
}

fn live_blocks(id: (u64, u64)) -> Vec<BlockRecord> {
    // SAFETY: NULL with cap 0 counts; then a vector with room for `n`.
    let n = unsafe { full::accelrt_torch_pool_live_blocks(0, id.0, id.1, null_mut(), 0) };
    assert!(n >= 0, "{}", last());
    let mut out = vec![BlockRecord::default(); n as usize];
    // SAFETY: `out` has room for `n` records.
    let m =
        unsafe { full::accelrt_torch_pool_live_blocks(0, id.0, id.1, out.as_mut_ptr(), out.len()) };
    assert_eq!(m, n);
    out
}

#[test]
fn a_private_pool_reports_its_live_blocks_and_keeps_checkpointed_ones() {
    let _g = setup();
    let id = (9001, 1);
    assert_eq!(
        // SAFETY: no filter: every stream of the device is routed.
        unsafe { accelrt_torch_begin_allocate_to_pool(0, id.0, id.1, None, null_mut(), None) },
        0,
        "{}",
        last()
    );
    let a = alloc(3000, null_mut());
    let b = alloc(5 << 20, null_mut());
    assert_eq!(accelrt_torch_end_allocate_to_pool(0, id.0, id.1), 0);
    let outside = alloc(4096, null_mut());

    let live = live_blocks(id);
    let ptrs: Vec<u64> = live.iter().map(|b| b.ptr).collect();
    let mut expected = vec![a as u64, b as u64];
    expected.sort();
    assert_eq!(
        ptrs, expected,
        "the pool's blocks, by address, and nothing else"
    );
    let small = live.iter().find(|x| x.ptr == a as u64).unwrap();
    assert_eq!(small.requested, 3000);
    assert!(small.size >= 3000);

    // A checkpointed block that is still allocated needs nothing.
    assert_eq!(
        full::accelrt_torch_pool_claim_block(0, id.0, id.1, small.ptr, small.size, small.requested),
        0,
        "{}",
        last()
    );
    // A freed one is put back at its address, live again.
    free(a);
    assert_eq!(live_blocks(id).len(), 1);
    assert_eq!(
        full::accelrt_torch_pool_claim_block(0, id.0, id.1, small.ptr, small.size, small.requested),
        0,
        "{}",
        last()
    );
    assert_eq!(
        live_blocks(id).len(),
        2,
        "the checkpoint's blocks are live again"
    );
    // A range that is not free in the pool is refused with the reason.
    assert_eq!(
        full::accelrt_torch_pool_claim_block(0, id.0, id.1, small.ptr, small.size, small.requested),
        0,
        "still allocated: nothing to do"
    );
    assert_eq!(
        full::accelrt_torch_pool_claim_block(0, id.0, id.1, small.ptr + 512, 512, 1),
        -1
    );
    assert!(last().contains("not free"), "{}", last());
    free(a);
    assert_eq!(live_blocks(id).len(), 1);

    // SAFETY: NULL with cap 0.
    let unknown = unsafe { full::accelrt_torch_pool_live_blocks(0, 77, 77, null_mut(), 0) };
    assert_eq!(unknown, -1);
    assert!(last().contains("no private pool (77, 77)"), "{}", last());

    free(b);
    free(outside);
    assert_eq!(accelrt_torch_release_pool(0, id.0, id.1), 0, "{}", last());
}

#[test]
fn segment_of_finds_the_segment_and_the_block() {
    let _g = setup();
    let p = alloc(1 << 20, null_mut());
    let inner = p + 4096;
    let (mut dev, mut base, mut size, mut exp, mut blk, mut blk_size) =
        (-1, 0u64, 0u64, -1, 0u64, 0u64);
    // SAFETY: every out pointer is a live local.
    let rc = unsafe {
        full::accelrt_torch_segment_of(
            inner as *const c_void,
            &mut dev,
            &mut base,
            &mut size,
            &mut exp,
            &mut blk,
            &mut blk_size,
        )
    };
    assert_eq!(rc, 0, "{}", last());
    assert_eq!(dev, 0);
    assert!(base <= p as u64 && (inner as u64) < base + size);
    assert_eq!(blk, p as u64);
    assert!(blk_size >= 1 << 20);
    assert!(exp == 0 || exp == 1);
    // SAFETY: NULL out pointers are allowed.
    let rc = unsafe {
        full::accelrt_torch_segment_of(
            0x10 as *const c_void,
            null_mut(),
            null_mut(),
            null_mut(),
            null_mut(),
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(rc, -1);
    assert!(
        last().contains("not memory accelrt allocated"),
        "{}",
        last()
    );
    free(p);
}

#[test]
fn structured_snapshots_carry_blocks_history_streams_and_context_ids() {
    let _g = setup();
    assert_eq!(
        full::accelrt_torch_record_history_ex(0, 1, 1000, 1, 1),
        0,
        "{}",
        last()
    );
    full::accelrt_torch_set_context_id(42);
    let side = side_stream();
    let p = alloc(8192, side);
    full::accelrt_torch_set_context_id(0);
    let q = alloc(4096, null_mut());
    free(q);

    let mut snap = RawSnapshot::default();
    assert_eq!(
        // SAFETY: `snap` is a live local, freed below.
        unsafe { full::accelrt_torch_snapshot_raw(0, 0, 0, 1, &mut snap) },
        0,
        "{}",
        last()
    );
    // SAFETY: arrays filled by the library with these lengths.
    let (segments, blocks, traces) = unsafe {
        (
            std::slice::from_raw_parts(snap.segments, snap.segment_count).to_vec(),
            std::slice::from_raw_parts(snap.blocks, snap.block_count).to_vec(),
            std::slice::from_raw_parts(snap.traces, snap.trace_count).to_vec(),
        )
    };
    // SAFETY: filled by accelrt_torch_snapshot_raw, freed once.
    unsafe { full::accelrt_torch_snapshot_free(&mut snap) };
    assert!(snap.segments.is_null() && snap.segment_count == 0);

    let block = blocks
        .iter()
        .find(|b| b.address == p as u64)
        .expect("the live block");
    assert_eq!(block.state, 1);
    assert_eq!(block.context, 42, "the context id set at allocation");
    let seg = segments
        .iter()
        .find(|s| {
            (s.first_block..s.first_block + s.block_count)
                .any(|i| blocks[i as usize].address == p as u64)
        })
        .expect("the block's segment");
    assert_eq!(
        seg.stream, side as u64,
        "segments name their stream by its native handle"
    );
    let alloc_entry = traces
        .iter()
        .find(|t| t.action == 0 && t.addr == p as u64)
        .expect("an alloc entry");
    assert_eq!((alloc_entry.size, alloc_entry.context), (8192, 42));
    assert!(traces
        .iter()
        .any(|t| t.action == 1 && t.addr == q as u64 && t.context == 0));
    assert!(
        alloc_entry.time_us > 1_600_000_000_000_000,
        "Unix microseconds"
    );

    assert_eq!(
        full::accelrt_torch_record_history_ex(-1, 0, 0, 0, 1),
        0,
        "{}",
        last()
    );
    free(p);
}

static EVENTS: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn count_segments(
    ctx: *mut c_void,
    action: c_int,
    device: c_int,
    _addr: u64,
    size: u64,
) {
    assert!(ctx.is_null() && device == 0 && size > 0);
    if (3..=5).contains(&action) {
        EVENTS.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn segment_trackers_hear_of_new_memory() {
    let _g = setup();
    assert_eq!(
        full::accelrt_torch_add_segment_tracker(None, null_mut()),
        -1
    );
    assert_eq!(
        full::accelrt_torch_add_segment_tracker(Some(count_segments), null_mut()),
        0,
        "{}",
        last()
    );
    let before = EVENTS.load(Ordering::Relaxed);
    // Larger than anything cached: new memory is needed.
    let p = alloc(96 << 20, null_mut());
    assert!(
        EVENTS.load(Ordering::Relaxed) > before,
        "no segment event for 96 MiB of new memory"
    );
    free(p);
}

#[test]
fn vmm_ipc_refuses_on_host_with_what_to_do() {
    let _g = setup();
    let p = alloc(4096, null_mut());
    let mut buf = [0u8; 256];
    // SAFETY: `buf` has room for 256 bytes.
    let n =
        unsafe { ipc::accelrt_torch_ipc_share(p as *const c_void, 4096, buf.as_mut_ptr(), 256) };
    assert_eq!(n, -1);
    let e = last();
    assert!(
        e.contains("CUDA backend") || e.contains("plain segment"),
        "{e}"
    );
    // A well-formed handle naming this process: decoding passes, then the host refuses to
    // import (or, without pidfd_getfd rights, the duplication is refused with the reason).
    let h = ipc::Handle {
        device: 0,
        pid: std::process::id() as i32,
        offset: 0,
        len: 4096,
        span: 2 << 20,
        chunks: vec![ipc::HandleChunk {
            fd: 0,
            bytes: 2 << 20,
            at: 0,
        }],
    };
    let bytes = ipc::encode(&h);
    let mut out = null_mut();
    // SAFETY: `bytes` is a live buffer of its length; `out` is a live local.
    let rc = unsafe { ipc::accelrt_torch_ipc_open(0, bytes.as_ptr(), bytes.len(), &mut out) };
    assert_eq!(rc, -1);
    let e = last();
    assert!(
        e.contains("cannot import memory") || e.contains("pidfd"),
        "{e}"
    );
    assert_eq!(ipc::accelrt_torch_ipc_close(0x1000 as *mut c_void), -1);
    assert!(
        last().contains("not memory accelrt_torch_ipc_open mapped"),
        "{}",
        last()
    );
    ipc::accelrt_torch_ipc_forget(p as *mut c_void); // never shared: nothing to do
    free(p);
}

fn read_trace(path: &std::path::Path) -> String {
    let mut text = String::new();
    let file = std::fs::File::open(path).unwrap();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .unwrap();
    } else {
        std::io::BufReader::new(file)
            .read_to_string(&mut text)
            .unwrap();
    }
    text
}

/// Check a v2 trace against the spec; returns its event lines split in words.
fn check_v2(text: &str) -> Vec<Vec<String>> {
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("#accelrt-trace v2"));
    let mut keys = Vec::new();
    let mut events = Vec::new();
    let mut last_t = 0u64;
    for line in lines {
        if let Some(h) = line.strip_prefix("#! ") {
            assert!(events.is_empty(), "header lines come first: {line}");
            keys.push(h.split('=').next().unwrap().to_string());
            continue;
        }
        let w: Vec<String> = line.split(' ').map(str::to_string).collect();
        let arity = match w[0].as_str() {
            "a" => 5,
            "f" | "c" => 3,
            "u" => 4,
            other => panic!("unknown event {other}: {line}"),
        };
        assert_eq!(w.len(), arity, "{line}");
        let t: u64 = w[arity - 1].parse().unwrap();
        assert!(t >= last_t, "time went backwards at {line}");
        last_t = t;
        events.push(w);
    }
    for k in [
        "workload",
        "recorded_on",
        "recorded_with",
        "allocator",
        "conf",
        "real_peak_reserved",
        "real_peak_allocated",
        "time_unit",
    ] {
        assert!(
            keys.iter().any(|x| x == k),
            "header key {k} missing: {keys:?}"
        );
    }
    events
}

#[test]
fn the_recorder_writes_a_v2_trace_with_completion_markers() {
    let _g = setup();
    let dir = std::env::temp_dir().join(format!("accelrt-torch-rec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["run.trace", "run.trace.gz"] {
        let path = dir.join(name);
        let c = CString::new(path.to_str().unwrap()).unwrap();
        let w = CString::new("unit test").unwrap();
        assert_eq!(
            // SAFETY: NUL-terminated strings.
            unsafe { record::accelrt_torch_record_trace_start(c.as_ptr(), w.as_ptr()) },
            0,
            "{}",
            last()
        );
        assert_eq!(
            // SAFETY: as above.
            unsafe { record::accelrt_torch_record_trace_start(c.as_ptr(), w.as_ptr()) },
            -1
        );
        assert!(last().contains("already recording"), "{}", last());
        assert_eq!(record::accelrt_torch_record_trace_active(), 1);

        let side = side_stream();
        let a = alloc(1000, null_mut());
        let b = alloc(2 << 20, side);
        assert_eq!(
            // SAFETY: `a` is live; `side` a live host stream.
            unsafe { accelrt_torch_record_stream(a as *mut c_void, side) },
            0,
            "{}",
            last()
        );
        free(a);
        for _ in 0..50 {
            let x = alloc(512, null_mut());
            free(x);
        }
        free(b);
        assert_eq!(record::accelrt_torch_record_trace_stop(), 0, "{}", last());
        assert_eq!(record::accelrt_torch_record_trace_active(), 0);
        assert_eq!(record::accelrt_torch_record_trace_stop(), -1);

        let text = read_trace(&path);
        assert!(text.contains("#! workload=unit test\n"), "{text}");
        assert!(text.contains("#! allocator=accelrt\n"));
        assert!(text.contains("#! time_unit=us\n"));
        let events = check_v2(&text);
        let allocs: Vec<&Vec<String>> = events.iter().filter(|w| w[0] == "a").collect();
        assert_eq!(allocs.len(), 52);
        assert_eq!(
            allocs[0][1..4],
            ["0", "1000", "0"],
            "first alloc: id 0, 1000 bytes, default stream"
        );
        assert_eq!(
            allocs[1][2..4],
            ["2097152", "1"],
            "the side stream is stream 1"
        );
        assert!(events
            .iter()
            .any(|w| w[0] == "u" && w[1] == "0" && w[2] == "1"));
        // Every free gets exactly one completion marker, after it.
        for id in 0..52 {
            let id = id.to_string();
            let f = events
                .iter()
                .position(|w| w[0] == "f" && w[1] == id)
                .expect("a free");
            let c: Vec<usize> = events
                .iter()
                .enumerate()
                .filter(|(_, w)| w[0] == "c" && w[1] == id)
                .map(|(i, _)| i)
                .collect();
            assert_eq!(c.len(), 1, "one marker for id {id}");
            assert!(c[0] > f);
        }
        assert!(
            !dir.join(format!("{name}.events.tmp")).exists(),
            "the temporary file is gone"
        );
        let peak: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("#! real_peak_reserved="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(peak >= 2 << 20);
    }
    // An unwritable path is refused at start.
    let bad = CString::new("/nonexistent/dir/x.trace").unwrap();
    assert_eq!(
        // SAFETY: NUL-terminated; NULL workload.
        unsafe { record::accelrt_torch_record_trace_start(bad.as_ptr(), std::ptr::null()) },
        -1
    );
    assert!(last().contains("cannot create"), "{}", last());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_shim_resolves_only_functions_the_header_declares() {
    let shim = std::fs::read_to_string(
        common_dir().join("../../python/accelrt_torch/accelrt_torch_shim.cpp"),
    )
    .expect("the shim's source is readable");
    let header = std::fs::read_to_string(common_dir().join("include/accelrt_torch.h")).unwrap();
    let resolved: Vec<&str> = shim
        .split("resolve(handle, \"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap())
        .collect();
    assert!(resolved.len() >= 30, "{resolved:?}");
    for name in resolved {
        assert!(
            header.contains(&format!("{name}(")),
            "the shim resolves {name}, which accelrt_torch.h does not declare"
        );
    }
}

fn common_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
