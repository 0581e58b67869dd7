//! Host streams: one worker thread per stream runs queued items in FIFO order.
//!
//! Positions in a stream are counted: `enqueued` items submitted, `completed` items done.
//! Item `i` (0-based) is done once `completed > i`, so "the end of the stream right now" is
//! the number `enqueued`, and a position `seq` has been reached when `completed >= seq`.
//! That makes a non-timing event record two atomic loads and its query one: no syscall.
//! A third counter, `settled`, follows `completed` once the callbacks (`notify`) of an item
//! have run too; blocking waits use it, so a synchronize also sees callbacks' errors.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::alloc::Deferred;
use crate::driver::{EventCallback, HostTask};
use crate::error::{DeviceError, DeviceResult};

thread_local! {
    /// The id of the stream whose worker runs on this thread (0: none; ids start at 1).
    static CURRENT_WORKER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Nanoseconds on accelrt's clock ([`crate::event::clock_ns`]), plus one (so 0 can mean
/// "not stamped").
pub(super) fn now_stamp() -> u64 {
    crate::event::clock_ns() + 1
}

/// A time stamp written by the worker when it reaches a timing event's marker.
#[derive(Debug, Default)]
pub(super) struct Mark {
    stamp: AtomicU64,
}

impl Mark {
    /// The stamp (ns since the epoch, plus one), or `None` before the worker reached it.
    pub(super) fn get(&self) -> Option<u64> {
        match self.stamp.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }
}

/// One queued item.
enum Item {
    Task(HostTask),
    /// A timing event's marker: stamp the clock.
    Mark(Arc<Mark>),
    /// `stream.wait(event)`: hold the stream until another stream reaches `seq`.
    Wait(Arc<StreamShared>, u64),
}

/// The tasks of one graph capture, shared by the streams that take part in it (the one
/// that began it and those that joined it by waiting for one of its events).
type CaptureBuffer = Arc<Mutex<Vec<HostTask>>>;

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    /// `Some` while a graph capture records launches instead of queueing them.
    capture: Option<CaptureBuffer>,
    worker_started: bool,
    shutdown: bool,
}

#[derive(Default)]
struct Done {
    /// `(seq, callback)`: run once `completed >= seq`.
    callbacks: Vec<(u64, EventCallback)>,
}

/// The state a stream's handle, its worker and events recorded on it share.
pub(super) struct StreamShared {
    pub(super) id: u64,
    label: String,
    enqueued: AtomicU64,
    completed: AtomicU64,
    /// `completed`, updated once the item's event callbacks have also run.
    settled: AtomicU64,
    queue: Mutex<Queue>,
    work_cv: Condvar,
    done: Mutex<Done>,
    done_cv: Condvar,
    /// Panics of tasks and callbacks, for the next synchronize or query.
    errors: Deferred<DeviceError>,
}

impl StreamShared {
    /// The current end of the stream.
    #[inline]
    pub(super) fn end(&self) -> u64 {
        self.enqueued.load(Ordering::Acquire)
    }

    /// Whether the stream has reached position `seq`.
    #[inline]
    pub(super) fn reached(&self, seq: u64) -> bool {
        self.completed.load(Ordering::Acquire) >= seq
    }

    #[inline]
    fn settled(&self, seq: u64) -> bool {
        self.settled.load(Ordering::Acquire) >= seq
    }

    /// Block the calling thread until the stream reaches `seq` and the callbacks waiting
    /// for positions up to `seq` have run.
    pub(super) fn wait_for(&self, seq: u64) {
        if self.settled(seq) {
            return;
        }
        let mut done = self.done.lock();
        while !self.settled(seq) {
            self.done_cv.wait(&mut done);
        }
    }

    /// Run `callback` once the stream reaches `seq`: now on this thread if it has, else on
    /// the worker right after the item that reaches it.
    pub(super) fn on_reached(&self, seq: u64, callback: EventCallback) {
        let mut done = self.done.lock();
        // The worker bumps `completed` before taking `done`, so checking under the lock
        // cannot miss the item that completes `seq`.
        if self.reached(seq) {
            drop(done);
            callback();
        } else {
            done.callbacks.push((seq, callback));
        }
    }

    /// Queue a timing marker; returns the marker and the position after it.
    pub(super) fn push_mark(self: &Arc<Self>) -> DeviceResult<(Arc<Mark>, u64)> {
        let mark = Arc::new(Mark::default());
        let seq = self.push(Item::Mark(Arc::clone(&mark)))?;
        Ok((mark, seq))
    }

