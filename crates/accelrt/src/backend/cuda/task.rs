//! Host tasks on the CUDA driver's callback thread: the box a launch hands the driver, the
//! host functions that run it (catching its panic for the stream's next synchronize), and
//! the guard against waiting from inside one.

use std::cell::Cell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use super::context::DeviceErrors;
use crate::driver::HostTask;
use crate::error::{DeviceError, DeviceResult};

thread_local! {
    /// True on the driver's callback thread while one of our host tasks runs.
    static IN_HOST_TASK: Cell<bool> = const { Cell::new(false) };
}

/// `Err` when called from inside a host task: waiting there would wait for the task itself
/// (CUDA forbids CUDA calls in host functions; this turns the deadlock into an error).
pub(crate) fn check_not_in_host_task(what: &str) -> DeviceResult<()> {
    if IN_HOST_TASK.with(Cell::get) {
        return Err(DeviceError::InvalidArgument(format!(
            "cannot {what} from inside a host task launched with launch_host: it runs on the \
             CUDA driver's callback thread, which must not call CUDA (CUDA's rule) and would \
             wait for itself; do the waiting after the task, or use event_notify, whose \
             callbacks run on an ordinary thread"
        )));
    }
    Ok(())
}

/// Text of a caught panic.
pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-text payload".to_string())
}

/// What a host-function launch hands the driver: the task and where its panic goes.
pub(crate) struct TaskBox {
    pub(crate) task: HostTask,
    pub(crate) errors: Arc<DeviceErrors>,
}

fn run_task(b: &TaskBox) {
    IN_HOST_TASK.with(|f| f.set(true));
    let result = catch_unwind(AssertUnwindSafe(|| (b.task)()));
    IN_HOST_TASK.with(|f| f.set(false));
    if let Err(p) = result {
        b.errors
            .keep(format!("a host task panicked: {}", panic_text(&*p)));
    }
}

/// Host function for a launch that runs once: owns its box.
pub(crate) unsafe extern "C" fn run_task_once(data: *mut c_void) {
    // SAFETY: `data` is `Box::into_raw` of a TaskBox from `launch_host`, handed to exactly
    // one uncaptured launch, so this is its only use and we may take it back.
    let b = unsafe { Box::from_raw(data.cast::<TaskBox>()) };
    run_task(&b);
}

/// Host function for a launch captured into a graph: runs at every replay, borrows its box
/// (kept alive by the stream, then by the graph).
pub(crate) unsafe extern "C" fn run_task_kept(data: *mut c_void) {
    // SAFETY: `data` points into a Box<TaskBox> owned by the stream or the graph made from
    // its capture, which outlives every launch of that graph (CudaGraph's drop synchronizes
    // the context before freeing its boxes).
    let b = unsafe { &*data.cast::<TaskBox>() };
    run_task(b);
}
