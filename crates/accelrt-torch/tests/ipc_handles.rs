//! The VMM IPC handle format: what `encode` writes, `decode` reads back, and every malformed
//! handle (from another process, so untrusted) is rejected with the reason before anything is
//! opened: wrong length, magic, kind, version, chunk counts, sizes, overflow, pid, device.

use std::ffi::CStr;
use std::ptr::null_mut;

use accelrt::DeviceType;
use accelrt_torch::ipc::{decode, encode, Handle, HandleChunk, HEADER_BYTES, MAX_CHUNKS};
use accelrt_torch::*;

const MIB: u64 = 1 << 20;

fn handle() -> Handle {
    Handle {
        device: 0,
        pid: 4242,
        offset: 3 * MIB,
        len: 60 * MIB,
        span: 66 * MIB,
        chunks: vec![
            HandleChunk {
                fd: 17,
                bytes: 2 * MIB,
                at: 0,
            },
            HandleChunk {
                fd: 18,
                bytes: 64 * MIB,
                at: 2 * MIB,
            },
        ],
    }
}

fn rejected(b: &[u8], words: &str) {
    let e = decode(b).expect_err("must be rejected");
    assert!(e.contains(words), "{words:?} not in {e}");
}

#[test]
fn a_handle_reads_back_as_written() {
    let h = handle();
    let b = encode(&h);
    assert_eq!(b.len(), HEADER_BYTES + 24 * 2);
    assert_eq!(&b[..5], b"ACRTV");
    assert_eq!(decode(&b).unwrap(), h);
}

#[test]
fn malformed_handles_are_rejected_with_the_reason() {
    let good = encode(&handle());
    rejected(&[], "shorter than");
    rejected(&good[..HEADER_BYTES - 1], "shorter than");
    rejected(&good[..good.len() - 1], "need exactly");
    let mut longer = good.clone();
    longer.push(0);
    rejected(&longer, "need exactly");
    let edit = |f: &dyn Fn(&mut Handle)| {
        let mut h = handle();
        f(&mut h);
        encode(&h)
    };
    let mut b = good.clone();
    b[0] = b'X';
    rejected(&b, "ACRT V");
    let mut b = good.clone();
    b[4] = b'P';
    rejected(&b, "ACRT V");
    let mut b = good.clone();
    b[5] = 9;
    rejected(&b, "version 9");
    rejected(&edit(&|h| h.pid = 0), "pid 0");
    rejected(&edit(&|h| h.pid = -5), "pid -5");
    rejected(&edit(&|h| h.device = -1), "device -1");
    rejected(&edit(&|h| h.chunks.clear()), "0 chunks");
    rejected(&edit(&|h| h.chunks[0].fd = -1), "chunk 0");
    rejected(&edit(&|h| h.chunks[1].bytes = 0), "chunk 1");
    rejected(&edit(&|h| h.chunks[1].at = 4 * MIB), "not the next one");
    rejected(&edit(&|h| h.span = 65 * MIB), "add up to");
    rejected(&edit(&|h| h.len = 0), "do not lie in");
    rejected(&edit(&|h| h.offset = 66 * MIB), "do not lie in");
    rejected(&edit(&|h| h.offset = u64::MAX), "do not lie in");
    rejected(&edit(&|h| h.len = u64::MAX), "do not lie in");
    rejected(
        &edit(&|h| {
            h.chunks[0].bytes = u64::MAX;
            h.chunks[1].at = u64::MAX;
        }),
        "overflow",
    );
    // A count larger than allowed, or than the bytes there: rejected without allocating.
    let mut b = good.clone();
    b[40..44].copy_from_slice(&((MAX_CHUNKS as u32) + 1).to_le_bytes());
    rejected(&b, "chunks (1 to");
    let mut b = good.clone();
    b[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
    rejected(&b, "chunks (1 to");
    let mut b = good.clone();
    b[40..44].copy_from_slice(&3u32.to_le_bytes());
    rejected(&b, "need exactly");
}

#[test]
fn the_c_abi_rejects_malformed_handles_before_opening_anything() {
    use_backend(DeviceType::Host).expect("these tests use the host backend");
    let last = || {
        // SAFETY: the library returns a NUL-terminated string valid until the next error.
        unsafe { CStr::from_ptr(accelrt_torch_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    let mut b = encode(&handle());
    b.truncate(30);
    let mut out = null_mut();
    // SAFETY: `b` is a live buffer of its length; `out` a live local.
    let rc = unsafe { ipc::accelrt_torch_ipc_open(0, b.as_ptr(), b.len(), &mut out) };
    assert_eq!(rc, -1);
    assert!(last().contains("shorter than"), "{}", last());
    assert!(out.is_null(), "nothing written on failure");
    let b = encode(&Handle {
        device: 3,
        ..handle()
    });
    // SAFETY: as above.
    let rc = unsafe { ipc::accelrt_torch_ipc_open(0, b.as_ptr(), b.len(), &mut out) };
    assert_eq!(rc, -1);
    assert!(last().contains("device 3"), "{}", last());
    // SAFETY: NULL out is refused before any write.
    let rc = unsafe { ipc::accelrt_torch_ipc_open(0, b.as_ptr(), b.len(), null_mut()) };
    assert_eq!(rc, -1);
    assert!(last().contains("NULL"), "{}", last());
    // A handle naming a process that does not exist: pidfd_open says so.
    let b = encode(&Handle {
        pid: i32::MAX - 7,
        ..handle()
    });
    // SAFETY: as above.
    let rc = unsafe { ipc::accelrt_torch_ipc_open(0, b.as_ptr(), b.len(), &mut out) };
    assert_eq!(rc, -1);
    assert!(last().contains("pidfd_open"), "{}", last());
}
