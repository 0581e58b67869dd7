//! The hooks on a real GPU, beyond the conformance suite (`cuda_conformance.rs`): keep_graph
//! and instantiation as the driver sees them, a captured fork/join of kernels, scalar
//! buffers written in stream order, device memory figures, pointers the allocator does not
//! know, completion times against a timed kernel.
#![cfg(feature = "cuda")]

mod cuda_common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use accelrt::{Backend, Device, DeviceType, MempoolId, StreamPriority};
use cuda_common::{device_errors_shared, gpu, read_u32};

#[test]
fn keep_graph_keeps_the_captured_graph_and_instantiates_on_request() {
    let _shared = device_errors_shared();
    let Some(rt) = gpu("keep_graph_keeps_the_captured_graph_and_instantiates_on_request") else {
        return;
    };
    const WORDS: usize = 4096;
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let alloc = rt.allocator(0).unwrap();
    let buf = alloc.raw_alloc(WORDS * 4, s).unwrap();
    // (keep_graph, kernels captured)
    for (keep, kernels) in [(true, 3usize), (false, 2)] {
        // SAFETY: `buf` is ours, used on `s` only.
        rt.with_stream(s, |d, raw| unsafe { d.memset_u32(raw, buf, WORDS, 0) })
            .unwrap();
        let g = rt.graph_create_with(0, keep).unwrap();
        rt.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
        for _ in 0..kernels {
            // SAFETY: as above; replays run while `buf` is live.
            rt.with_stream(s, |d, raw| unsafe { d.add_u32(raw, buf, WORDS, 1) })
                .unwrap();
        }
        rt.graph_capture_end(g).unwrap();
        let (instantiated, has_template) = rt
            .with_graph(g, |_, cg| Ok((cg.is_instantiated(), cg.has_template())))
            .unwrap();
        assert_eq!(
            (instantiated, has_template),
            (!keep, keep),
            "keep_graph={keep}: after capture end"
        );
        let nodes = rt.with_graph(g, |_, cg| cg.node_count());
        if keep {
            assert_eq!(nodes.unwrap(), kernels, "the kept graph has its kernels");
            rt.graph_instantiate(g).unwrap();
            let state = rt
                .with_graph(g, |_, cg| Ok((cg.is_instantiated(), cg.has_template())))
                .unwrap();
            assert_eq!(state, (true, true), "instantiated, and still kept");
        } else {
            let err = nodes.unwrap_err().to_string();
            assert!(err.contains("created without keep_graph"), "{err}");
        }
        for _ in 0..4 {
            rt.graph_replay(g).unwrap();
        }
        rt.stream_synchronize(s).unwrap();
        let want = 4 * kernels as u32;
        assert!(
            read_u32(rt, 0, buf, WORDS).iter().all(|&w| w == want),
            "keep_graph={keep}: every word is {want}"
        );
        rt.graph_destroy(g).unwrap();
    }
    alloc.raw_free(buf).unwrap();
}

#[test]
fn a_captured_fork_and_join_of_kernels_replays_in_order() {
    let _shared = device_errors_shared();
    let Some(rt) = gpu("a_captured_fork_and_join_of_kernels_replays_in_order") else {
        return;
    };
    const WORDS: usize = 1 << 16;
    let (main, side) = (
        rt.new_stream(0, StreamPriority::Normal).unwrap(),
        rt.new_stream(0, StreamPriority::Normal).unwrap(),
    );
    let alloc = rt.allocator(0).unwrap();
    let buf = alloc.raw_alloc(WORDS * 4, main).unwrap();
    let (fork, join) = (
        rt.event_acquire(0, false).unwrap(),
        rt.event_acquire(0, false).unwrap(),
    );
    let g = rt.graph_create(0).unwrap();
    rt.graph_capture_begin(g, main, MempoolId::NONE).unwrap();
    // main: set to 5 (after a delay, so an unordered side kernel would run first) ...
    // SAFETY: `buf` is ours; the captured kernels run only in replays, while it is live.
    rt.with_stream(main, |d, raw| unsafe {
        d.spin_then_fill(raw, buf, WORDS, 5, Duration::from_millis(20))
    })
    .unwrap();
    rt.event_record(fork, main).unwrap();
    // side joins the capture, then adds 10 after main's fill ...
    rt.event_wait(fork, side).unwrap();
    // SAFETY: as above.
    rt.with_stream(side, |d, raw| unsafe { d.add_u32(raw, buf, WORDS, 10) })
        .unwrap();
    // A host task on the joined stream: the graph keeps it for its replays.
    let side_tasks = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&side_tasks);
    rt.launch_host(
        side,
        Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .unwrap();
    rt.event_record(join, side).unwrap();
    // ... and joins back; main adds 1 after side.
    rt.event_wait(join, main).unwrap();
    // SAFETY: as above.
    rt.with_stream(main, |d, raw| unsafe { d.add_u32(raw, buf, WORDS, 1) })
        .unwrap();
    rt.graph_capture_end(g).unwrap();
    assert_eq!(
        rt.with_graph(g, |_, cg| Ok(cg.host_tasks())),
        Ok(1),
        "the graph holds the joined stream's host task"
    );
    rt.stream_synchronize(side).unwrap();
    for _ in 0..3 {
        rt.graph_replay(g).unwrap();
        rt.stream_synchronize(main).unwrap();
        let words = read_u32(rt, 0, buf, WORDS);
        assert!(
            words.iter().all(|&w| w == 16),
            "fill 5, then +10 on the side stream, then +1: first words {:?}",
            &words[..4]
        );
    }
    assert_eq!(side_tasks.load(Ordering::SeqCst), 3, "once per replay");
    rt.graph_destroy(g).unwrap();
    for id in [fork, join] {
        rt.event_release(id).unwrap();
    }
    alloc.raw_free(buf).unwrap();
}

