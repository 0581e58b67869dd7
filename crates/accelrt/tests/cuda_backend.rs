//! The CUDA backend on a real GPU: devices, streams (priorities, native handles, wrapping a
//! stream made elsewhere), events (wait, notify), host tasks, device synchronize, pinned
//! memory, peer access (virtual memory: `cuda_vmm.rs`). Without a GPU: the backend is unavailable, says why,
//! and no call panics.
#![cfg(feature = "cuda")]

mod cuda_common;

use accelrt::DeviceError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use accelrt::backend::cuda::CudaDriver;
use accelrt::driver::Driver;
use accelrt::{Backend, DeviceType, Error, StreamPriority};
use cuda_common::{device_errors_exclusive, device_errors_shared, gpu, read_u32};

#[test]
fn without_a_gpu_every_call_answers_with_the_reason() {
    let _shared = device_errors_shared();
    let cuda = accelrt::backend(DeviceType::Cuda);
    if cuda.is_available() {
        eprintln!("skipping without_a_gpu_every_call_answers_with_the_reason: a GPU is present");
        return;
    }
    let reason = cuda.unavailable_reason().expect("a reason");
    assert!(!reason.is_empty());
    assert_eq!(cuda.device_count(), 0);
    assert!(!cuda.has_primary_context(0));
    assert!(!cuda.is_pinned_ptr(0x1000));
    // Every call names itself and gives the reason (runtime/hooks_host.rs checks every hook).
    let unavailable = |call: &str, e: Error| {
        assert!(
            matches!(&e, Error::Device(DeviceError::NeedsBackend { call: c, needs: DeviceType::Cuda, reason: r }) if *c == call && *r == reason),
            "{call}: {e}"
        );
    };
    unavailable("init", cuda.init().unwrap_err());
    unavailable("current_device", cuda.current_device().unwrap_err());
    unavailable("set_device", cuda.set_device(0).unwrap_err());
    unavailable("device_properties", cuda.device_properties(0).unwrap_err());
    unavailable("default_stream", cuda.default_stream(0).unwrap_err());
    unavailable(
        "new_stream",
        cuda.new_stream(0, StreamPriority::High).unwrap_err(),
    );
    unavailable("event_acquire", cuda.event_acquire(0, true).unwrap_err());
    unavailable("allocator", cuda.allocator(0).unwrap_err());
    unavailable("pinned_allocator", cuda.pinned_allocator().unwrap_err());
    unavailable(
        "memory_provider",
        cuda.memory_provider(0).err().expect("an error"),
    );
    unavailable("graph_create", cuda.graph_create(0).unwrap_err());
    unavailable(
        "device_synchronize",
        cuda.device_synchronize(0).unwrap_err(),
    );
    unavailable(
        "profiler_start_trace",
        cuda.profiler_start_trace(accelrt::profiler::ProfilerMode::ALL, false)
            .unwrap_err(),
    );
    // SAFETY: the backend is unavailable, so the handle is never used.
    unavailable(
        "wrap_external_stream",
        unsafe { cuda.wrap_external_stream(0, 0x1234) }.unwrap_err(),
    );
    assert!(cuda.show_config().contains("unavailable"));
    // Probing again gives the same answer (and still no panic).
    assert_eq!(CudaDriver::probe().err(), Some(reason));
}

#[test]
fn devices_and_properties() {
    let _shared = device_errors_shared();
    let Some(rt) = gpu("devices_and_properties") else {
        return;
    };
    let n = rt.device_count();
    assert!(n >= 1);
    for d in 0..n {
        let p = rt.device_properties(d).unwrap();
        eprintln!(
            "cuda:{d}: {} {} GiB, {} SMs, capability {}.{}, L2 {} MiB",
            p.name,
            p.total_memory >> 30,
            p.multiprocessor_count,
            p.capability.0,
            p.capability.1,
            p.l2_cache_bytes >> 20
        );
        assert!(!p.name.is_empty());
        assert!(p.total_memory > 1 << 30);
        assert!(p.multiprocessor_count > 0);
        assert!(p.capability.0 >= 5);
        assert!(p.l2_cache_bytes > 0);
        assert!(!p.host_visible_memory);
        assert_eq!(rt.device_capability(d).unwrap(), p.capability);
    }
    let err = rt.device_properties(n).unwrap_err();
    assert!(
        matches!(err, Error::Device(DeviceError::InvalidDevice { .. })),
        "{err}"
    );
    let (major, minor) = rt.runtime_version().unwrap();
    eprintln!("driver API {major}.{minor}");
    assert!(rt.runtime_version_at_least(12, 8).unwrap());
    assert!(!rt.runtime_version_at_least(99, 0).unwrap());
    rt.init().unwrap();
    rt.default_stream(0).unwrap();
    assert!(rt.has_primary_context(0));
    assert!(rt.show_config().contains("cuda:0"));
}

