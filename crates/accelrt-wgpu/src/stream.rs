//! Streams: ordered sequences of submissions on the device's one queue.
//!
//! wgpu gives a device one queue whose submissions run in order (WebGPU's queue timeline:
//! later submissions see the effects of earlier ones), so GPU work of a stream needs no
//! ordering of its own once it is submitted. What a stream adds is work that is *held back*:
//! a host task must run after the stream's earlier GPU work has finished, and GPU work after
//! a host task (or after a wait for another stream's unresolved event) must not be submitted
//! before it. So a stream is:
//!
//! - a *frontier*: the number of the last submission its work so far depends on (its own
//!   last submission, raised by waits on other streams' events); everything issued on the
//!   stream has finished once the GPU has finished the frontier;
//! - a FIFO of *pending* items, run by the stream's worker thread (started on first need):
//!   host tasks (after waiting for the frontier), GPU operations (submitted), event records
//!   (resolved to the frontier), and waits for other streams' events (until they resolve).
//!
//! While nothing is pending, GPU work is submitted at once from the calling thread and an
//! event record costs no submission; that is the fast path.

use std::cell::Cell;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use accelrt::driver::HostTask;
use accelrt::error::{DeviceError, DeviceResult};
use parking_lot::{Condvar, Mutex};

use crate::device::points::Point;
use crate::device::{wgpu_error, DeviceShared};
use crate::kernels::{self, GpuOp};

thread_local! {
    /// The id of the stream whose worker runs on this thread (0: none; ids start at 1).
    static CURRENT_WORKER: Cell<u64> = const { Cell::new(0) };
}

/// The id of the stream whose worker is the calling thread (0: none).
pub(crate) fn current_worker() -> u64 {
    CURRENT_WORKER.with(Cell::get)
}

/// Work queued on a stream.
pub(crate) enum Item {
    Host(HostTask),
    Gpu(GpuOp),
    /// An event record: the point becomes the frontier when the stream reaches it.
    Record(Arc<Point>),
    /// Later work waits for another stream's point.
    Wait(Arc<Point>),
}

/// Work recorded by a graph capture, replayed by launching it again.
#[derive(Clone)]
pub(crate) enum Captured {
    Host(HostTask),
    Gpu(GpuOp),
}

/// The work of one capture, shared by the streams taking part in it.
type CaptureBuffer = Arc<Mutex<Vec<Captured>>>;

#[derive(Default)]
struct State {
    pending: VecDeque<Item>,
    /// The worker is running an item (later work must queue behind it).
    busy: bool,
    frontier: u64,
    capture: Option<CaptureBuffer>,
    worker_started: bool,
    shutdown: bool,
}

/// What a stream's handle, its worker and its points share.
pub(crate) struct StreamShared {
    pub(crate) id: u64,
    pub(crate) device: Arc<DeviceShared>,
    label: String,
    state: Mutex<State>,
    work: Condvar,
    has_errors: AtomicBool,
    errors: Mutex<Vec<String>>,
}

/// A wgpu stream. Dropping it lets the worker finish what is queued, then exit.
pub struct WgpuStream {
    pub(crate) shared: Arc<StreamShared>,
}

impl std::fmt::Debug for WgpuStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.state.lock();
        f.debug_struct("WgpuStream")
            .field("label", &self.shared.label)
            .field("frontier", &st.frontier)
            .field("pending", &st.pending.len())
            .finish()
    }
}

impl Drop for WgpuStream {
    fn drop(&mut self) {
        self.shared.state.lock().shutdown = true;
        self.shared.work.notify_all();
    }
}

