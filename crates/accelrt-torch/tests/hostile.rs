//! Misuse of the C ABI found by fuzzing (issue 13): each call sequence here once gave a
//! wrong answer or an unreadable message. The tests share device 0, so they run one at a
//! time.

use std::ffi::{c_void, CStr};
use std::ptr::null_mut;
use std::sync::{Mutex, MutexGuard};

use accelrt::DeviceType;
use accelrt_torch::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn setup() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use_backend(DeviceType::Host).expect("these tests use the host backend");
    accelrt_torch_set_log_alloc_failures(0);
    guard
}

fn last() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next error.
    unsafe { CStr::from_ptr(accelrt_torch_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Issue 13 item 5: releasing a released pool that still has a live block answered 0 and
/// wrapped its use count to 2^32 - 1 (read back as 2147483647).
#[test]
fn a_second_release_of_a_draining_pool_is_refused_and_the_count_stays_zero() {
    let _g = setup();
    // SAFETY: no filter (every stream), no context.
    let rc = unsafe { accelrt_torch_begin_allocate_to_pool(0, 1, 0, None, null_mut(), None) };
    assert_eq!(rc, 0, "{}", last());
    // SAFETY: the default stream.
    let p = unsafe { accelrt_torch_alloc(512, 0, null_mut()) };
    assert!(!p.is_null(), "{}", last());
    assert_eq!(accelrt_torch_end_allocate_to_pool(0, 1, 0), 0, "{}", last());
    assert_eq!(accelrt_torch_release_pool(0, 1, 0), 0, "{}", last());
    assert_eq!(
        accelrt_torch_pool_use_count(0, 1, 0),
        0,
        "released, still draining"
    );

    /// A C call of no arguments, named.
    type Call = (&'static str, fn() -> i32);
    let again: [Call; 3] = [
        ("release_pool", || accelrt_torch_release_pool(0, 1, 0)),
        ("create_or_incref_pool", || {
            accelrt_torch_create_or_incref_pool(0, 1, 0)
        }),
        ("begin_allocate_to_pool", || {
            // SAFETY: no filter, no context.
            unsafe { accelrt_torch_begin_allocate_to_pool(0, 1, 0, None, null_mut(), None) }
        }),
    ];
    for (name, call) in again {
        assert_eq!(call(), -1, "{name} of a released pool is refused");
        assert!(
            last().contains("pool (1, 0) was already released"),
            "{name}: {}",
            last()
        );
        assert_eq!(
            accelrt_torch_pool_use_count(0, 1, 0),
            0,
            "{name} left the use count alone"
        );
    }
    // SAFETY: `p` is live.
    unsafe { accelrt_torch_free(p, 512, 0, null_mut()) };
    assert_eq!(
        accelrt_torch_pool_use_count(0, 1, 0),
        0,
        "gone once its last block is freed"
    );
    assert_eq!(accelrt_torch_release_pool(0, 1, 0), -1);
    assert!(last().contains("no private pool (1, 0)"), "{}", last());
}

/// Issue 13 item 7: the allocation error repeated its own prefix ("cannot allocate N bytes
/// on host:0: invalid argument: cannot allocate N bytes on host:0: ...").
#[test]
fn an_allocation_error_says_what_was_asked_once() {
    let _g = setup();
    let size = isize::MAX;
    // SAFETY: refused before any memory is touched.
    let p = unsafe { accelrt_torch_alloc(size, 0, null_mut::<c_void>()) };
    assert!(p.is_null());
    let message = last();
    let asked = format!("cannot allocate {size} bytes");
    assert_eq!(
        message.matches(&asked).count(),
        1,
        "the size is named once: {message}"
    );
    assert!(message.contains("host:0"), "{message}");
    assert!(message.contains("limited to"), "and why: {message}");
}
