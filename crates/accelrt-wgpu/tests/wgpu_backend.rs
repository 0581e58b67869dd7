//! The wgpu backend doing real work on its first adapter: data written, copied, filled and
//! read back on the GPU; memory reused across streams without corruption; events as
//! submission numbers; timing through timestamp queries; graphs replaying GPU work; the
//! refusals. Skipped with the reason without an adapter (a failure with
//! `ACCELRT_REQUIRE_WGPU=1`).

mod common;

use accelrt::DeviceError;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use accelrt::{Backend, Device, Error, MempoolId, Stream, StreamPriority};
use accelrt_wgpu::{pattern_word, WgpuBackend, WgpuDriver, WgpuStream};

/// Tests share device 0's allocator: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn stream(b: &WgpuBackend) -> Stream {
    b.new_stream(0, StreamPriority::Normal).unwrap()
}

/// Run `f` with the driver and `s`'s wgpu stream.
fn on<R>(
    b: &WgpuBackend,
    s: Stream,
    f: impl FnOnce(&WgpuDriver, &WgpuStream) -> accelrt::error::DeviceResult<R>,
) -> accelrt::error::DeviceResult<R> {
    b.with_stream(s, f)
}

fn read(b: &WgpuBackend, s: Stream, ptr: usize, len: usize) -> Vec<u8> {
    on(b, s, |d, w| d.read(w, ptr, len)).unwrap()
}

fn words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn pattern(seed: u32, n: usize, rounds: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| pattern_word(seed, i, rounds))
        .collect()
}

/// A gate a host task waits on, holding its stream (and the GPU work queued after it).
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn task(&self) -> accelrt::hooks::HostTask {
        let g = self.clone();
        Arc::new(move || {
            let (lock, cv) = &*g.0;
            let open = lock.lock().unwrap();
            let _unused = cv.wait_timeout_while(open, Duration::from_secs(20), |o| !*o);
        })
    }
    fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }
}

#[test]
fn fill_copy_write_and_read_back_on_the_gpu() {
    let Some(b) = common::backend() else { return };
    let _serial = serial();
    let a = b.allocator(0).unwrap();
    let s = stream(b);
    let (n, len) = (10_000usize, 40_000usize);
    let x = a.raw_alloc(len, s).unwrap();
    let y = a.raw_alloc(len, s).unwrap();

    // Constant and pattern fills, a zero fill (clear_buffer), a copy, read back as data.
    on(b, s, |d, w| d.fill(w, x, len, 0x0102_0304)).unwrap();
    assert_eq!(words(&read(b, s, x, len)), vec![0x0102_0304; n]);
    on(b, s, |d, w| d.fill_pattern(w, x, len, 42, 3)).unwrap();
    let expected = pattern(42, n, 3);
    assert_eq!(words(&read(b, s, x, len)), expected);
    on(b, s, |d, w| d.fill(w, y, len, 0)).unwrap();
    assert_eq!(words(&read(b, s, y, len)), vec![0; n]);
    on(b, s, |d, w| d.copy(w, y + 400, x, 4000)).unwrap();
    let got = words(&read(b, s, y, len));
    assert_eq!(&got[..100], &[0; 100][..], "before the copy's destination");
    assert_eq!(&got[100..1100], &expected[..1000], "the copied words");
    assert_eq!(&got[1100..], &vec![0; n - 1100][..], "after it");

    // Overlapping ranges of one segment copy as memmove does.
    on(b, s, |d, w| d.copy(w, x + 8, x, 40)).unwrap();
    let moved = words(&read(b, s, x, 48));
    assert_eq!(&moved[..2], &expected[..2]);
    assert_eq!(&moved[2..12], &expected[..10]);

    // Writes at any address and length keep the bytes around them.
    on(b, s, |d, w| d.fill(w, y, 64, 0xaaaa_aaaa)).unwrap();
    on(b, s, |d, w| d.write(w, y + 1, &[1, 2, 3, 4, 5, 6, 7, 8, 9])).unwrap();
    on(b, s, |d, w| d.write(w, y + 13, &[0xee])).unwrap();
    let mut want = vec![0xaa; 16];
    want[1..10].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    want[13] = 0xee;
    assert_eq!(read(b, s, y, 16), want);
    // Reads of any address and length.
    assert_eq!(read(b, s, y + 3, 5), want[3..8]);

    // Work queued behind a held stream runs in stream order, after the gate.
    let gate = Gate::default();
    b.launch_host(s, gate.task()).unwrap();
    on(b, s, |d, w| d.fill(w, x, 16, 7)).unwrap();
    assert!(
        on(b, s, |_, w| Ok(w.pending())).unwrap() >= 1,
        "the fill waits behind the gate"
    );
    assert_eq!(b.stream_query(s), Ok(false));
    gate.open();
    assert_eq!(words(&read(b, s, x, 16)), [7; 4]);
    b.stream_synchronize(s).unwrap();
    assert_eq!(b.stream_query(s), Ok(true));
    for p in [x, y] {
        a.raw_free(p).unwrap();
    }
}

