//! The C ABI as shipped: every function of the header is exported by the built library,
//! and bad calls are refused with a message instead of crashing: null pointers, unknown
//! pointers, negative sizes, invalid devices, invalid pool ids, and CUDA being unavailable
//! (CI has no GPU: every allocation then fails with the reason).

mod common;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicUsize, Ordering};

use accelrt_torch::*;

fn last() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next error.
    unsafe { CStr::from_ptr(accelrt_torch_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// dlopen'd copy of the built library, to check exports and call through them.
struct Dl(*mut c_void);

impl Dl {
    fn open() -> Dl {
        let path = CString::new(common::cdylib().to_str().expect("UTF-8 path")).unwrap();
        // SAFETY: a NUL-terminated path; the library has no initialisers that need anything.
        let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!h.is_null(), "dlopen {:?} failed", common::cdylib());
        Dl(h)
    }

    fn sym(&self, name: &str) -> *mut c_void {
        let c = CString::new(name).unwrap();
        // SAFETY: a live handle and a NUL-terminated name.
        unsafe { libc::dlsym(self.0, c.as_ptr()) }
    }
}

#[test]
fn the_library_exports_every_function_of_the_header_and_nothing_else() {
    let declared = common::header_functions();
    assert!(
        declared.len() >= 25,
        "the header parser found only {declared:?}"
    );
    let dl = Dl::open();
    for name in &declared {
        assert!(
            !dl.sym(name).is_null(),
            "{name} is declared in accelrt_torch.h but not exported by {:?}",
            common::cdylib()
        );
    }
    // With nm, also the other way round: every exported accelrt_torch_ symbol is declared.
    match std::process::Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(common::cdylib())
        .output()
    {
        Ok(out) if out.status.success() => {
            let listing = String::from_utf8_lossy(&out.stdout);
            let exported: Vec<&str> = listing
                .lines()
                .filter_map(|l| l.split_whitespace().nth(2))
                .filter(|s| s.starts_with("accelrt_torch_"))
                .collect();
            for name in &exported {
                assert!(
                    declared.iter().any(|d| d == name),
                    "{name} is exported but not declared in accelrt_torch.h"
                );
            }
            assert_eq!(exported.len(), declared.len(), "exported: {exported:?}");
        }
        _ => println!("nm is not available: checked the header's functions with dlsym only"),
    }
}

#[test]
fn the_built_library_refuses_a_bad_allocation_through_its_exports() {
    let dl = Dl::open();
    type Alloc = unsafe extern "C" fn(isize, c_int, *mut c_void) -> *mut c_void;
    type LastError = extern "C" fn() -> *const c_char;
    let (alloc, last_error) = (
        dl.sym("accelrt_torch_alloc"),
        dl.sym("accelrt_torch_last_error"),
    );
    assert!(!alloc.is_null() && !last_error.is_null());
    // SAFETY: the symbols have the header's signatures.
    let alloc: Alloc = unsafe { std::mem::transmute::<*mut c_void, Alloc>(alloc) };
    // SAFETY: as above.
    let last_error: LastError =
        unsafe { std::mem::transmute::<*mut c_void, LastError>(last_error) };
    // SAFETY: a negative size is refused before the stream is looked at.
    let p = unsafe { alloc(-5, 0, null_mut()) };
    assert!(p.is_null());
    // SAFETY: a NUL-terminated string from the library.
    let msg = unsafe { CStr::from_ptr(last_error()) }
        .to_string_lossy()
        .into_owned();
    assert!(
        msg.contains("-5 bytes") && msg.contains("negative"),
        "{msg}"
    );
}

#[test]
fn arguments_are_checked_before_anything_else() {
    // SAFETY: (all calls below) invalid arguments are refused before any pointer is used.
    unsafe {
        assert!(accelrt_torch_alloc(-1, 0, null_mut()).is_null());
        assert!(last().contains("negative"), "{}", last());
        assert!(
            accelrt_torch_alloc(0, 0, null_mut()).is_null(),
            "0 bytes: NULL"
        );

        accelrt_torch_free(null_mut(), 0, 0, null_mut()); // ignored, like free(NULL)

        assert_eq!(accelrt_torch_stats_array(0, null_mut(), STATS_LEN), -1);
        assert!(last().contains("out is NULL"), "{}", last());
        let mut short = [0i64; 4];
        assert_eq!(accelrt_torch_stats_array(0, short.as_mut_ptr(), 4), -1);
        assert!(
            last().contains("holds 4 values") && last().contains("113"),
            "{}",
            last()
        );

        assert!(accelrt_torch_snapshot_pickle(0, null_mut()).is_null());
        assert!(last().contains("len is NULL"), "{}", last());
        assert_eq!(accelrt_torch_cache_info(0, null_mut()), -1);
        assert!(last().contains("largest is NULL"), "{}", last());
        assert_eq!(accelrt_torch_last_oom(null_mut()), -1);
        assert_eq!(accelrt_torch_record_stream(null_mut(), null_mut()), -1);
        assert!(last().contains("NULL pointer"), "{}", last());
        assert_eq!(accelrt_torch_record_history(0, 1, 0), -1);
        assert!(last().contains("max_entries is 0"), "{}", last());
        assert_eq!(accelrt_torch_end_allocate_to_pool(0, 0, 0), -1);
        assert!(last().contains("(0, 0) is not a pool"), "{}", last());
        assert_eq!(accelrt_torch_release_pool(0, 0, 0), -1);
        assert_eq!(accelrt_torch_create_or_incref_pool(0, 0, 0), -1);
        assert_eq!(accelrt_torch_pool_use_count(0, 0, 0), -1);
        accelrt_torch_free_buffer(null_mut());
        assert_eq!(
            CStr::from_ptr(accelrt_torch_version()).to_str().unwrap(),
            env!("CARGO_PKG_VERSION")
        );
    }
}

static DROPS: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn accept_all(_ctx: *mut c_void, _stream: *mut c_void) -> c_int {
    1
}

unsafe extern "C" fn count_drop(ctx: *mut c_void) {
    assert_eq!(ctx as usize, 0xC0FFEE);
    DROPS.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn a_refused_pool_still_drops_its_filter_context_once() {
    let before = DROPS.load(Ordering::SeqCst);
    // SAFETY: the filter and drop functions are thread-safe and never unwind.
    let rc = unsafe {
        accelrt_torch_begin_allocate_to_pool(
            0,
            0,
            0,
            Some(accept_all),
            0xC0FFEE as *mut c_void,
            Some(count_drop),
        )
    };
    assert_eq!(rc, -1);
    assert!(last().contains("(0, 0) is not a pool"), "{}", last());
    assert_eq!(DROPS.load(Ordering::SeqCst), before + 1);
}

#[test]
fn without_cuda_every_call_says_why() {
    if accelrt_torch_device_count() >= 0 {
        // A machine with a GPU: the CUDA path is exercised by scripts/torch-verify.sh; here,
        // an invalid device must still be refused.
        let n = accelrt_torch_device_count();
        // SAFETY: the device is checked before the stream is used.
        assert!(unsafe { accelrt_torch_alloc(1024, n, null_mut()) }.is_null());
        assert!(last().contains("invalid device index"), "{}", last());
        println!(
            "CUDA is available here ({n} devices): the unavailable-backend checks are skipped"
        );
        return;
    }
    let reason = last();
    assert!(
        reason.contains("the cuda backend is unavailable"),
        "device_count: {reason}"
    );
    // SAFETY: (all calls below) with the backend unavailable no pointer or stream is used.
    unsafe {
        assert!(accelrt_torch_alloc(1024, 0, null_mut()).is_null());
        let msg = last();
        assert!(
            msg.starts_with(
                "cannot allocate 1024 bytes on device 0: the cuda backend is unavailable: "
            ),
            "{msg}"
        );
        assert_eq!(
            accelrt_torch_last_oom([0i64; 4].as_mut_ptr()),
            0,
            "not an OOM"
        );
        assert!(accelrt_torch_alloc(1024, -3, null_mut()).is_null());
        accelrt_torch_free(0x1234 as *mut c_void, 16, 0, null_mut());
        assert!(last().contains("cannot free 0x1234"), "{}", last());
        assert!(accelrt_torch_memory_stats_json(0).is_null());
        assert!(last().contains("unavailable"), "{}", last());
        let mut len = 0usize;
        assert!(accelrt_torch_snapshot_pickle(-1, &mut len).is_null());
        assert_eq!(accelrt_torch_init(1), -1);
        assert_eq!(accelrt_torch_empty_cache(), -1);
        assert_eq!(accelrt_torch_set_memory_fraction(0.5, 0), -1);
        assert!(accelrt_torch_get_memory_fraction(0) < 0.0);
        assert_eq!(accelrt_torch_reset_peak_stats(0), -1);
        assert_eq!(accelrt_torch_record_history(-1, 1, 10), -1);
        assert_eq!(
            accelrt_torch_record_stream(0x1000 as *mut c_void, null_mut()),
            -1
        );
        assert_eq!(accelrt_torch_create_or_incref_pool(0, 0, 1), -1);
        assert!(last().contains("unavailable"), "{}", last());
    }
}

/// `STATS_LEN` is written in four languages: the C header, the Python package and the C++
/// shim must say what the library writes, or a layout change would be truncated silently.
#[test]
fn stats_len_is_the_same_everywhere() {
    let written = accelrt_torch::stats_values(&Default::default()).len();
    assert_eq!(written, accelrt_torch::STATS_LEN);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // (file, the text just before the number)
    let copies = [
        (
            "include/accelrt_torch.h",
            "#define ACCELRT_TORCH_STATS_LEN ",
        ),
        ("../../python/accelrt_torch/__init__.py", "\nSTATS_LEN = "),
        (
            "../../python/accelrt_torch/accelrt_torch_shim.cpp",
            "constexpr size_t kStatsLen = ",
        ),
    ];
    for (file, before) in copies {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let at = text
            .find(before)
            .unwrap_or_else(|| panic!("{file}: no '{}'", before.trim()));
        let digits: String = text[at + before.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        assert_eq!(
            digits.parse::<usize>().ok(),
            Some(accelrt_torch::STATS_LEN),
            "{file} says STATS_LEN is {digits:?}"
        );
    }
}