#[test]
fn streams_priorities_handles_and_wrapping() {
    let _shared = device_errors_shared();
    let Some(rt) = gpu("streams_priorities_handles_and_wrapping") else {
        return;
    };
    let default = rt.default_stream(0).unwrap();
    assert_eq!(rt.stream_native_handle(default).unwrap(), 0);
    let normal = rt.stream_from_pool(0, StreamPriority::Normal).unwrap();
    let high = rt.stream_from_pool(0, StreamPriority::High).unwrap();
    let own = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let handles: Vec<u64> = [normal, high, own]
        .iter()
        .map(|s| rt.stream_native_handle(*s).unwrap())
        .collect();
    assert!(handles.iter().all(|&h| h != 0), "{handles:?}");
    assert_ne!(handles[0], handles[1]);

    // Work on every kind of stream, checked by data.
    let alloc = rt.allocator(0).unwrap();
    for (i, s) in [default, normal, high, own].into_iter().enumerate() {
        let buf = alloc.raw_alloc(4096, s).unwrap();
        // SAFETY: `buf` is ours, used on `s` until freed after the synchronize.
        rt.with_stream(s, |d, raw| unsafe {
            d.fill_u32(raw, buf, 1024, 40 + i as u32)
        })
        .unwrap();
        rt.stream_synchronize(s).unwrap();
        if s != default {
            // (The legacy default stream also carries the synchronous copies of tests running
            // alongside, so it may be busy again already.)
            assert!(rt.stream_query(s).unwrap());
        }
        assert!(read_u32(rt, 0, buf, 1024)
            .iter()
            .all(|&w| w == 40 + i as u32));
        alloc.raw_free(buf).unwrap();
    }

    // A stream created elsewhere (here: by a second driver, standing in for PyTorch) is used
    // without being owned.
    let other = CudaDriver::probe().unwrap();
    let foreign = other
        .stream_create(0, StreamPriority::Normal, false)
        .unwrap();
    let handle = other.stream_native_handle(&foreign);
    // SAFETY: `foreign` is a live stream of device 0's primary context and outlives every use
    // of the wrapped handle in this test.
    let wrapped = unsafe { rt.wrap_external_stream(0, handle) }.unwrap();
    assert_eq!(
        // SAFETY: as above.
        unsafe { rt.wrap_external_stream(0, handle) }.unwrap(),
        wrapped
    );
    // SAFETY: handle 0 is the default stream.
    assert_eq!(unsafe { rt.wrap_external_stream(0, 0) }.unwrap(), default);
    assert_eq!(rt.stream_native_handle(wrapped).unwrap(), handle);
    let buf = alloc.raw_alloc(4096, wrapped).unwrap();
    // SAFETY: `buf` is ours, used on the wrapped stream until freed after the synchronize.
    rt.with_stream(wrapped, |d, raw| unsafe { d.fill_u32(raw, buf, 1024, 99) })
        .unwrap();
    rt.stream_synchronize(wrapped).unwrap();
    assert!(read_u32(rt, 0, buf, 1024).iter().all(|&w| w == 99));
    alloc.raw_free(buf).unwrap();
    // The owner's stream still works after our use (we did not destroy it).
    other.stream_synchronize(&foreign).unwrap();
    if rt.device_count() > 1 {
        // SAFETY: the handle is live; wrapping on the wrong device is refused before use.
        let err = unsafe { rt.wrap_external_stream(1, handle) }.unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }
    drop(foreign);
}