#[test]
fn malformed_work_is_refused_with_the_reason() {
    let Some(b) = common::backend() else { return };
    let _serial = serial();
    let a = b.allocator(0).unwrap();
    let s = stream(b);
    let p = a.raw_alloc(4096, s).unwrap();
    let cases: Vec<(&str, accelrt::error::DeviceResult<()>, &str)> = vec![
        (
            "misaligned fill",
            on(b, s, |d, w| d.fill(w, p + 2, 8, 1)),
            "not a multiple of 4",
        ),
        (
            "fill of 6 bytes",
            on(b, s, |d, w| d.fill(w, p, 6, 1)),
            "not a multiple of 4",
        ),
        (
            "past the segment",
            on(b, s, |d, w| d.fill(w, p, 64 << 20, 1)),
            "past the end of its segment",
        ),
        (
            "host memory",
            on(b, s, |d, w| {
                let local = [0u8; 8];
                d.write(w, local.as_ptr() as usize, &[1])
            }),
            "not inside a segment",
        ),
    ];
    for (what, result, needle) in cases {
        let err = result.expect_err(what).to_string();
        assert!(err.contains(needle), "{what}: {err}");
    }
    let err = a.shared_host_ptr(p).unwrap_err().to_string();
    assert!(err.contains("shared_host_ptr"), "{err}");
    assert!(!a.is_shared_storage_supported());
    b.stream_synchronize(s).unwrap();
    a.raw_free(p).unwrap();
}

/// Stream B copies a block out of A's memory while B is held back; A frees the block with
/// `record_stream(B)` and allocates again at once, writing new data. B must read the old
/// data: the allocator does not hand the block out again before B has passed. The control
/// shows the test can see corruption: without `record_stream` the block comes straight back
/// and B reads A's new data.
#[test]
fn memory_reused_across_streams_is_not_corrupted() {
    let Some(b) = common::backend() else { return };
    let _serial = serial();
    let a = b.allocator(0).unwrap();
    a.empty_cache().unwrap();
    let (sa, sb) = (stream(b), stream(b));
    let size = 1 << 20;
    let n = size / 4;
    for protect in [true, false] {
        let out = a.raw_alloc(size, sb).unwrap();
        let p = a.raw_alloc(size, sa).unwrap();
        on(b, sa, |d, w| d.fill_pattern(w, p, size, 1, 0)).unwrap();
        b.stream_synchronize(sa).unwrap();
        let gate = Gate::default();
        b.launch_host(sb, gate.task()).unwrap();
        on(b, sb, |d, w| d.copy(w, out, p, size)).unwrap();
        if protect {
            a.record_stream(p, sb).unwrap();
        }
        a.raw_free(p).unwrap();
        // A reuses memory at once: several blocks of the same size, each overwritten.
        let reused: Vec<usize> = (0..4).map(|_| a.raw_alloc(size, sa).unwrap()).collect();
        for &q in &reused {
            on(b, sa, |d, w| d.fill_pattern(w, q, size, 2, 0)).unwrap();
        }
        b.stream_synchronize(sa).unwrap();
        gate.open();
        let copied = words(&read(b, sb, out, size));
        if protect {
            assert!(
                !reused.contains(&p),
                "the block was handed out before B passed"
            );
            assert_eq!(
                copied,
                pattern(1, n, 0),
                "B read what A wrote before the free"
            );
        } else {
            assert!(
                reused.contains(&p),
                "control: the block comes straight back"
            );
            assert_eq!(copied, pattern(2, n, 0), "control: B sees A's new data");
        }
        for q in reused {
            assert_eq!(words(&read(b, sa, q, size)), pattern(2, n, 0));
            a.raw_free(q).unwrap();
        }
        a.raw_free(out).unwrap();
        b.stream_synchronize(sb).unwrap();
        a.free_inactive_buffers().unwrap();
    }

    // Without any host hold: B waits on the GPU for A's slow kernel through an event, then
    // copies; A frees with record_stream and overwrites the reused memory at once.
    let rounds = 64;
    let out = a.raw_alloc(size, sb).unwrap();
    let p = a.raw_alloc(size, sa).unwrap();
    on(b, sa, |d, w| d.fill_pattern(w, p, size, 3, rounds)).unwrap();
    let ev = b.event_acquire(0, false).unwrap();
    b.event_record(ev, sa).unwrap();
    b.event_wait(ev, sb).unwrap();
    on(b, sb, |d, w| d.copy(w, out, p, size)).unwrap();
    a.record_stream(p, sb).unwrap();
    a.raw_free(p).unwrap();
    let q = a.raw_alloc(size, sa).unwrap();
    on(b, sa, |d, w| d.fill(w, q, size, 0xdead_beef)).unwrap();
    assert_eq!(words(&read(b, sb, out, size)), pattern(3, n, rounds));
    assert_eq!(words(&read(b, sa, q, size)), vec![0xdead_beef; n]);
    b.event_release(ev).unwrap();
    for x in [q, out] {
        a.raw_free(x).unwrap();
    }
}

