//! Several devices on the host backend: an allocator per device, peer access, copies between
//! devices in stream order, cross-device event waits, and bad input to all of them.

use crate::common;

use accelrt::DeviceError;
use std::sync::Arc;

use accelrt::hooks::Backend;
use accelrt::{Error, Stream, StreamPriority};
use common::{runtime, Gate};

/// Fill `len` bytes at `ptr` of host-device memory (host devices are host memory).
fn fill(rt: &dyn Backend, device: u32, ptr: usize, len: usize, byte: u8) {
    let a = rt.allocator(device).unwrap();
    let host = a.shared_host_ptr(ptr).unwrap();
    // SAFETY: `ptr` is a live allocation of at least `len` bytes of host-visible memory that
    // no queued work touches now (the callers synchronize first).
    unsafe { std::ptr::write_bytes(host, byte, len) };
}

fn read(rt: &dyn Backend, device: u32, ptr: usize, len: usize) -> Vec<u8> {
    let a = rt.allocator(device).unwrap();
    let host = a.shared_host_ptr(ptr).unwrap();
    // SAFETY: as in `fill`; reading only.
    unsafe { std::slice::from_raw_parts(host, len) }.to_vec()
}

fn stream(rt: &dyn Backend, device: u32) -> Stream {
    rt.new_stream(device, StreamPriority::Normal).unwrap()
}

#[test]
fn each_device_has_its_own_allocator_and_memory() {
    let rt = runtime(3);
    let ptrs: Vec<usize> = (0..3)
        .map(|d| {
            let s = stream(&rt, d);
            rt.allocator(d).unwrap().raw_alloc(1 << 20, s).unwrap()
        })
        .collect();
    for (d, &p) in ptrs.iter().enumerate() {
        assert_eq!(rt.device_from_ptr(p).unwrap().index, d as u32);
        // Freeing through another device's allocator is refused and changes nothing.
        let other = (d as u32 + 1) % 3;
        assert!(rt.allocator(other).unwrap().raw_free(p).is_err());
        assert_eq!(rt.current_allocated_memory(d as u32).unwrap(), 1 << 20);
    }
    for (d, &p) in ptrs.iter().enumerate() {
        rt.allocator(d as u32).unwrap().raw_free(p).unwrap();
    }
}

#[test]
fn peer_access_is_queried_enabled_once_and_per_direction() {
    let rt = runtime(3);
    // (device, peer, can access)
    for (d, p) in [(0, 0), (0, 1), (1, 0), (2, 1)] {
        assert!(rt.can_device_access_peer(d, p).unwrap(), "{d} -> {p}");
    }
    // A device always reaches itself; enabling that is a no-op.
    assert!(rt.is_peer_access_enabled(1, 1).unwrap());
    rt.enable_peer_access(1, 1).unwrap();
    assert!(!rt.is_peer_access_enabled(0, 1).unwrap());
    rt.enable_peer_access(0, 1).unwrap();
    rt.enable_peer_access(0, 1).unwrap();
    assert!(rt.is_peer_access_enabled(0, 1).unwrap());
    assert!(
        !rt.is_peer_access_enabled(1, 0).unwrap(),
        "one direction only"
    );
    for (d, p) in [(0, 3), (3, 0), (7, 7)] {
        let calls: [(&str, Result<(), Error>); 3] = [
            ("can", rt.can_device_access_peer(d, p).map(drop)),
            ("enable", rt.enable_peer_access(d, p)),
            ("is", rt.is_peer_access_enabled(d, p).map(drop)),
        ];
        for (what, r) in calls {
            match r {
                Err(Error::Device(DeviceError::InvalidDevice { index, count, .. })) => {
                    assert_eq!((index, count), (d.max(p), 3), "{what} {d} -> {p}")
                }
                other => panic!("{what} {d} -> {p}: {other:?}"),
            }
        }
    }
}