    /// Queue a wait on `other` reaching `seq`.
    pub(super) fn push_wait(
        self: &Arc<Self>,
        other: Arc<StreamShared>,
        seq: u64,
    ) -> DeviceResult<()> {
        self.push(Item::Wait(other, seq)).map(drop)
    }

    /// Launch a task, or record it while capturing.
    pub(super) fn launch(self: &Arc<Self>, task: HostTask) -> DeviceResult<()> {
        let mut q = self.queue.lock();
        if let Some(captured) = &q.capture {
            captured.lock().push(task);
            return Ok(());
        }
        self.push_locked(&mut q, std::iter::once(Item::Task(task)))
            .map(drop)
    }

    /// Queue several tasks at once (graph replay).
    pub(super) fn launch_all(self: &Arc<Self>, tasks: &[HostTask]) -> DeviceResult<()> {
        if tasks.is_empty() {
            return Ok(());
        }
        let mut q = self.queue.lock();
        if let Some(captured) = &q.capture {
            // Replaying inside a capture records the graph's tasks into the new one.
            captured.lock().extend(tasks.iter().cloned());
            return Ok(());
        }
        self.push_locked(&mut q, tasks.iter().cloned().map(Item::Task))
            .map(drop)
    }

    fn push(self: &Arc<Self>, item: Item) -> DeviceResult<u64> {
        let mut q = self.queue.lock();
        self.push_locked(&mut q, std::iter::once(item))
    }

    /// Append items; returns the new end of the stream.
    fn push_locked(
        self: &Arc<Self>,
        q: &mut parking_lot::MutexGuard<'_, Queue>,
        items: impl Iterator<Item = Item>,
    ) -> DeviceResult<u64> {
        if !q.worker_started {
            self.start_worker()?;
            q.worker_started = true;
        }
        let before = q.items.len();
        q.items.extend(items);
        let added = (q.items.len() - before) as u64;
        // Only writers holding the queue lock change `enqueued`.
        let end = self.enqueued.load(Ordering::Relaxed) + added;
        self.enqueued.store(end, Ordering::Release);
        self.work_cv.notify_one();
        Ok(end)
    }

    #[cold]
    fn start_worker(self: &Arc<Self>) -> DeviceResult<()> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("accelrt-{}", self.label))
            .spawn(move || me.worker())
            .map(drop)
            .map_err(|e| DeviceError::Driver {
                call: "std::thread::spawn (host stream worker)",
                code: None,
                message: format!("{}: {e}", self.label),
            })
    }

    pub(super) fn begin_capture(&self) -> DeviceResult<()> {
        let mut q = self.queue.lock();
        if q.capture.is_some() {
            return Err(DeviceError::Graph(format!(
                "{} is already capturing",
                self.label
            )));
        }
        q.capture = Some(CaptureBuffer::default());
        Ok(())
    }

    /// From now on, record this stream's launches into `origin`'s capture (a fork of the
    /// capture onto this stream). Captured work replays serialized in launch order, which
    /// keeps every cross-stream dependency of the capture.
    pub(super) fn join_capture(&self, origin: &StreamShared) -> DeviceResult<()> {
        let buffer = origin.queue.lock().capture.clone().ok_or_else(|| {
            DeviceError::Graph(format!(
                "{} is not capturing: {} cannot join its capture",
                origin.label, self.label
            ))
        })?;
        let mut q = self.queue.lock();
        if q.capture.is_some() {
            return Err(DeviceError::Graph(format!(
                "{} is already capturing",
                self.label
            )));
        }
        q.capture = Some(buffer);
        Ok(())
    }

    /// Stop recording into a joined capture (its origin stream ended it).
    pub(super) fn leave_capture(&self) {
        self.queue.lock().capture = None;
    }

    pub(super) fn end_capture(&self) -> DeviceResult<Vec<HostTask>> {
        let buffer = self
            .queue
            .lock()
            .capture
            .take()
            .ok_or_else(|| DeviceError::Graph(format!("{} is not capturing", self.label)))?;
        let tasks = std::mem::take(&mut *buffer.lock());
        Ok(tasks)
    }

    /// Errors kept since the last call (panicked tasks and callbacks), as one error.
    pub(super) fn take_errors(&self) -> DeviceResult<()> {
        self.errors.take(|t| DeviceError::Driver {
            call: "host task",
            code: None,
            message: format!(
                "{} error(s) on {} since the last synchronize: {}",
                t.count(),
                self.label,
                t.joined_messages()
            ),
        })
    }

    #[cold]
    fn keep_error(&self, what: &str, payload: Box<dyn std::any::Any + Send>) {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_string());
        self.errors.keep(DeviceError::Driver {
            call: "host task",
            code: None,
            message: format!("{what} panicked: {msg}"),
        });
    }

    /// An error when the calling thread is this stream's worker: waiting on the stream
    /// from one of its own tasks would wait forever.
    pub(super) fn check_not_worker(&self, what: &str) -> DeviceResult<()> {
        if CURRENT_WORKER.with(|w| w.get()) == self.id {
            return Err(DeviceError::InvalidArgument(format!(
                "cannot {what} from a task running on {} itself: it would wait for itself",
                self.label
            )));
        }
        Ok(())
    }

    fn worker(self: Arc<Self>) {
        CURRENT_WORKER.with(|w| w.set(self.id));
        loop {
            let item = {
                let mut q = self.queue.lock();
                loop {
                    if let Some(item) = q.items.pop_front() {
                        break item;
                    }
                    if q.shutdown {
                        return;
                    }
                    self.work_cv.wait(&mut q);
                }
            };
            match item {
                Item::Task(task) => {
                    if let Err(p) = catch_unwind(AssertUnwindSafe(|| task())) {
                        self.keep_error("a task", p);
                    }
                }
                Item::Mark(mark) => mark.stamp.store(now_stamp(), Ordering::Release),
                Item::Wait(other, seq) => other.wait_for(seq),
            }
            let completed = self.completed.fetch_add(1, Ordering::AcqRel) + 1;
            let ready = {
                let mut done = self.done.lock();
                let ready = take_ready(&mut done.callbacks, completed);
                if ready.is_empty() {
                    self.settled.store(completed, Ordering::Release);
                    self.done_cv.notify_all();
                }
                ready
            };
            if !ready.is_empty() {
                self.run_callbacks(ready, completed);
            }
        }
    }
}