impl WgpuStream {
    pub(crate) fn new(id: u64, device: Arc<DeviceShared>) -> Self {
        WgpuStream {
            shared: Arc::new(StreamShared {
                id,
                label: format!("{}:{}/stream{id}", crate::NAME, device.index),
                device,
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                has_errors: AtomicBool::new(false),
                errors: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The last submission the stream's issued work depends on.
    pub fn frontier(&self) -> u64 {
        self.shared.state.lock().frontier
    }

    /// Items held back (not yet submitted or run).
    pub fn pending(&self) -> usize {
        self.shared.state.lock().pending.len()
    }

    /// The stream's device index.
    pub fn device(&self) -> u32 {
        self.shared.device.index
    }
}

impl StreamShared {
    /// Queue `item`: at once when nothing is held back, else behind the held-back work.
    pub(crate) fn launch(self: &Arc<Self>, item: Item) -> DeviceResult<()> {
        let mut st = self.state.lock();
        let item = match item {
            Item::Host(task) if st.capture.is_some() => {
                Self::capture(&st, Captured::Host(task));
                return Ok(());
            }
            Item::Gpu(op) if st.capture.is_some() => {
                if matches!(op, GpuOp::Read { .. }) {
                    return Err(DeviceError::Graph(format!(
                        "{} is capturing a graph: reading device memory back to the host \
                         cannot be captured (read after the capture ends)",
                        self.label
                    )));
                }
                Self::capture(&st, Captured::Gpu(op));
                return Ok(());
            }
            item => item,
        };
        if st.pending.is_empty() && !st.busy {
            match item {
                Item::Gpu(op) => {
                    let n = kernels::run(&self.device, &op)?;
                    st.frontier = st.frontier.max(n);
                    return Ok(());
                }
                Item::Record(point) => {
                    point.resolve(st.frontier);
                    return Ok(());
                }
                Item::Wait(point) => match point.resolved() {
                    Some(n) => {
                        st.frontier = st.frontier.max(n);
                        return Ok(());
                    }
                    None => st.pending.push_back(Item::Wait(point)),
                },
                host @ Item::Host(_) => st.pending.push_back(host),
            }
        } else {
            st.pending.push_back(item);
        }
        if !st.worker_started {
            self.start_worker()?;
            st.worker_started = true;
        }
        self.work.notify_one();
        Ok(())
    }

    fn capture(st: &State, item: Captured) {
        st.capture
            .as_ref()
            .expect("checked by the caller")
            .lock()
            .push(item);
    }

    /// Launch captured work again (a graph replay).
    pub(crate) fn replay(self: &Arc<Self>, items: &[Captured]) -> DeviceResult<()> {
        for item in items {
            self.launch(match item {
                Captured::Host(task) => Item::Host(Arc::clone(task)),
                Captured::Gpu(op) => Item::Gpu(op.clone()),
            })?;
        }
        Ok(())
    }

    /// A point at the current end of the stream.
    pub(crate) fn point_at_end(self: &Arc<Self>) -> DeviceResult<Arc<Point>> {
        let point = Arc::new(Point::new(self.id, &self.device.notifier));
        self.launch(Item::Record(Arc::clone(&point)))?;
        Ok(point)
    }

    /// Block until `point` (of this device) has been reached.
    pub(crate) fn wait_point(device: &DeviceShared, point: &Point, what: &str) -> DeviceResult<()> {
        let n = match point.resolved() {
            Some(n) => n,
            None => {
                if point.stream_id == current_worker() {
                    return Err(DeviceError::InvalidArgument(format!(
                        "cannot {what} from a task running on the stream it waits for: it \
                         would wait for itself"
                    )));
                }
                point.wait_resolved()
            }
        };
        device.wait(n)
    }

    /// Block until everything queued so far has run; report errors kept since the last
    /// synchronize (failed work and panicked tasks of this stream, then the device's
    /// asynchronous wgpu errors).
    pub(crate) fn synchronize(self: &Arc<Self>) -> DeviceResult<()> {
        self.check_not_worker("synchronize")?;
        let point = self.point_at_end()?;
        Self::wait_point(&self.device, &point, "synchronize")?;
        self.take_errors()?;
        self.device.take_errors()
    }

    /// True when everything queued so far has finished.
    pub(crate) fn query(&self) -> DeviceResult<bool> {
        let frontier = {
            let st = self.state.lock();
            if !st.pending.is_empty() || st.busy {
                return Ok(false);
            }
            st.frontier
        };
        self.device.query(frontier)
    }

    pub(crate) fn check_not_worker(&self, what: &str) -> DeviceResult<()> {
        if current_worker() == self.id {
            return Err(DeviceError::InvalidArgument(format!(
                "cannot {what} from a task running on {} itself: it would wait for itself",
                self.label
            )));
        }
        Ok(())
    }

    // ---- graph capture ---------------------------------------------------------------------

    pub(crate) fn begin_capture(&self) -> DeviceResult<()> {
        let mut st = self.state.lock();
        if st.capture.is_some() {
            return Err(DeviceError::Graph(format!(
                "{} is already capturing",
                self.label
            )));
        }
        st.capture = Some(CaptureBuffer::default());
        Ok(())
    }

    /// From now on, record this stream's launches into `origin`'s capture (a fork).
    /// Captured work replays on the origin stream in launch order, which keeps every
    /// cross-stream dependency of the capture.
    pub(crate) fn join_capture(&self, origin: &StreamShared) -> DeviceResult<()> {
        let buffer = origin.state.lock().capture.clone().ok_or_else(|| {
            DeviceError::Graph(format!(
                "{} is not capturing: {} cannot join its capture",
                origin.label, self.label
            ))
        })?;
        let mut st = self.state.lock();
        if st.capture.is_some() {
            return Err(DeviceError::Graph(format!(
                "{} is already capturing",
                self.label
            )));
        }
        st.capture = Some(buffer);
        Ok(())
    }

    pub(crate) fn leave_capture(&self) {
        self.state.lock().capture = None;
    }

    pub(crate) fn end_capture(&self) -> DeviceResult<Vec<Captured>> {
        let buffer = self
            .state
            .lock()
            .capture
            .take()
            .ok_or_else(|| DeviceError::Graph(format!("{} is not capturing", self.label)))?;
        let items = std::mem::take(&mut *buffer.lock());
        Ok(items)
    }

    // ---- errors ----------------------------------------------------------------------------

    fn keep_error(&self, message: String) {
        self.errors.lock().push(message);
        self.has_errors.store(true, Ordering::Release);
    }

    fn take_errors(&self) -> DeviceResult<()> {
        if !self.has_errors.load(Ordering::Acquire) {
            return Ok(());
        }
        let errors = std::mem::take(&mut *self.errors.lock());
        self.has_errors.store(false, Ordering::Release);
        if errors.is_empty() {
            return Ok(());
        }
        Err(wgpu_error(
            "wgpu stream work",
            format!(
                "{} error(s) on {} since the last synchronize: {}",
                errors.len(),
                self.label,
                errors.join("; ")
            ),
        ))
    }

    // ---- the worker ------------------------------------------------------------------------

    #[cold]
    fn start_worker(self: &Arc<Self>) -> DeviceResult<()> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("accelrt-{}", self.label))
            .spawn(move || me.worker())
            .map(drop)
            .map_err(|e| wgpu_error("std::thread::spawn (wgpu stream worker)", e))
    }

    fn worker(self: Arc<Self>) {
        CURRENT_WORKER.with(|w| w.set(self.id));
        loop {
            let item = {
                let mut st = self.state.lock();
                loop {
                    if let Some(item) = st.pending.pop_front() {
                        st.busy = true;
                        break item;
                    }
                    st.busy = false;
                    if st.shutdown {
                        return;
                    }
                    self.work.wait(&mut st);
                }
            };
            self.process(item);
        }
    }

    fn process(&self, item: Item) {
        match item {
            Item::Host(task) => {
                let frontier = self.state.lock().frontier;
                // A host task sees the results of the stream's earlier GPU work.
                if let Err(e) = self.device.wait(frontier) {
                    self.keep_error(format!("waiting for the GPU before a host task: {e}"));
                }
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| task())) {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic payload".to_string());
                    self.keep_error(format!("a task panicked: {msg}"));
                }
            }
            Item::Gpu(op) => match kernels::run(&self.device, &op) {
                Ok(n) => {
                    let mut st = self.state.lock();
                    st.frontier = st.frontier.max(n);
                }
                Err(e) => {
                    if let GpuOp::Timestamp { point } = &op {
                        // Never written: complete, and its time is refused.
                        point.fail();
                        point.resolve(0);
                    }
                    self.keep_error(format!("{} failed: {e}", op.name()));
                }
            },
            Item::Record(point) => {
                let frontier = {
                    let mut st = self.state.lock();
                    // The end of the stream: idle before the point says so, so a query after
                    // a synchronize on this point sees the stream done.
                    if st.pending.is_empty() {
                        st.busy = false;
                    }
                    st.frontier
                };
                point.resolve(frontier);
            }
            Item::Wait(point) => {
                let n = point.wait_resolved();
                let mut st = self.state.lock();
                st.frontier = st.frontier.max(n);
            }
        }
    }
}
