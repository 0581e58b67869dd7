//! Sharing accelrt memory between processes (`torch.multiprocessing`'s CUDA tensors).
//!
//! Plain segments (`cuMemAlloc`) are shared by the C++ shim with CUDA's own IPC handles
//! (`cudaIpcGetMemHandle` on the segment base, `cudaIpcOpenMemHandle` in the receiver): the
//! library only says where the segment is (`accelrt_torch_segment_of`).
//!
//! Expandable (VMM) memory is shared here. The CUDA provider creates chunks exportable as
//! POSIX file descriptors; [`accelrt_torch_ipc_share`] exports the chunks under a live block
//! (`CachingAllocator::export_range`), keeps the descriptors open while the block is live
//! (the sender keeps shared memory alive, as PyTorch's own allocator does;
//! [`accelrt_torch_ipc_forget`] closes them when the block is freed) and writes a handle:
//! the sender's pid, the descriptors' numbers in the sender, each chunk's size and place,
//! and where the shared bytes lie. [`accelrt_torch_ipc_open`] in the receiving process takes
//! the descriptors with `pidfd_open` + `pidfd_getfd` (Linux 5.6+; the same user, and ptrace
//! allowed), imports and maps them at a new range (`CachingAllocator::import_range`) and
//! returns where the shared bytes are; [`accelrt_torch_ipc_close`] unmaps and releases them.
//!
//! Handles come from another process: [`decode`] rejects any that is not exactly what
//! [`encode`] writes (length, counts, sizes, overflow, pid), before anything is opened.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use accelrt::alloc::{ExportedRange, ImportedRange};
use parking_lot::Mutex;

use crate::errors::{guard, Failure, Report};
use crate::state::state;
use crate::status;

/// The handle's first bytes: accelrt's magic and the kind (`P` is the shim's plain-segment
/// handle).
pub const MAGIC: &[u8; 4] = b"ACRT";
pub const KIND_VMM: u8 = b'V';
pub const VERSION: u8 = 1;
/// Bytes before the chunk entries.
pub const HEADER_BYTES: usize = 48;
/// Bytes per chunk entry.
pub const ENTRY_BYTES: usize = 24;
/// The most chunks one handle may name (a 128 GiB block of 2 MiB chunks).
pub const MAX_CHUNKS: usize = 1 << 16;

/// One chunk of a handle: its descriptor number in the sending process, size, and offset
/// from the first chunk's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandleChunk {
    pub fd: i32,
    pub bytes: u64,
    pub at: u64,
}

/// What a VMM IPC handle says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    pub device: i32,
    pub pid: i32,
    /// Where the shared bytes start, from the first chunk's start.
    pub offset: u64,
    /// Shared bytes.
    pub len: u64,
    /// Bytes of all chunks together.
    pub span: u64,
    pub chunks: Vec<HandleChunk>,
}

