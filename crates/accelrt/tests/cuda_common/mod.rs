//! Shared by the `cuda_*` GPU tests: find the GPU (or skip with the reason, or fail when
//! `ACCELRT_REQUIRE_GPU=1`), and move data between the host and device memory.
#![allow(dead_code)]

use accelrt::backend::cuda::CudaDriver;
use accelrt::runtime::Runtime;
use accelrt::Backend;

/// Set to 1 on the GPU machine: a missing GPU is then a failure, not a skip.
pub const REQUIRE_GPU_ENV: &str = "ACCELRT_REQUIRE_GPU";

/// The process-wide CUDA runtime, or `None` (after printing why) when no GPU is usable.
/// Panics when `ACCELRT_REQUIRE_GPU=1` and there is none.
pub fn gpu(test: &str) -> Option<&'static Runtime<CudaDriver>> {
    report_crashes();
    let rt = accelrt::registry::cuda();
    match rt.unavailable_reason() {
        None => Some(rt),
        Some(reason) => {
            if std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v.trim() == "1") {
                panic!("{REQUIRE_GPU_ENV}=1 but the cuda backend is unavailable: {reason}");
            }
            eprintln!("skipping {test}: the cuda backend is unavailable: {reason}");
            None
        }
    }
}

/// A panicking host task is reported by the next synchronize on the device, whoever calls
/// it. The test that provokes one holds this exclusively; the other tests of its binary hold
/// it shared, so none collects another's error when the harness runs them in parallel.
static DEVICE_ERRORS: std::sync::RwLock<()> = std::sync::RwLock::new(());

pub fn device_errors_exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    DEVICE_ERRORS.write().unwrap_or_else(|p| p.into_inner())
}

pub fn device_errors_shared() -> std::sync::RwLockReadGuard<'static, ()> {
    DEVICE_ERRORS.read().unwrap_or_else(|p| p.into_inner())
}

/// Read `count` 32-bit words of device memory.
pub fn read_u32(rt: &Runtime<CudaDriver>, device: u32, ptr: usize, count: usize) -> Vec<u32> {
    let mut bytes = vec![0u8; count * 4];
    // SAFETY: callers pass device memory they allocated with at least `count` words, after
    // synchronizing the work that writes it.
    unsafe { rt.driver().unwrap().copy_to_host(device, &mut bytes, ptr) }.unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Read `count` 64-bit words of device memory.
pub fn read_u64(rt: &Runtime<CudaDriver>, device: u32, ptr: usize, count: usize) -> Vec<u64> {
    let mut bytes = vec![0u8; count * 8];
    // SAFETY: as in `read_u32`.
    unsafe { rt.driver().unwrap().copy_to_host(device, &mut bytes, ptr) }.unwrap();
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

/// Write 32-bit words to device memory.
pub fn write_u32(rt: &Runtime<CudaDriver>, device: u32, ptr: usize, words: &[u32]) {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    // SAFETY: callers pass device memory they allocated with room for `words`, unused by
    // work in flight.
    unsafe { rt.driver().unwrap().copy_to_device(device, ptr, &bytes) }.unwrap();
}

/// On a segmentation fault, print the faulting address, the faulting instruction and the
/// return addresses (as object file + offset, for `addr2line`) before dying: the GPU machine
/// has no debugger, and a crash in a multi-threaded test otherwise says nothing. Only
/// async-signal-safe calls (no allocation): the process may be in any state.
fn report_crashes() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" {
        fn backtrace(buffer: *mut *mut libc::c_void, size: libc::c_int) -> libc::c_int;
    }
    fn write_hex(label: &[u8], value: usize) {
        let mut buf = [0u8; 96];
        let mut n = 0;
        for &b in label {
            if n < 60 {
                buf[n] = b;
                n += 1;
            }
        }
        for i in (0..16).rev() {
            buf[n] = b"0123456789abcdef"[(value >> (i * 4)) & 15];
            n += 1;
        }
        buf[n] = b'\n';
        // SAFETY: writes our stack buffer to stderr.
        unsafe { libc::write(2, buf.as_ptr().cast(), n + 1) };
    }
    fn write_location(label: &[u8], addr: usize) {
        // SAFETY: Dl_info is plain data (pointers and integers): all zeros is a valid value.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: dladdr only reads the loader's tables; `info` is a local out-parameter.
        if unsafe { libc::dladdr(addr as *const libc::c_void, &mut info) } != 0
            && !info.dli_fname.is_null()
        {
            // SAFETY: dli_fname is a NUL-terminated string owned by the loader.
            let name = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }.to_bytes();
            let short = &name[name.len().saturating_sub(40)..];
            let mut buf = [0u8; 64];
            let m = label.len().min(20);
            buf[..m].copy_from_slice(&label[..m]);
            // SAFETY: stderr writes of local buffers.
            unsafe {
                libc::write(2, buf.as_ptr().cast(), m);
                libc::write(2, short.as_ptr().cast(), short.len());
            }
            write_hex(b" +0x", addr - info.dli_fbase as usize);
        } else {
            write_hex(label, addr);
        }
    }
    ONCE.call_once(|| {
        extern "C" fn on_fault(
            _sig: libc::c_int,
            info: *mut libc::siginfo_t,
            ctx: *mut libc::c_void,
        ) {
            // SAFETY: the kernel passes a valid siginfo and ucontext for an SA_SIGINFO handler.
            let (addr, rip) = unsafe {
                let uc = ctx as *const libc::ucontext_t;
                (
                    (*info).si_addr() as usize,
                    (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] as usize,
                )
            };
            write_hex(b"SIGSEGV at 0x", addr);
            write_location(b"  faulting at ", rip);
            let mut frames = [std::ptr::null_mut::<libc::c_void>(); 48];
            // SAFETY: glibc's backtrace fills our local array.
            let n = unsafe { backtrace(frames.as_mut_ptr(), frames.len() as libc::c_int) };
            for f in &frames[..n.max(0) as usize] {
                write_location(b"  frame ", *f as usize);
            }
            // SAFETY: ends the process at once, as the default action would.
            unsafe { libc::_exit(139) };
        }
        // SAFETY: installs a handler for SIGSEGV with a zeroed (then filled) sigaction.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fault as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigaction(libc::SIGSEGV, &action, std::ptr::null_mut());
        }
    });
}