#[test]
fn a_copy_between_devices_runs_in_stream_order_after_a_cross_device_wait() {
    let rt = runtime(2);
    let (s0, s1) = (stream(&rt, 0), stream(&rt, 1));
    let (a0, a1) = (rt.allocator(0).unwrap(), rt.allocator(1).unwrap());
    let src = a0.raw_alloc(4096, s0).unwrap();
    let dst = a1.raw_alloc(4096, s1).unwrap();
    fill(&rt, 0, src, 4096, 0x11);
    fill(&rt, 1, dst, 4096, 0x00);
    // Device 0's stream is held at a gate, then writes 0xAB into the source; device 1's stream
    // waits for an event recorded after that write, then copies. Without the wait the copy
    // would run at once and see 0x11.
    let gate = Gate::new();
    rt.launch_host(s0, gate.task()).unwrap();
    let src_host = a0.shared_host_ptr(src).unwrap() as usize;
    rt.launch_host(
        s0,
        Arc::new(move || {
            // SAFETY: the source block stays allocated until after both streams synchronize.
            unsafe { std::ptr::write_bytes(src_host as *mut u8, 0xAB, 4096) }
        }),
    )
    .unwrap();
    let written = rt.event_acquire(0, false).unwrap();
    rt.event_record(written, s0).unwrap();
    rt.event_wait(written, s1).unwrap();
    // An interior range of the source into an interior range of the destination.
    rt.memcpy_async(dst + 512, 1, src + 256, 0, 1024, s1)
        .unwrap();
    assert!(!rt.stream_query(s1).unwrap(), "the copy waits for device 0");
    gate.open();
    rt.stream_synchronize(s1).unwrap();
    let got = read(&rt, 1, dst, 4096);
    assert!(
        got[..512].iter().all(|&b| b == 0),
        "before the copied range"
    );
    assert!(
        got[512..1536].iter().all(|&b| b == 0xAB),
        "the copied range"
    );
    assert!(
        got[1536..].iter().all(|&b| b == 0),
        "after the copied range"
    );
    // The same copy the other way, on the source device's stream.
    rt.memcpy_async(src, 0, dst + 512, 1, 16, s0).unwrap();
    rt.stream_synchronize(s0).unwrap();
    rt.event_release(written).unwrap();
    a0.raw_free(src).unwrap();
    a1.raw_free(dst).unwrap();
}

/// A copy to try: (what, dst, dst device, src, src device, bytes, stream, words the error has).
type Copy = (
    &'static str,
    usize,
    u32,
    usize,
    u32,
    usize,
    Stream,
    &'static str,
);

#[test]
fn bad_copies_are_refused_before_anything_is_queued() {
    let rt = runtime(3);
    let (s0, s1, s2) = (stream(&rt, 0), stream(&rt, 1), stream(&rt, 2));
    let (a0, a1) = (rt.allocator(0).unwrap(), rt.allocator(1).unwrap());
    let src = a0.raw_alloc(4096, s0).unwrap();
    let dst = a1.raw_alloc(4096, s1).unwrap();
    let freed = a1.raw_alloc(8192, s1).unwrap();
    a1.raw_free(freed).unwrap();
    let block = a1.block_size(dst).unwrap() as usize;
    let cases: [Copy; 7] = [
        (
            "past the end",
            dst,
            1,
            src,
            0,
            block + 1,
            s1,
            "past the end of its allocation",
        ),
        (
            "overflow",
            usize::MAX - 8,
            1,
            src,
            0,
            64,
            s1,
            "past the end of the address space",
        ),
        (
            "unknown pointer",
            0x10,
            1,
            src,
            0,
            16,
            s1,
            "not inside memory of this allocator",
        ),
        (
            "wrong device",
            src,
            1,
            dst,
            0,
            16,
            s1,
            "not inside memory of this allocator",
        ),
        ("freed", freed, 1, src, 0, 16, s1, "freed block"),
        (
            "third device's stream",
            dst,
            1,
            src,
            0,
            16,
            s2,
            "of neither device of the copy",
        ),
        (
            "no such device",
            dst,
            9,
            src,
            0,
            16,
            s1,
            "invalid device index 9",
        ),
    ];
    fill(&rt, 1, dst, 4096, 0x5A);
    for (what, d, dd, s, sd, n, st, words) in cases {
        let err = rt.memcpy_async(d, dd, s, sd, n, st).expect_err(what);
        assert!(err.to_string().contains(words), "{what}: {err}");
    }
    rt.stream_synchronize(s1).unwrap();
    assert!(
        read(&rt, 1, dst, 4096).iter().all(|&b| b == 0x5A),
        "nothing was copied"
    );
    // Zero bytes is a valid copy of nothing.
    rt.memcpy_async(dst, 1, src, 0, 0, s1).unwrap();
    a0.raw_free(src).unwrap();
    a1.raw_free(dst).unwrap();
}
