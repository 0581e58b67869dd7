//! Moves of physical memory across blocks and streams, checked on data.
//!
//! Host streams are real worker threads, and a chunk of host "device memory" mapped at two
//! places shows the same bytes (as on CUDA), so a move that let new work touch memory before
//! the old work on it had finished, or unmapped a range still in use, shows up here as a wrong
//! byte or a fault.

use crate::common;

use accelrt::AllocError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use accelrt::alloc::{AllocatorConfig, CachingAllocator, MemoryProvider};
use accelrt::backend::host::HostDriver;
use accelrt::runtime::Runtime;
use accelrt::{Backend, Device, DeviceType, Stream, StreamPriority};
use common::memory::TestMemory;
use common::Gate;
use proptest::prelude::*;

const MIB: usize = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    /// Allocate `mib` MiB on stream `stream` and fill it with its tag there.
    Alloc { stream: usize, mib: usize },
    /// Check a live buffer's tag on its stream and free it.
    Free { pick: usize },
    /// Read a live buffer on another stream and `record_stream` it there.
    UseOn { pick: usize, stream: usize },
    /// Hold a stream up for a while (the GPU lagging behind).
    Stall { stream: usize, ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 1..40usize).prop_map(|(stream, mib)| Op::Alloc { stream, mib }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (any::<usize>(), 0..3usize).prop_map(|(pick, stream)| Op::UseOn { pick, stream }),
        1 => (0..3usize, 0..4u64).prop_map(|(stream, ms)| Op::Stall { stream, ms }),
    ]
}

struct Live {
    ptr: usize,
    len: usize,
    tag: u8,
    stream: Stream,
}

/// A host task checking that `len` bytes at `ptr` all hold `tag`; counts failures.
fn check_task(
    ptr: usize,
    len: usize,
    tag: u8,
    failures: &Arc<AtomicUsize>,
) -> Arc<dyn Fn() + Send + Sync> {
    let failures = failures.clone();
    Arc::new(move || {
        // SAFETY: the buffer is live until the free queued after this task, in stream order
        // on its own stream, or recorded on this one with `record_stream`.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        // (a slice comparison is a memcmp, fast in debug builds too)
        if bytes != vec![tag; len].as_slice() {
            failures.fetch_add(1, Ordering::Relaxed);
        }
    })
}

fn run(ops: &[Op]) -> (usize, accelrt::alloc::MemoryStats) {
    let rt: Runtime<HostDriver> = Runtime::with_driver(HostDriver::with_devices(1).unwrap());
    let alloc = rt.allocator(0).unwrap();
    let streams: Vec<Stream> = (0..3)
        .map(|_| rt.new_stream(0, StreamPriority::Normal).unwrap())
        .collect();
    let failures = Arc::new(AtomicUsize::new(0));
    let mut live: Vec<Live> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Alloc { stream, mib } => {
                let s = streams[stream];
                let len = mib * MIB - 4096 * (i % 3);
                let ptr = alloc.raw_alloc(len, s).unwrap();
                let tag = (i % 251) as u8 + 1;
                rt.launch_host(
                    s,
                    Arc::new(move || {
                        // SAFETY: a live buffer of `len` bytes, written on its stream.
                        unsafe { std::ptr::write_bytes(ptr as *mut u8, tag, len) }
                    }),
                )
                .unwrap();
                live.push(Live {
                    ptr,
                    len,
                    tag,
                    stream: s,
                });
            }
            Op::Free { pick } if !live.is_empty() => {
                let b = live.swap_remove(pick % live.len());
                rt.launch_host(b.stream, check_task(b.ptr, b.len, b.tag, &failures))
                    .unwrap();
                alloc.raw_free(b.ptr).unwrap();
            }
            Op::UseOn { pick, stream } if !live.is_empty() => {
                let b = &live[pick % live.len()];
                let other = streams[stream];
                if other != b.stream {
                    // The reader must see the writer's bytes: order it after them.
                    let ev = rt.event_acquire(0, false).unwrap();
                    rt.event_record(ev, b.stream).unwrap();
                    rt.event_wait(ev, other).unwrap();
                    rt.event_release(ev).unwrap();
                    rt.launch_host(other, check_task(b.ptr, b.len, b.tag, &failures))
                        .unwrap();
                    alloc.record_stream(b.ptr, other).unwrap();
                }
            }
            Op::Stall { stream, ms } => {
                rt.launch_host(
                    streams[stream],
                    Arc::new(move || std::thread::sleep(Duration::from_millis(ms))),
                )
                .unwrap();
            }
            _ => {}
        }
    }
    for b in live {
        rt.launch_host(b.stream, check_task(b.ptr, b.len, b.tag, &failures))
            .unwrap();
        alloc.raw_free(b.ptr).unwrap();
    }
    rt.device_synchronize(0).unwrap();
    alloc.check_invariants().unwrap();
    let stats = alloc.stats();
    alloc.empty_cache().unwrap();
    assert_eq!(alloc.reserved_bytes(), 0, "everything goes back");
    (failures.load(Ordering::Relaxed), stats)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Random allocations, frees and cross-stream uses on three lagging streams: every buffer
    /// reads back its own bytes, however its memory moved.
    #[test]
    fn moved_memory_never_corrupts_data_across_streams(ops in prop::collection::vec(op(), 1..90)) {
        let (failures, _) = run(&ops);
        prop_assert_eq!(failures, 0);
    }
}