#[test]
fn events_order_streams_and_notify_after_completion() {
    let _shared = device_errors_shared();
    let Some(rt) = gpu("events_order_streams_and_notify_after_completion") else {
        return;
    };
    let a = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let b = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let alloc = rt.allocator(0).unwrap();
    const WORDS: usize = 1 << 16;
    let buf = alloc.raw_alloc(WORDS * 4, a).unwrap();

    // B writes 7 after 20 ms; A waits for B's event, then adds 1: 8 everywhere.
    // SAFETY: `buf` is ours; B's and A's work are ordered by the event; freed after sync.
    rt.with_stream(b, |d, raw| unsafe {
        d.spin_then_fill(raw, buf, WORDS, 7, Duration::from_millis(20))
    })
    .unwrap();
    let id = rt.event_acquire(0, false).unwrap();
    rt.event_record(id, b).unwrap();
    assert!(!rt.event_query(id).unwrap());
    rt.event_wait(id, a).unwrap();
    // SAFETY: as above.
    rt.with_stream(a, |d, raw| unsafe { d.add_u32(raw, buf, WORDS, 1) })
        .unwrap();

    // The callback runs once the event completes, on a thread that may call CUDA.
    let (tx, rx) = mpsc::channel();
    rt.event_notify(
        id,
        Box::new(move || {
            let rt = accelrt::registry::cuda();
            let done = rt.event_query(id);
            let s = rt.default_stream(0).unwrap();
            let scratch = rt.allocator(0).and_then(|al| {
                let p = al.raw_alloc(512, s)?;
                Ok(al.raw_free(p)?)
            });
            let _ = tx.send((done.map_err(|e| e.to_string()), scratch.is_ok()));
        }),
    )
    .unwrap();
    assert!(
        rx.try_recv().is_err(),
        "the callback ran before the event completed"
    );
    let (done, allocated) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(done, Ok(true));
    assert!(allocated, "the callback could not use the allocator");

    rt.stream_synchronize(a).unwrap();
    let words = read_u32(rt, 0, buf, WORDS);
    assert!(
        words.iter().all(|&w| w == 8),
        "first words {:?}",
        &words[..4]
    );
    rt.event_release(id).unwrap();
    alloc.raw_free(buf).unwrap();
    rt.device_synchronize(0).unwrap();
}

#[test]
fn host_tasks_run_in_stream_order_and_panics_are_reported() {
    let _exclusive = device_errors_exclusive();
    let Some(rt) = gpu("host_tasks_run_in_stream_order_and_panics_are_reported") else {
        return;
    };
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    rt.with_stream(s, |d, raw| d.spin(raw, Duration::from_millis(20)))
        .unwrap();
    let ran = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&ran);
    rt.launch_host(s, Arc::new(move || flag.store(true, Ordering::SeqCst)))
        .unwrap();
    assert!(
        !ran.load(Ordering::SeqCst),
        "the task ran before the kernel"
    );
    rt.stream_synchronize(s).unwrap();
    assert!(ran.load(Ordering::SeqCst));

    // Waiting from inside a task is refused with a reason, not a deadlock.
    let seen = Arc::new(Mutex::new(String::new()));
    let out = Arc::clone(&seen);
    rt.launch_host(
        s,
        Arc::new(move || {
            let rt = accelrt::registry::cuda();
            let e = rt.stream_synchronize(s).unwrap_err();
            *out.lock().unwrap() = e.to_string();
        }),
    )
    .unwrap();
    rt.stream_synchronize(s).unwrap();
    assert!(
        seen.lock().unwrap().contains("inside a host task"),
        "{}",
        seen.lock().unwrap()
    );

    // A panicking task is reported by the next synchronize, once.
    rt.launch_host(s, Arc::new(|| panic!("task failed on purpose")))
        .unwrap();
    let err = rt.stream_synchronize(s).unwrap_err();
    assert!(err.to_string().contains("task failed on purpose"), "{err}");
    rt.stream_synchronize(s).unwrap();
}

#[test]
fn pinned_memory_is_host_visible_and_copies_both_ways() {
    let _shared = device_errors_shared();
    let Some(rt) = gpu("pinned_memory_is_host_visible_and_copies_both_ways") else {
        return;
    };
    let pinned = rt.pinned_allocator().unwrap();
    let s = rt.default_stream(0).unwrap();
    const BYTES: usize = 1 << 20;
    let host = pinned.allocate(BYTES).unwrap();
    assert!(rt.is_pinned_ptr(host));
    assert!(rt.is_pinned_ptr(host + BYTES - 1));
    let on_stack = 0u64;
    assert!(!rt.is_pinned_ptr(&on_stack as *const u64 as usize));
    // SAFETY: `host` is a live pinned allocation of BYTES bytes owned by this test.
    let slice = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, BYTES) };
    for (i, b) in slice.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let alloc = rt.allocator(0).unwrap();
    let dev = alloc.raw_alloc(BYTES, s).unwrap();
    let driver = rt.driver().unwrap();
    // SAFETY: `dev` is ours and idle; `slice` is valid host memory of BYTES bytes.
    unsafe { driver.copy_to_device(0, dev, slice) }.unwrap();
    slice.fill(0);
    // SAFETY: as above.
    unsafe { driver.copy_to_host(0, slice, dev) }.unwrap();
    assert!(slice.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    alloc.raw_free(dev).unwrap();
    // Used by work on a CUDA stream: the block waits for that stream before reuse.
    let copy_stream = rt.new_stream(0, StreamPriority::Normal).unwrap();
    pinned.record_stream(host, copy_stream).unwrap();
    pinned.free(host).unwrap();
    rt.stream_synchronize(copy_stream).unwrap();
}