#[test]
fn events_are_submission_numbers_on_the_queue() {
    let Some(b) = common::backend() else { return };
    let _serial = serial();
    let a = b.allocator(0).unwrap();
    let s = stream(b);
    let p = a.raw_alloc(1 << 20, s).unwrap();
    let drv = b.driver().unwrap();
    let ev = b.event(0, false).unwrap();

    // A record submits nothing: the event stands for the stream's last submission.
    on(b, s, |d, w| d.fill_pattern(w, p, 1 << 20, 9, 32)).unwrap();
    let frontier = on(b, s, |_, w| Ok(w.frontier())).unwrap();
    let (_, last_before) = drv.submissions(0).unwrap();
    ev.record(s).unwrap();
    assert_eq!(drv.submissions(0).unwrap().1, last_before, "no submission");
    ev.synchronize().unwrap();
    assert_eq!(ev.query(), Ok(true));
    let (done, last) = drv.submissions(0).unwrap();
    assert!(frontier >= 1 && done >= frontier && last >= frontier);

    // Held back behind a host task, a record is resolved when the stream reaches it.
    let gate = Gate::default();
    b.launch_host(s, gate.task()).unwrap();
    on(b, s, |d, w| d.fill(w, p, 4096, 5)).unwrap();
    ev.record(s).unwrap();
    assert_eq!(ev.query(), Ok(false));
    let (tx, rx) = std::sync::mpsc::channel();
    ev.notify(move || tx.send(Instant::now()).unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert!(rx.try_recv().is_err(), "notify waits for the event");
    let opened = Instant::now();
    gate.open();
    ev.synchronize().unwrap();
    let notified = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(notified >= opened);
    assert_eq!(words(&read(b, s, p, 8)), [5, 5]);
    drop(ev);
    a.raw_free(p).unwrap();
}

#[test]
fn timing_events_measure_gpu_work_with_timestamps() {
    let Some(b) = common::backend() else { return };
    let _serial = serial();
    let drv = b.driver().unwrap();
    let s = stream(b);
    let (start, end) = (b.event(0, true).unwrap(), b.event(0, true).unwrap());
    if !drv.timestamps_supported(0).unwrap() {
        start.record(s).unwrap();
        end.record(s).unwrap();
        end.synchronize().unwrap();
        let err = start.elapsed_ms(&end).unwrap_err().to_string();
        assert!(err.contains("TIMESTAMP_QUERY"), "{err}");
        return;
    }
    let a = b.allocator(0).unwrap();
    let size = 4 << 20;
    let p = a.raw_alloc(size, s).unwrap();
    // Warm up the kernel, then time a slow fill (long on any GPU: many rounds per word).
    on(b, s, |d, w| d.fill_pattern(w, p, 4096, 0, 0)).unwrap();
    b.stream_synchronize(s).unwrap();
    let rounds = if drv.adapter_info(0).unwrap().device_type == wgpu_cpu() {
        200
    } else {
        20_000
    };
    let host = Instant::now();
    start.record(s).unwrap();
    on(b, s, |d, w| d.fill_pattern(w, p, size, 1, rounds)).unwrap();
    end.record(s).unwrap();
    end.synchronize().unwrap();
    let host_ms = host.elapsed().as_secs_f64() * 1e3;
    let gpu_ms = start.elapsed_ms(&end).unwrap();
    assert!(
        gpu_ms > 0.0 && gpu_ms <= host_ms + 1.0,
        "the GPU measured {gpu_ms} ms of a kernel the host saw take {host_ms} ms"
    );
    let (t0, t1) = (
        start.completion_time_ms().unwrap(),
        end.completion_time_ms().unwrap(),
    );
    assert!(((t1 - t0) - gpu_ms).abs() < 0.5, "{t0} .. {t1} vs {gpu_ms}");
    eprintln!("fill of {size} bytes x {rounds} rounds: GPU {gpu_ms:.3} ms, host {host_ms:.3} ms");
    a.raw_free(p).unwrap();
}

fn wgpu_cpu() -> accelrt_wgpu::wgpu::DeviceType {
    accelrt_wgpu::wgpu::DeviceType::Cpu
}

#[test]
fn graphs_replay_gpu_work_on_current_data() {
    let Some(b) = common::backend() else { return };
    let _serial = serial();
    let a = b.allocator(0).unwrap();
    let s = stream(b);
    let (src, dst) = (a.raw_alloc(4096, s).unwrap(), a.raw_alloc(4096, s).unwrap());
    let g = b.graph_create(0).unwrap();
    b.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
    on(b, s, |d, w| d.copy(w, dst, src, 4096)).unwrap();
    on(b, s, |d, w| d.fill(w, dst, 4, 0xffff_ffff)).unwrap();
    let refused = on(b, s, |d, w| d.read(w, dst, 4)).unwrap_err();
    assert!(
        refused.to_string().contains("cannot be captured"),
        "{refused}"
    );
    b.graph_capture_end(g).unwrap();
    b.graph_instantiate(g).ok();
    for value in [11u32, 22] {
        on(b, s, |d, w| d.fill(w, src, 4096, value)).unwrap();
        b.graph_replay(g).unwrap();
        let got = words(&read(b, s, dst, 4096));
        assert_eq!(got[0], 0xffff_ffff);
        assert_eq!(&got[1..], &vec![value; 1023][..]);
    }
    b.graph_destroy(g).unwrap();
    for p in [src, dst] {
        a.raw_free(p).unwrap();
    }
}

#[test]
fn scalar_buffers_are_written_in_stream_order() {
    let Some(b) = common::backend() else { return };
    let _serial = serial();
    let a = b.allocator(0).unwrap();
    let s = stream(b);
    let gate = Gate::default();
    b.launch_host(s, gate.task()).unwrap();
    let values: [&[u8]; 3] = [&[1], &[1, 2, 3], &7.5f64.to_le_bytes()];
    let ptrs: Vec<usize> = values
        .iter()
        .map(|v| b.alloc_scalar_with_value(s, v).unwrap())
        .collect();
    let err = a.alloc_scalar_with_value(&[1], s).unwrap_err().to_string();
    assert!(err.contains("Backend::alloc_scalar_with_value"), "{err}");
    gate.open();
    for (p, v) in ptrs.iter().zip(values) {
        assert_eq!(read(b, s, *p, v.len()), v);
        a.raw_free(*p).unwrap();
    }
}

#[test]
fn devices_are_adapters_with_their_properties_and_memory() {
    let Some(b) = common::backend() else { return };
    let _serial = serial();
    let drv = b.driver().unwrap();
    for d in 0..b.device_count() {
        let info = drv.adapter_info(d).unwrap();
        let limits = drv.limits(d).unwrap();
        let props = b.device_properties(d).unwrap();
        let figures = drv.memory_figures(d).unwrap();
        eprintln!("wgpu:{d}: {} — {figures:?}", props.name);
        assert!(props.name.starts_with(&info.name), "{}", props.name);
        assert!(props.name.contains(&format!("{:?}", info.backend)));
        assert_eq!(
            props.max_threads_per_group,
            limits.max_compute_workgroup_size_x
        );
        assert_eq!(props.total_memory, figures.total);
        assert!(props.recommended_max_memory <= props.total_memory);
        assert!(!props.host_visible_memory);
        if info.backend == accelrt_wgpu::wgpu::Backend::Vulkan {
            assert!(figures.source.starts_with("Vulkan"), "{}", figures.source);
        }
    }
    // Addresses are the device's own and never host addresses.
    let a = b.allocator(0).unwrap();
    let s = stream(b);
    let p = a.raw_alloc(1 << 20, s).unwrap();
    assert!(drv.memory(0).unwrap().owns_address(p));
    assert_eq!(
        b.device_from_ptr(p + 12345),
        Ok(Device {
            kind: accelrt_wgpu::KIND,
            index: 0
        })
    );
    assert!(b.driver_allocated_memory(0).unwrap() >= a.reserved_bytes());
    a.raw_free(p).unwrap();
    let config = b.show_config();
    assert!(config.contains("WGPU_BACKEND"), "{config}");
}

#[test]
fn errors_raised_by_wgpu_keep_its_text() {
    let Some(b) = common::backend() else { return };
    let _serial = serial();
    let drv = b.driver().unwrap();
    let s = stream(b);
    let (device, _) = drv.wgpu(0).unwrap();
    // An invalid buffer made outside any error scope: wgpu reports it asynchronously, and the
    // next synchronize says so with wgpu's message.
    let _bad = device.create_buffer(&accelrt_wgpu::wgpu::BufferDescriptor {
        label: Some("too large on purpose"),
        size: 16,
        usage: accelrt_wgpu::wgpu::BufferUsages::MAP_READ
            | accelrt_wgpu::wgpu::BufferUsages::MAP_WRITE,
        mapped_at_creation: false,
    });
    let err = b.stream_synchronize(s).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::Device(DeviceError::Driver { .. })),
        "{text}"
    );
    assert!(
        text.contains("too large on purpose") || text.contains("MAP"),
        "{text}"
    );
    b.stream_synchronize(s).unwrap();
}