#[test]
fn scalar_buffers_are_written_after_queued_work_that_used_the_block() {
    let _shared = device_errors_shared();
    let Some(rt) = gpu("scalar_buffers_are_written_after_queued_work_that_used_the_block") else {
        return;
    };
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let alloc = rt.allocator(0).unwrap();
    let p = alloc.raw_alloc(4, s).unwrap();
    // A kernel queued on `s` writes the block late; the block is freed at once (same
    // stream: reusable), and the scalar buffer reuses it.
    // SAFETY: `p` is ours until freed; its reuse below is ordered after the kernel on `s`.
    rt.with_stream(s, |d, raw| unsafe {
        d.spin_then_fill(raw, p, 1, 0xDEAD, Duration::from_millis(50))
    })
    .unwrap();
    alloc.raw_free(p).unwrap();
    let q = rt
        .alloc_scalar_with_value(s, &0x1234_5678u32.to_ne_bytes())
        .unwrap();
    assert_eq!(q, p, "the freed block is reused on its stream");
    rt.stream_synchronize(s).unwrap();
    assert_eq!(
        read_u32(rt, 0, q, 1),
        [0x1234_5678],
        "the value was written after the kernel, in stream order"
    );
    alloc.raw_free(q).unwrap();
    // The allocator's host-side variant refuses CUDA memory and says what to use.
    let err = alloc.alloc_scalar_with_value(&[1, 2, 3, 4], s).unwrap_err();
    assert!(
        err.to_string().contains("Backend::alloc_scalar_with_value"),
        "{err}"
    );
    assert!(!alloc.is_shared_storage_supported());
}

#[test]
fn memory_figures_are_the_devices() {
    let _shared = device_errors_shared();
    let Some(rt) = gpu("memory_figures_are_the_devices") else {
        return;
    };
    rt.default_stream(0).unwrap(); // opens the device
    let props = rt.device_properties(0).unwrap();
    assert_eq!(props.max_threads_per_group, 1024);
    let recommended = rt.recommended_max_memory(0).unwrap();
    assert_eq!(
        props.recommended_max_memory, recommended,
        "once the device is open, its properties say the same"
    );
    assert!(
        recommended > 0 && recommended < props.total_memory,
        "{recommended}"
    );
    let provider = rt.memory_provider(0).unwrap();
    let (free, total) = provider.memory_info();
    let used = rt.driver_allocated_memory(0).unwrap();
    let expected = total - free;
    // Other processes may allocate meanwhile: within 256 MiB.
    assert!(
        used.abs_diff(expected) < 256 << 20,
        "used {used} vs total - free {expected}"
    );
    // A segment taken straight from the provider (not the allocator's) grows it.
    let seg = provider.allocate(64 << 20).unwrap();
    assert!(rt.driver_allocated_memory(0).unwrap() >= used + (32 << 20));
    assert_eq!(
        rt.device_from_ptr(seg + 4096),
        Ok(Device {
            kind: DeviceType::Cuda,
            index: 0
        }),
        "memory the allocator does not know: the driver's pointer attributes"
    );
    // SAFETY: `seg` came from this provider's allocate, unused by any work.
    unsafe { provider.free(seg, 64 << 20) };
}

#[test]
fn completion_times_match_a_timed_kernel() {
    let _shared = device_errors_shared();
    let Some(rt) = gpu("completion_times_match_a_timed_kernel") else {
        return;
    };
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let (start, end) = (
        rt.event_acquire(0, true).unwrap(),
        rt.event_acquire(0, true).unwrap(),
    );
    rt.event_record(start, s).unwrap();
    rt.with_stream(s, |d, raw| d.spin(raw, Duration::from_millis(30)))
        .unwrap();
    rt.event_record(end, s).unwrap();
    rt.event_synchronize(end).unwrap();
    let now = accelrt::event::clock_ms();
    let (t0, t1) = (
        rt.event_completion_time(start).unwrap(),
        rt.event_completion_time(end).unwrap(),
    );
    let elapsed = rt.event_elapsed_time(start, end).unwrap();
    eprintln!("completion times {t0:.3} / {t1:.3} ms, elapsed {elapsed:.3} ms, now {now:.3} ms");
    assert!(
        (29.0..200.0).contains(&elapsed),
        "a 30 ms kernel took {elapsed} ms"
    );
    assert!((t1 - t0 - elapsed).abs() < 0.5, "{t1} - {t0} vs {elapsed}");
    assert!(t1 <= now + 0.5, "completed before now: {t1} vs {now}");
    for id in [start, end] {
        rt.event_release(id).unwrap();
    }
}