/// The bytes of `h` (little-endian; see the module docs for the fields).
pub fn encode(h: &Handle) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + ENTRY_BYTES * h.chunks.len());
    out.extend_from_slice(MAGIC);
    out.push(KIND_VMM);
    out.push(VERSION);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&h.device.to_le_bytes());
    out.extend_from_slice(&h.pid.to_le_bytes());
    out.extend_from_slice(&h.offset.to_le_bytes());
    out.extend_from_slice(&h.len.to_le_bytes());
    out.extend_from_slice(&h.span.to_le_bytes());
    out.extend_from_slice(&(h.chunks.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for c in &h.chunks {
        out.extend_from_slice(&c.fd.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&c.bytes.to_le_bytes());
        out.extend_from_slice(&c.at.to_le_bytes());
    }
    out
}

fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// Read a handle another process wrote, checking everything [`encode`] guarantees: magic,
/// kind, version, exact length for its chunk count (at most [`MAX_CHUNKS`]), a positive pid,
/// a device index, non-negative descriptors, chunks of positive size laid one after another
/// from 0 and adding up to the span, and shared bytes inside the span.
pub fn decode(b: &[u8]) -> Result<Handle, String> {
    let bad = |m: String| format!("not a valid accelrt IPC handle ({} bytes): {m}", b.len());
    if b.len() < HEADER_BYTES {
        return Err(bad(format!("shorter than its {HEADER_BYTES}-byte header")));
    }
    if &b[..4] != MAGIC || b[4] != KIND_VMM {
        return Err(bad("it does not start with ACRT V".into()));
    }
    if b[5] != VERSION {
        return Err(bad(format!(
            "version {} (this build reads {VERSION}): sender and receiver must run the same \
             accelrt",
            b[5]
        )));
    }
    let device = i32::from_le_bytes(le(b, 8));
    let pid = i32::from_le_bytes(le(b, 12));
    let offset = u64::from_le_bytes(le(b, 16));
    let len = u64::from_le_bytes(le(b, 24));
    let span = u64::from_le_bytes(le(b, 32));
    let count = u32::from_le_bytes(le(b, 40)) as usize;
    if count == 0 || count > MAX_CHUNKS {
        return Err(bad(format!("{count} chunks (1 to {MAX_CHUNKS} allowed)")));
    }
    let want = HEADER_BYTES + ENTRY_BYTES * count;
    if b.len() != want {
        return Err(bad(format!("{count} chunks need exactly {want} bytes")));
    }
    if pid <= 0 {
        return Err(bad(format!("pid {pid}")));
    }
    if device < 0 {
        return Err(bad(format!("device {device}")));
    }
    let mut chunks = Vec::with_capacity(count);
    let mut sum = 0u64;
    for i in 0..count {
        let at = HEADER_BYTES + ENTRY_BYTES * i;
        let c = HandleChunk {
            fd: i32::from_le_bytes(le(b, at)),
            bytes: u64::from_le_bytes(le(b, at + 8)),
            at: u64::from_le_bytes(le(b, at + 16)),
        };
        if c.fd < 0 || c.bytes == 0 || c.at != sum {
            return Err(bad(format!(
                "chunk {i} (descriptor {}, {} bytes at {}) is not the next one after {sum} bytes",
                c.fd, c.bytes, c.at
            )));
        }
        sum = sum
            .checked_add(c.bytes)
            .ok_or_else(|| bad("the chunk sizes overflow".into()))?;
        chunks.push(c);
    }
    if sum != span {
        return Err(bad(format!("its chunks add up to {sum} bytes, not {span}")));
    }
    if len == 0 || offset.checked_add(len).is_none_or(|end| end > span) {
        return Err(bad(format!(
            "{len} shared bytes at {offset} do not lie in its {span} bytes"
        )));
    }
    Ok(Handle {
        device,
        pid,
        offset,
        len,
        span,
        chunks,
    })
}

/// Descriptors exported for live blocks (by block address), closed when the block is freed;
/// the handle written for each, so sharing a block again reuses them.
struct Export {
    len: u64,
    bytes: Vec<u8>,
    _fds: Vec<OwnedFd>,
}

static EXPORTS: Mutex<Option<HashMap<usize, Export>>> = Mutex::new(None);
/// Whether anything was ever exported: frees look at the export table only then.
pub static ANY_EXPORTED: AtomicBool = AtomicBool::new(false);

/// Imports mapped in this process, by the pointer handed out.
static IMPORTS: Mutex<Option<HashMap<usize, (c_int, ImportedRange)>>> = Mutex::new(None);

fn export(ptr: usize, len: usize) -> Result<Vec<u8>, Failure> {
    let st = state()?;
    if let Some(e) = EXPORTS.lock().as_ref().and_then(|m| m.get(&ptr)) {
        if e.len == len as u64 {
            return Ok(e.bytes.clone());
        }
    }
    let (device, a) = st
        .existing_allocators()
        .find(|(_, a)| a.contains(ptr))
        .ok_or_else(|| format!("{ptr:#x} is not memory accelrt allocated"))?;
    let ExportedRange {
        chunks,
        offset,
        span,
    } = a
        .export_range(ptr, len)
        .map_err(|e| Failure::from(e.to_string()))?;
    let h = Handle {
        device: device as i32,
        pid: std::process::id() as i32,
        offset,
        len: len as u64,
        span,
        chunks: chunks
            .iter()
            .map(|c| HandleChunk {
                fd: c.fd.as_raw_fd(),
                bytes: c.bytes,
                at: c.at,
            })
            .collect(),
    };
    let bytes = encode(&h);
    let fds = chunks.into_iter().map(|c| c.fd).collect();
    EXPORTS.lock().get_or_insert_with(HashMap::new).insert(
        ptr,
        Export {
            len: len as u64,
            bytes: bytes.clone(),
            _fds: fds,
        },
    );
    ANY_EXPORTED.store(true, Relaxed);
    Ok(bytes)
}

/// Duplicate descriptor `fd` of process `pid` into this process.
fn dup_from(pid: i32, fd: i32) -> Result<OwnedFd, Failure> {
    // SAFETY: pidfd_open takes a pid and flags (0) and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "pidfd_open({pid}) failed: {e} (the sending process must still be alive, and \
             Linux 5.6 or newer is needed)"
        )
        .into());
    }
    // SAFETY: pidfd_open just returned this descriptor to us; nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: pidfd_getfd takes a pidfd we own, a descriptor number and flags (0).
    let local = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if local < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "pidfd_getfd(pid {pid}, descriptor {fd}) failed: {e} (the receiver must be allowed \
             to ptrace the sender: the same user, and with Yama (kernel.yama.ptrace_scope 1) \
             only ancestors may, so a torch.multiprocessing child cannot read its parent: \
             set ptrace_scope to 0, give the receiver CAP_SYS_PTRACE, or have the sender call \
             prctl(PR_SET_PTRACER, receiver pid))"
        )
        .into());
    }
    // SAFETY: pidfd_getfd just returned a new descriptor of this process to us.
    Ok(unsafe { OwnedFd::from_raw_fd(local as RawFd) })
}