#[test]
fn peer_access_between_devices() {
    let _shared = device_errors_shared();
    let Some(rt) = gpu("peer_access_between_devices") else {
        return;
    };
    let driver = rt.driver().unwrap();
    driver.enable_peer_access(0, 0).unwrap();
    if rt.device_count() < 2 {
        eprintln!("peer_access_between_devices: one device, only the trivial case checked");
        return;
    }
    if !driver.can_access_peer(0, 1).unwrap() {
        let err = driver.enable_peer_access(0, 1).unwrap_err();
        assert!(err.to_string().contains("peer"), "{err}");
        return;
    }
    driver.enable_peer_access(0, 1).unwrap();
    driver.enable_peer_access(0, 1).unwrap();
    // A kernel on device 0 writes device 1's memory.
    let s0 = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let s1 = rt.new_stream(1, StreamPriority::Normal).unwrap();
    let a1 = rt.allocator(1).unwrap();
    let buf = a1.raw_alloc(4096, s1).unwrap();
    // SAFETY: `buf` is device 1's memory, ours, reachable from device 0 after peer access.
    rt.with_stream(s0, |d, raw| unsafe { d.fill_u32(raw, buf, 1024, 0xBEEF) })
        .unwrap();
    rt.stream_synchronize(s0).unwrap();
    assert!(read_u32(rt, 1, buf, 1024).iter().all(|&w| w == 0xBEEF));
    a1.raw_free(buf).unwrap();
}

#[test]
fn memcpy_async_copies_in_stream_order_and_checks_its_ranges() {
    let _shared = device_errors_shared();
    let Some(rt) = gpu("memcpy_async_copies_in_stream_order_and_checks_its_ranges") else {
        return;
    };
    // Device 0 to device 0 (and 0 to 1 when there are two): the same driver call either way.
    let other = u32::from(rt.device_count() > 1);
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let (a0, a1) = (rt.allocator(0).unwrap(), rt.allocator(other).unwrap());
    let src = a0.raw_alloc(1 << 20, s).unwrap();
    let s_other = rt.default_stream(other).unwrap();
    let dst = a1.raw_alloc(1 << 20, s_other).unwrap();
    // SAFETY: our own device buffer of 1 MiB on its own device's stream.
    rt.with_stream(s_other, |d, raw| unsafe {
        d.fill_u32(raw, dst, 1 << 18, 0)
    })
    .unwrap();
    rt.stream_synchronize(s_other).unwrap();
    // SAFETY: as above.
    rt.with_stream(s, |d, raw| unsafe {
        d.fill_u32(raw, src, 1 << 18, 0xC0FFEE)
    })
    .unwrap();
    // Queued after the fills on the same stream: it sees them.
    rt.memcpy_async(dst + 4096, other, src, 0, 8192, s).unwrap();
    rt.stream_synchronize(s).unwrap();
    let words = read_u32(rt, other, dst, 4096);
    assert!(words[..1024].iter().all(|&w| w == 0), "before the range");
    assert!(
        words[1024..3072].iter().all(|&w| w == 0xC0FFEE),
        "the range"
    );
    assert!(words[3072..].iter().all(|&w| w == 0), "after the range");
    let err = rt
        .memcpy_async(dst, other, src, 0, (2 << 20) + 1, s)
        .unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    a0.raw_free(src).unwrap();
    a1.raw_free(dst).unwrap();
}

#[test]
fn one_allocator_per_device_and_memory_info() {
    let _shared = device_errors_shared();
    let Some(rt) = gpu("one_allocator_per_device_and_memory_info") else {
        return;
    };
    let provider = rt.memory_provider(0).unwrap();
    let (free, total) = provider.memory_info();
    assert!(free > 0 && free <= total, "{free} / {total}");
    assert!(!provider.host_visible());
    for d in 0..rt.device_count() {
        let a = rt.allocator(d).unwrap();
        assert_eq!(a.device().index, d);
        assert!(Arc::ptr_eq(&a, &rt.allocator(d).unwrap()));
    }
    assert!(rt.allocator(rt.device_count()).is_err());
}
