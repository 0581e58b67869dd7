//! Positions on the device's queue and what waits for them: a [`Point`] is a submission
//! number (or not yet known); timing points carry a [`TimingSlot`] from the device's
//! [`SlotPool`]; the device's [`Notifier`] runs event callbacks once their points complete.
//! The device holds the slot pool and the notifier, and they hold points: they live here,
//! beside the device (`device.rs`), which they ask for submissions' progress.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use accelrt::driver::EventCallback;
use accelrt::error::{DeviceError, DeviceResult};
use parking_lot::{Condvar, Mutex};

use super::{map_read, wgpu_error, DeviceShared};

/// A point not resolved yet.
const UNRESOLVED: u64 = u64::MAX;

/// A query set of one timestamp, with the buffers to bring it to the host.
pub(crate) struct TimingSlot {
    query_set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
}

impl TimingSlot {
    fn new(dev: &DeviceShared) -> DeviceResult<Self> {
        dev.scoped("wgpu::Device::create_query_set", || TimingSlot {
            query_set: dev.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("accelrt timing event"),
                ty: wgpu::QueryType::Timestamp,
                count: 1,
            }),
            resolve: dev.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("accelrt timestamp"),
                size: 8,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            readback: dev.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("accelrt timestamp readback"),
                size: 8,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        })
    }

    /// Write a timestamp once all earlier work on the queue has finished (an empty compute
    /// pass with an end-of-pass timestamp: bottom of the pipe on Vulkan), and bring it to
    /// the readback buffer.
    pub(crate) fn encode(&self, e: &mut wgpu::CommandEncoder) {
        drop(e.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("accelrt timestamp"),
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: &self.query_set,
                beginning_of_pass_write_index: None,
                end_of_pass_write_index: Some(0),
            }),
        }));
        e.resolve_query_set(&self.query_set, 0..1, &self.resolve, 0);
        e.copy_buffer_to_buffer(&self.resolve, 0, &self.readback, 0, 8);
    }

    /// The timestamp (in ticks), once the submission that wrote it has finished.
    pub(crate) fn read(&self, dev: &DeviceShared) -> DeviceResult<u64> {
        let bytes = map_read(dev, &self.readback)?;
        let ticks: [u8; 8] = bytes[..8].try_into().expect("an 8-byte buffer");
        Ok(u64::from_le_bytes(ticks))
    }
}

/// Timing slots of one device, reused by later timing records.
#[derive(Clone, Default)]
pub(crate) struct SlotPool(Arc<Mutex<Vec<TimingSlot>>>);

impl SlotPool {
    pub(crate) fn take(&self, dev: &DeviceShared) -> DeviceResult<TimingSlot> {
        match self.0.lock().pop() {
            Some(slot) => Ok(slot),
            None => TimingSlot::new(dev),
        }
    }

    pub(crate) fn give(&self, slot: TimingSlot) {
        self.0.lock().push(slot);
    }
}

/// A timing point's slot and the timestamp read from it.
struct Timing {
    slot: Option<TimingSlot>,
    pool: SlotPool,
    ticks: OnceLock<u64>,
}

/// A position in the device's queue: a submission number, or not yet known.
pub(crate) struct Point {
    n: AtomicU64,
    /// A timing point whose timestamp could not be written.
    failed: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
    /// The stream whose worker resolves it while it is not resolved.
    pub(crate) stream_id: u64,
    timing: Option<Timing>,
    notifier: Notifier,
}

impl std::fmt::Debug for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Point")
            .field("submission", &self.resolved())
            .field("stream", &self.stream_id)
            .field("timing", &self.timing.is_some())
            .finish()
    }
}

impl Drop for Point {
    fn drop(&mut self) {
        if let Some(t) = &mut self.timing {
            if let Some(slot) = t.slot.take() {
                // Any later use of the slot is submitted after this point's timestamp.
                t.pool.give(slot);
            }
        }
    }
}

impl Point {
    /// An unresolved point of stream `stream_id`.
    pub(crate) fn new(stream_id: u64, notifier: &Notifier) -> Self {
        Point {
            n: AtomicU64::new(UNRESOLVED),
            failed: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            stream_id,
            timing: None,
            notifier: notifier.clone(),
        }
    }

    /// An unresolved timing point, with a slot from the device's pool.
    pub(crate) fn timed(stream_id: u64, dev: &DeviceShared) -> DeviceResult<Self> {
        let slot = dev.slots.take(dev)?;
        let mut point = Point::new(stream_id, &dev.notifier);
        point.timing = Some(Timing {
            slot: Some(slot),
            pool: dev.slots.clone(),
            ticks: OnceLock::new(),
        });
        Ok(point)
    }

    /// The point is submission `n` (0: nothing to wait for).
    pub(crate) fn resolve(&self, n: u64) {
        {
            let _g = self.lock.lock();
            self.n.store(n, Ordering::Release);
            self.cv.notify_all();
        }
        self.notifier.wake();
    }

