//! The calling thread's last error (and last out-of-memory), and the guard every C entry
//! point runs its body under: no panic crosses the C ABI.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

/// What an out-of-memory reported, for PyTorch's out-of-memory observers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OomFigures {
    pub requested: u64,
    pub device_total: u64,
    pub device_free: u64,
    pub allocated: u64,
}

/// Why a call failed: the message, and the figures when it was an out-of-memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub message: String,
    pub oom: Option<OomFigures>,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure { message, oom: None }
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

struct LastError {
    message: CString,
    oom: Option<OomFigures>,
}

thread_local! {
    static LAST: RefCell<LastError> = RefCell::new(LastError {
        message: CString::default(),
        oom: None,
    });
}

/// Whether failed allocations are logged to stderr (a caller that raises them turns it off).
pub(crate) static LOG_ALLOC_FAILURES: AtomicBool = AtomicBool::new(true);

/// Keep `failure` as the calling thread's last error.
pub(crate) fn set_last(failure: Failure) {
    // A C string cannot hold NUL: show it instead of cutting the message there.
    let message =
        CString::new(failure.message.replace('\0', "\\0")).expect("NUL bytes were replaced above");
    LAST.with(|l| {
        *l.borrow_mut() = LastError {
            message,
            oom: failure.oom,
        }
    });
}

/// The calling thread's last error, as a C string that stays valid until the next error
/// on this thread.
pub(crate) fn last_ptr() -> *const c_char {
    LAST.with(|l| l.borrow().message.as_ptr())
}

/// The calling thread's last error message (for Rust callers and tests).
pub fn last_error() -> String {
    LAST.with(|l| l.borrow().message.to_string_lossy().into_owned())
}

/// The figures of the calling thread's last failure, if it was an out-of-memory.
pub fn last_oom() -> Option<OomFigures> {
    LAST.with(|l| l.borrow().oom)
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".into())
}

/// How a failure is reported besides the last error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// The caller sees a status and reads the last error.
    Status,
    /// The caller has no way to see it (PyTorch's `free` returns nothing): log to stderr too.
    Log,
    /// An allocation: logged unless [`LOG_ALLOC_FAILURES`] is off.
    Alloc,
}

/// Run `body` for the C function `name`: its value, or `on_error` with the failure kept as
/// the thread's last error (and logged as `report` says). A panic is caught, logged and
/// reported like an error.
pub(crate) fn guard<T>(
    name: &str,
    on_error: T,
    report: Report,
    body: impl FnOnce() -> Result<T, Failure>,
) -> T {
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => return value,
        Ok(Err(failure)) => {
            let log = match report {
                Report::Status => false,
                Report::Log => true,
                Report::Alloc => LOG_ALLOC_FAILURES.load(Ordering::Relaxed),
            };
            if log {
                eprintln!("accelrt_torch: {name}: {}", failure.message);
            }
            failure
        }
        Err(payload) => {
            let message = format!(
                "{name} panicked: {} (a bug in accelrt: please report it with the call that \
                 caused it)",
                panic_message(payload.as_ref())
            );
            eprintln!("accelrt_torch: {message}");
            message.into()
        }
    };
    set_last(failure);
    on_error
}