/// Run this binary's test `name` in a child process with `env` set; its output.
fn child(name: &str, env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--include-ignored"])
        .envs(env.iter().copied())
        .env("ACCELRT_WGPU_CHILD", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} failed:\n{text}");
    text
}

#[test]
fn without_an_adapter_the_backend_is_unavailable_and_says_why() {
    let none = child(
        "child_reports_unavailable",
        &[("WGPU_ADAPTER_NAME", "no-such-adapter")],
    );
    assert!(
        none.contains("WGPU_ADAPTER_NAME=\"no-such-adapter\""),
        "{none}"
    );
    let no_driver = child(
        "child_reports_unavailable",
        &[
            ("VK_ICD_FILENAMES", "/nonexistent/icd.json"),
            ("VK_DRIVER_FILES", "/nonexistent/icd.json"),
            ("WGPU_BACKEND", "vulkan"),
        ],
    );
    assert!(no_driver.contains("no wgpu adapter"), "{no_driver}");
}

/// Run by the test above in a child process (ignored when run directly).
#[test]
#[ignore = "run in a child process by without_an_adapter_the_backend_is_unavailable_and_says_why"]
fn child_reports_unavailable() {
    if std::env::var_os("ACCELRT_WGPU_CHILD").is_none() {
        return;
    }
    let b = accelrt_wgpu::register().unwrap();
    assert!(!b.is_available());
    let reason = b.unavailable_reason().unwrap();
    eprintln!("unavailable: {reason}");
    assert_eq!(b.device_count(), 0);
    let err = b.allocator(0).unwrap_err();
    assert!(
        matches!(&err, Error::Device(DeviceError::NeedsBackend { call, .. }) if *call == "allocator"),
        "{err}"
    );
    assert!(err.to_string().contains(&reason), "{err}");
}