    /// The timestamp of this timing point was not written (the error is the stream's).
    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// The submission number, once known.
    #[inline]
    pub(crate) fn resolved(&self) -> Option<u64> {
        match self.n.load(Ordering::Acquire) {
            UNRESOLVED => None,
            n => Some(n),
        }
    }

    /// Block until the point is resolved.
    pub(crate) fn wait_resolved(&self) -> u64 {
        let mut g = self.lock.lock();
        loop {
            if let Some(n) = self.resolved() {
                return n;
            }
            self.cv.wait(&mut g);
        }
    }

    pub(crate) fn timing_slot(&self) -> Option<&TimingSlot> {
        self.timing.as_ref().and_then(|t| t.slot.as_ref())
    }

    /// Whether the point has been reached (polling the device once if needed).
    #[inline]
    pub(crate) fn query(&self, dev: &DeviceShared) -> DeviceResult<bool> {
        match self.resolved() {
            Some(n) => dev.query(n),
            None => Ok(false),
        }
    }

    /// The timestamp of a completed timing point, in ticks (`which`: "start " or "end ").
    pub(crate) fn ticks(&self, dev: &DeviceShared, which: &str) -> DeviceResult<u64> {
        let timing = self.timing.as_ref().ok_or_else(|| {
            DeviceError::Event(format!(
                "the {which}event was not recorded with timing: events were not created with \
                 enable_timing=true"
            ))
        })?;
        if let Some(&t) = timing.ticks.get() {
            return Ok(t);
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(DeviceError::Event(format!(
                "the timestamp of the {which}event could not be written: the stream's next \
                 synchronize reports why"
            )));
        }
        if !self.query(dev)? {
            return Err(DeviceError::Event(format!(
                "the {which}event has not completed yet: synchronize it (or its stream) before \
                 asking for its time"
            )));
        }
        let slot = timing.slot.as_ref().expect("a timing point keeps its slot");
        let t = slot.read(dev)?;
        Ok(*timing.ticks.get_or_init(|| t))
    }
}

/// Runs event callbacks once their points complete, on one thread per device (started on
/// first use).
#[derive(Clone, Default)]
pub(crate) struct Notifier(Arc<NotifierInner>);

#[derive(Default)]
struct NotifierInner {
    state: Mutex<NotifyState>,
    cv: Condvar,
}

#[derive(Default)]
struct NotifyState {
    waiting: Vec<(Arc<Point>, EventCallback)>,
    started: bool,
}

/// How long the notifier waits on the GPU before looking at new callbacks again.
const NOTIFY_SLICE: Duration = Duration::from_millis(5);

impl Notifier {
    /// Run `callback` once `point` completes: now, on this thread, if it has.
    pub(crate) fn add(
        &self,
        dev: &Arc<DeviceShared>,
        point: Arc<Point>,
        callback: EventCallback,
    ) -> DeviceResult<()> {
        if point.query(dev)? {
            callback();
            return Ok(());
        }
        let mut state = self.0.state.lock();
        if !state.started {
            let inner = Arc::clone(&self.0);
            let weak = Arc::downgrade(dev);
            std::thread::Builder::new()
                .name(format!("accelrt-wgpu{}-notify", dev.index))
                .spawn(move || notify_loop(&inner, &weak))
                .map_err(|e| wgpu_error("std::thread::spawn (wgpu event notifier)", e))?;
            state.started = true;
        }
        state.waiting.push((point, callback));
        self.0.cv.notify_all();
        Ok(())
    }

    /// A point was resolved: look again.
    pub(crate) fn wake(&self) {
        if self.0.state.lock().waiting.is_empty() {
            return;
        }
        self.0.cv.notify_all();
    }
}

fn notify_loop(inner: &NotifierInner, device: &Weak<DeviceShared>) {
    loop {
        let mut state = inner.state.lock();
        while state.waiting.is_empty() {
            inner.cv.wait(&mut state);
        }
        let Some(dev) = device.upgrade() else { return };
        let done = dev.done();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut state.waiting)
            .into_iter()
            .partition(|(p, _)| p.resolved().is_some_and(|n| n <= done));
        state.waiting = waiting;
        let target = state.waiting.iter().filter_map(|(p, _)| p.resolved()).min();
        if !ready.is_empty() {
            drop(state);
            for (_, callback) in ready {
                if let Err(p) = catch_unwind(AssertUnwindSafe(callback)) {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic payload".into());
                    eprintln!("accelrt-wgpu: an event callback panicked: {msg}");
                }
            }
            continue;
        }
        match target {
            Some(n) => {
                drop(state);
                if let Err(e) = dev.wait_timeout(n, Some(NOTIFY_SLICE)) {
                    // A lost device: the callbacks would never run; say so once per slice.
                    eprintln!("accelrt-wgpu: event notifier: {e}");
                    std::thread::sleep(NOTIFY_SLICE);
                }
            }
            None => {
                // Only unresolved points: their streams wake us when they resolve them.
                inner.cv.wait_for(&mut state, NOTIFY_SLICE * 10);
            }
        }
    }
}