/// Memory idle in another stream's pool moves only behind a fence recorded on that stream,
/// and the requesting stream is ordered after the fence on the device: the host never waits.
/// Without that ordering, stream b's write below would land while stream a still reads the
/// old buffer.
#[test]
fn a_move_from_another_stream_orders_on_the_device() {
    let rt: Runtime<HostDriver> = Runtime::with_driver(HostDriver::with_devices(1).unwrap());
    let alloc = rt.allocator(0).unwrap();
    let (a, b) = (
        rt.new_stream(0, StreamPriority::Normal).unwrap(),
        rt.new_stream(0, StreamPriority::Normal).unwrap(),
    );
    let failures = Arc::new(AtomicUsize::new(0));
    // 40 MiB and a page's tail: its last page, shared with what may follow, gets a chunk of
    // its own, which the small block below takes, leaving the 20-page chunk to move to b.
    let x = alloc.raw_alloc(40 * MIB + 4096, a).unwrap();
    rt.launch_host(
        a,
        Arc::new(move || {
            // SAFETY: x is live and written on its stream.
            unsafe { std::ptr::write_bytes(x as *mut u8, 0xA1, 40 * MIB) }
        }),
    )
    .unwrap();
    // Stream a stays busy until the gate opens (or a long patience passes).
    let gate = Gate::new();
    rt.launch_host(a, gate.task()).unwrap();
    rt.launch_host(a, check_task(x, 40 * MIB, 0xA1, &failures))
        .unwrap();
    alloc.raw_free(x).unwrap();
    // A slow path on a (its first small block) records a fence there, after x's free.
    let small = alloc.raw_alloc(4096, a).unwrap();
    // b grows past the peak: x's memory moves to b behind a's fence, without waiting: the
    // allocation returns while stream a is still held at its gate (a host wait for a's fence
    // would never return before the gate's patience ran out).
    let z = alloc.raw_alloc(100 * MIB, b).unwrap();
    assert!(!rt.stream_query(a).unwrap(), "the host waited for stream a");
    let st = alloc.stats();
    assert!(
        st.counters.num_pages_remapped >= 20,
        "x's memory moved: {:?}",
        st.counters
    );
    assert!(
        st.driver_calls.event_wait >= 1,
        "b waits on the device: {:?}",
        st.driver_calls
    );
    rt.launch_host(
        b,
        Arc::new(move || {
            // SAFETY: z is live and written on its stream.
            unsafe { std::ptr::write_bytes(z as *mut u8, 0xB2, 100 * MIB) }
        }),
    )
    .unwrap();
    rt.launch_host(b, check_task(z, 100 * MIB, 0xB2, &failures))
        .unwrap();
    // Only now may stream a go on: without the device-side wait, b's write above would
    // already have landed in the memory a is about to check.
    gate.open();
    rt.device_synchronize(0).unwrap();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "a read its bytes, b its own"
    );
    alloc.raw_free(z).unwrap();
    alloc.raw_free(small).unwrap();
    alloc.check_invariants().unwrap();
}

#[test]
fn a_failed_driver_call_mid_move_leaves_the_allocator_consistent() {
    let dev = Device {
        kind: DeviceType::Host,
        index: 0,
    };
    let s = Stream {
        device: dev,
        index: 0,
    };
    let flaky = TestMemory::new();
    let config = AllocatorConfig {
        debug_checks: true,
        ..AllocatorConfig::default()
    };
    let a = CachingAllocator::new(dev, flaky.clone(), None, config).unwrap();
    let x = a.raw_alloc(64 * MIB, s).unwrap();
    let y = a.raw_alloc(64 * MIB, s).unwrap();
    a.raw_free(x).unwrap();
    // The next allocation moves x's memory and must map it: the map fails.
    flaky.fail_map.store(true, Ordering::Relaxed);
    let err = a.raw_alloc(96 * MIB, s).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("mapping device memory") && msg.contains("cuMemMap"),
        "{msg}"
    );
    assert!(
        matches!(
            err,
            AllocError::Driver {
                code: Some(700),
                ..
            }
        ),
        "the driver's code is kept: {err:?}"
    );
    a.check_invariants().unwrap();
    // Creating fails too: still consistent, and the error names the call.
    flaky.fail_map.store(false, Ordering::Relaxed);
    flaky.fail_create.store(true, Ordering::Relaxed);
    let err = a.raw_alloc(300 * MIB, s).unwrap_err();
    assert!(err.to_string().contains("cuMemCreate"), "{err}");
    assert!(
        matches!(err, AllocError::Driver { code: Some(1), .. }),
        "{err:?}"
    );
    a.check_invariants().unwrap();
    // Healthy again: everything works and everything goes back.
    flaky.fail_create.store(false, Ordering::Relaxed);
    let z = a.raw_alloc(96 * MIB, s).unwrap();
    // SAFETY: z is a live 96 MiB host buffer.
    unsafe { std::ptr::write_bytes(z as *mut u8, 1, 96 * MIB) };
    a.raw_free(y).unwrap();
    a.raw_free(z).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.reserved_bytes(), 0);
    assert_eq!(flaky.driver_allocated(), 0);
}