fn open(device: c_int, bytes: &[u8]) -> Result<usize, Failure> {
    let h = decode(bytes)?;
    if h.device != device {
        return Err(format!(
            "the handle is of device {}, opened on {device}: open it on its own device",
            h.device
        )
        .into());
    }
    let st = state()?;
    let a = st.allocator(device)?;
    let mut fds = Vec::with_capacity(h.chunks.len());
    for c in &h.chunks {
        fds.push((dup_from(h.pid, c.fd)?, c.bytes));
    }
    let range = a
        .import_range(fds)
        .map_err(|e| Failure::from(e.to_string()))?;
    if range.span != h.span {
        let e = format!("mapped {} bytes for a handle of {}", range.span, h.span);
        a.close_import(range).ok();
        return Err(e.into());
    }
    let ptr = range.base + h.offset as usize;
    IMPORTS
        .lock()
        .get_or_insert_with(HashMap::new)
        .insert(ptr, (device, range));
    Ok(ptr)
}

/// Share the expandable memory `[ptr, ptr + len)` (one live block) with another process:
/// writes the handle into `out` when `cap` is large enough, and returns its length (call
/// again with a larger buffer when it exceeds `cap`; the export is kept, not repeated), or
/// -1. Plain segments are refused: share them with `cudaIpcGetMemHandle` on the segment base.
/// The descriptors stay open until [`accelrt_torch_ipc_forget`] for the block.
///
/// # Safety
/// `out` must be NULL (with `cap` 0) or valid for `cap` writes.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_ipc_share(
    ptr: *const c_void,
    len: usize,
    out: *mut u8,
    cap: usize,
) -> isize {
    guard("accelrt_torch_ipc_share", -1, Report::Status, || {
        if out.is_null() && cap != 0 {
            return Err("out is NULL with a non-zero cap".into());
        }
        let bytes = export(ptr as usize, len)?;
        if bytes.len() <= cap {
            // SAFETY: the caller guarantees `out` has room for `cap >= bytes.len()` bytes.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out, bytes.len()) };
        }
        Ok(bytes.len() as isize)
    })
}

/// Close the descriptors exported for the block at `ptr` (it is being freed). Nothing to do
/// for a block never shared. Never fails.
#[no_mangle]
pub extern "C" fn accelrt_torch_ipc_forget(ptr: *mut c_void) {
    if !ANY_EXPORTED.load(Relaxed) {
        return;
    }
    guard("accelrt_torch_ipc_forget", (), Report::Status, || {
        if let Some(m) = EXPORTS.lock().as_mut() {
            m.remove(&(ptr as usize));
        }
        Ok(())
    });
}

/// Map the memory handle `bytes` (from [`accelrt_torch_ipc_share`] in another process)
/// names on `device`, without copying; the shared bytes' address goes to `*out`. 0, or -1
/// (a malformed handle, the sender gone, ptrace refused, a driver failure: the message says
/// which). Undo with [`accelrt_torch_ipc_close`].
///
/// # Safety
/// `bytes` must be valid for `len` reads; `out` valid for one write.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_ipc_open(
    device: c_int,
    bytes: *const u8,
    len: usize,
    out: *mut *mut c_void,
) -> c_int {
    status("accelrt_torch_ipc_open", || {
        if out.is_null() || (bytes.is_null() && len != 0) {
            return Err("bytes or out is NULL".into());
        }
        let b = if len == 0 {
            &[][..]
        } else {
            // SAFETY: the caller guarantees `len` readable bytes at `bytes`.
            unsafe { std::slice::from_raw_parts(bytes, len) }
        };
        let p = open(device, b)?;
        // SAFETY: the caller guarantees `out` is valid for one write.
        unsafe { *out = p as *mut c_void };
        Ok(())
    })
}

/// Unmap and release what [`accelrt_torch_ipc_open`] mapped at `ptr` (after the device's
/// queued work). 0, or -1 (not an open import).
#[no_mangle]
pub extern "C" fn accelrt_torch_ipc_close(ptr: *mut c_void) -> c_int {
    status("accelrt_torch_ipc_close", || {
        let (device, range) = IMPORTS
            .lock()
            .as_mut()
            .and_then(|m| m.remove(&(ptr as usize)))
            .ok_or_else(|| {
                format!(
                    "{:#x} is not memory accelrt_torch_ipc_open mapped (closed already?)",
                    ptr as usize
                )
            })?;
        let a = state()?.allocator(device)?;
        a.close_import(range)
            .map_err(|e| Failure::from(e.to_string()))
    })
}