impl StreamShared {
    #[cold]
    fn run_callbacks(&self, ready: Vec<EventCallback>, completed: u64) {
        for callback in ready {
            if let Err(p) = catch_unwind(AssertUnwindSafe(callback)) {
                self.keep_error("an event callback", p);
            }
        }
        let _done = self.done.lock();
        self.settled.store(completed, Ordering::Release);
        self.done_cv.notify_all();
    }
}

/// Remove and return the callbacks whose position has been reached, in registration order.
#[inline]
fn take_ready(callbacks: &mut Vec<(u64, EventCallback)>, completed: u64) -> Vec<EventCallback> {
    if callbacks.iter().all(|(seq, _)| *seq > completed) {
        return Vec::new();
    }
    let mut ready = Vec::new();
    for (seq, callback) in std::mem::take(callbacks) {
        if seq <= completed {
            ready.push(callback);
        } else {
            callbacks.push((seq, callback));
        }
    }
    ready
}

/// A host stream. Dropping it lets the worker finish what is queued, then exit.
pub struct HostStream {
    pub(super) shared: Arc<StreamShared>,
}

impl HostStream {
    pub(super) fn new(id: u64, device: u32) -> Self {
        HostStream {
            shared: Arc::new(StreamShared {
                id,
                label: format!("host:{device}/worker{id}"),
                enqueued: AtomicU64::new(0),
                completed: AtomicU64::new(0),
                settled: AtomicU64::new(0),
                queue: Mutex::new(Queue::default()),
                work_cv: Condvar::new(),
                done: Mutex::new(Done::default()),
                done_cv: Condvar::new(),
                errors: Deferred::default(),
            }),
        }
    }

    /// Number of items submitted so far (tasks, timing markers, waits).
    pub fn enqueued(&self) -> u64 {
        self.shared.end()
    }

    /// Number of items the worker has finished.
    pub fn completed(&self) -> u64 {
        self.shared.completed.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for HostStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStream")
            .field("label", &self.shared.label)
            .field("enqueued", &self.enqueued())
            .field("completed", &self.completed())
            .finish()
    }
}

impl Drop for HostStream {
    fn drop(&mut self) {
        self.shared.queue.lock().shutdown = true;
        self.shared.work_cv.notify_all();
    }
}
