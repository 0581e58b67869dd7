//! The conformance suite every accelrt backend runs: the calls of PyTorch's accelerator,
//! MPS and MTIA hooks, the MPS allocator interface and the MPS event pool, as accelrt's
//! [`Backend`] answers them, through the public API only.
//!
//! A backend's test file runs the whole suite, one `#[test]` per check:
//!
//! ```ignore
//! accelrt_conformance::conformance_tests!(Some(accelrt_fault::register().unwrap() as &dyn accelrt::Backend));
//! ```
//!
//! (`None` skips every check with a note: a GPU backend on a machine without a GPU.) The
//! host backend runs it in `accelrt/tests/runtime/main.rs`, the CUDA backend in
//! `accelrt/tests/cuda_conformance.rs` (skipped without a GPU), the out-of-tree `fault`
//! backend in `accelrt-fault/tests/conformance.rs`.
//!
//! What a check assumes of a backend: at least one device; streams run host tasks in order
//! ([`Backend::launch_host`]); a host task may block its stream (the checks hold streams with
//! gates, at most one at a time); graphs capture host tasks on streams from `new_stream`.
//! Checks of one process run one at a time ([`run_check`] serializes them): they share the
//! backend's device allocators and change limits for a moment.

mod allocator;
mod devices;
mod events;
mod graphs;

pub use allocator::{
    allocator_basics, allocator_callbacks, allocator_cross_stream, allocator_history,
    allocator_limits, memory_queries, pinned_memory,
};
pub use devices::{current_device, generators, identity_and_devices, profiler, streams};
pub use events::{event_pool, event_timing, events};
pub use graphs::{graph_fork_join, graphs};

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use accelrt::hooks::{Backend, HostTask};
use accelrt::{Device, Stream, StreamPriority};

/// Longest a check waits for something that should happen at once; only reached on a bug.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A check: panics (with a message saying what differed) when the backend does not conform.
pub type Check = fn(&dyn Backend);

/// Every check, by name, in the order [`run_all`] runs them.
pub const CHECKS: &[(&str, Check)] = &[
    ("identity_and_devices", identity_and_devices),
    ("current_device", current_device),
    ("streams", streams),
    ("events", events),
    ("event_timing", event_timing),
    ("event_pool", event_pool),
    ("generators", generators),
    ("graphs", graphs),
    ("graph_fork_join", graph_fork_join),
    ("allocator_basics", allocator_basics),
    ("allocator_cross_stream", allocator_cross_stream),
    ("allocator_limits", allocator_limits),
    ("allocator_callbacks", allocator_callbacks),
    ("allocator_history", allocator_history),
    ("memory_queries", memory_queries),
    ("pinned_memory", pinned_memory),
    ("profiler", profiler),
];

/// One `#[test]` per check of the suite, in a module `conformance`, on the backend the
/// expression gives (`Option<&dyn Backend>`; `None` skips with a note).
#[macro_export]
macro_rules! conformance_tests {
    ($backend:expr) => {
        $crate::conformance_tests!(@each $backend;
            identity_and_devices, current_device, streams, events, event_timing, event_pool,
            generators, graphs, graph_fork_join, allocator_basics, allocator_cross_stream,
            allocator_limits, allocator_callbacks, allocator_history, memory_queries,
            pinned_memory, profiler);
    };
    (@each $backend:expr; $($check:ident),* $(,)?) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $check() {
                    $crate::run_check(stringify!($check), $crate::$check, $backend);
                }
            )*
        }
    };
}

/// Run one check on `backend`, after the checks running in other threads of the process
/// (they share its allocators); `None` skips with a note.
pub fn run_check(name: &str, check: Check, backend: Option<&dyn Backend>) {
    let _serial = serial();
    match backend {
        Some(b) => check(b),
        None => eprintln!("skipping conformance check {name}: the backend is not usable here"),
    }
}

/// Every check, in order (stops at the first that fails).
pub fn run_all(backend: &dyn Backend) {
    for (name, check) in CHECKS {
        run_check(name, *check, Some(backend));
    }
}

/// Checks of one process run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

// ---- helpers ----------------------------------------------------------------------------------

/// A gate host tasks wait on, to hold a stream at a known point.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    /// A task that blocks its stream until [`Gate::open`] (or [`PATIENCE`] passes).
    fn task(&self) -> HostTask {
        let gate = self.clone();
        Arc::new(move || {
            let (lock, cv) = &*gate.0;
            let open = lock.lock().unwrap_or_else(|p| p.into_inner());
            let _unused = cv.wait_timeout_while(open, PATIENCE, |open| !*open);
        })
    }

    fn open(&self) {
        let (lock, cv) = &*self.0;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }
}

/// A log tasks append to, to see the order work ran in.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn task(&self, entry: &str) -> HostTask {
        let (log, entry) = (self.clone(), entry.to_string());
        Arc::new(move || log.0.lock().unwrap().push(entry.clone()))
    }

    fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// A stream of its own on device 0.
fn fresh_stream(b: &dyn Backend) -> Stream {
    b.new_stream(0, StreamPriority::Normal)
        .expect("new_stream(0)")
}

/// Whether `f` returns within a second (run on another thread).
fn returns_promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(1)).ok()
}

fn sleep_task(ms: u64) -> HostTask {
    Arc::new(move || std::thread::sleep(Duration::from_millis(ms)))
}

fn device(b: &dyn Backend, index: u32) -> Device {
    Device {
        kind: b.device_type(),
        index,
    }
}
