//! One opened adapter: its wgpu device and queue, the submission numbers that events are
//! positions on, and the errors wgpu reports asynchronously.
//!
//! Every submission to the queue goes through [`DeviceShared::submit`], which numbers it
//! (1, 2, ...) under one lock, so numbers follow queue order, and registers a
//! `Queue::on_submitted_work_done` callback that raises `done` to the number once the GPU has
//! finished it. A position on the device is a number: it has completed once `done` reaches it.
//! Callbacks run inside `Device::poll` (or a later submit); [`DeviceShared::poll`] and
//! [`DeviceShared::wait`] drive them.
//!
//! Also here: opening adapters ([`open_all`]); beside it, what the device holds and what
//! holds the device: `points.rs` (positions on the queue, timing slots, the event notifier)
//! and `pipelines.rs` (the compute kernels, compiled on first use).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use accelrt::error::{DeviceError, DeviceResult};
use parking_lot::Mutex;

use crate::adapter::{self, MemoryFigures};

pub(crate) mod pipelines;
pub(crate) mod points;

use pipelines::Kernels;
use points::{Notifier, SlotPool};

/// Submissions in flight: our number and wgpu's index, oldest first.
#[derive(Default)]
struct Submissions {
    last: u64,
    in_flight: VecDeque<(u64, wgpu::SubmissionIndex)>,
}

/// Errors wgpu reported outside any error scope, and whether the device was lost.
#[derive(Default)]
pub(crate) struct DeviceErrors {
    pending: AtomicBool,
    messages: Mutex<Vec<String>>,
    lost: Mutex<Option<String>>,
}

impl DeviceErrors {
    fn keep(&self, message: String) {
        self.messages.lock().push(message);
        self.pending.store(true, Ordering::Release);
    }
}

/// How GPU timestamps map onto accelrt's clock: `clock_ns = host_ns + (ticks - gpu_ticks) *
/// period`, measured by a round trip.
#[derive(Clone, Copy, Debug)]
struct Calibration {
    host_ns: u64,
    gpu_ticks: u64,
    taken: Instant,
}

/// Recalibrate GPU timestamps against the host clock when the last calibration is older
/// than this (clocks drift by parts per million).
const CALIBRATION_MAX_AGE_S: u64 = 10;

/// An opened adapter.
pub(crate) struct DeviceShared {
    pub(crate) index: u32,
    pub(crate) adapter: wgpu::Adapter,
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) info: wgpu::AdapterInfo,
    pub(crate) limits: wgpu::Limits,
    /// `Features::TIMESTAMP_QUERY` is enabled: timing events work.
    pub(crate) timestamps: bool,
    /// Nanoseconds per timestamp tick.
    pub(crate) timestamp_period: f64,
    /// Memory figures read when the device was opened.
    pub(crate) memory: MemoryFigures,
    submissions: Mutex<Submissions>,
    done: Arc<AtomicU64>,
    errors: Arc<DeviceErrors>,
    kernels: OnceLock<std::result::Result<Kernels, String>>,
    calibration: Mutex<Option<Calibration>>,
    pub(crate) slots: SlotPool,
    pub(crate) notifier: Notifier,
}

impl std::fmt::Debug for DeviceShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceShared")
            .field("index", &self.index)
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("done", &self.done.load(Ordering::Relaxed))
            .finish()
    }
}

/// A wgpu call that failed, with wgpu's text.
pub(crate) fn wgpu_error(call: &'static str, message: impl std::fmt::Display) -> DeviceError {
    DeviceError::Driver {
        call,
        code: None,
        message: message.to_string(),
    }
}

/// Open every adapter (filtered by `WGPU_ADAPTER_NAME`, a case-insensitive part of the
/// name), best first; or say why there is none.
pub(crate) fn open_all() -> std::result::Result<Vec<Arc<DeviceShared>>, String> {
    let backends = adapter::backends();
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
    let found: Vec<String> = adapters
        .iter()
        .map(|a| format!("{} ({:?})", a.get_info().name, a.get_info().backend))
        .collect();
    let filter = std::env::var("WGPU_ADAPTER_NAME")
        .ok()
        .filter(|f| !f.is_empty());
    if let Some(f) = &filter {
        let f = f.to_lowercase();
        adapters.retain(|a| a.get_info().name.to_lowercase().contains(&f));
    }
    adapters.sort_by_key(|a| adapter::rank(a.get_info().device_type));
    let mut devices = Vec::new();
    let mut refused = Vec::new();
    for adapter in adapters {
        match open(devices.len() as u32, adapter) {
            Ok(d) => devices.push(d),
            Err(e) => refused.push(e),
        }
    }
    if devices.is_empty() {
        let mut reason = format!("no wgpu adapter on backends {backends:?}");
        if let Some(f) = &filter {
            reason += &format!(" named like WGPU_ADAPTER_NAME={f:?} (found: {found:?})");
        } else if found.is_empty() {
            reason += " (no Vulkan, Metal or DX12 driver was found: on Linux install a Vulkan \
                       driver and loader, e.g. Debian's mesa-vulkan-drivers and libvulkan1 for \
                       the CPU's lavapipe)";
        }
        if !refused.is_empty() {
            reason += &format!("; could not open: {}", refused.join("; "));
        }
        return Err(reason);
    }
    Ok(devices)
}

/// Open one adapter with every limit it has and the features accelrt uses.
fn open(index: u32, adapter: wgpu::Adapter) -> std::result::Result<Arc<DeviceShared>, String> {
    let info = adapter.get_info();
    let wanted = wgpu::Features::TIMESTAMP_QUERY;
    let descriptor = wgpu::DeviceDescriptor {
        label: Some("accelrt"),
        required_features: adapter.features() & wanted,
        required_limits: adapter.limits(),
        ..Default::default()
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&descriptor))
        .map_err(|e| format!("{} ({:?}): {e}", info.name, info.backend))?;
    let memory = adapter::memory_figures(&adapter);
    Ok(DeviceShared::new(index, adapter, device, queue, memory))
}

impl DeviceShared {
    pub(crate) fn new(
        index: u32,
        adapter: wgpu::Adapter,
        device: wgpu::Device,
        queue: wgpu::Queue,
        memory: MemoryFigures,
    ) -> Arc<Self> {
        // Start accelrt's clock (its epoch is its first use) before any GPU work: completion
        // times are on it, and one earlier than the epoch could not be told.
        accelrt::event::clock_ns();
        let errors = Arc::new(DeviceErrors::default());
        let kept = Arc::clone(&errors);
        // Without a handler wgpu panics on errors raised outside an error scope: keep them
        // for the next synchronize instead, as CUDA keeps asynchronous errors.
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| kept.keep(e.to_string())));
        let lost = Arc::clone(&errors);
        device.set_device_lost_callback(move |reason, message| {
            *lost.lost.lock() = Some(format!("{reason:?}: {message}"));
        });
        let features = device.features();
        let timestamps = features.contains(wgpu::Features::TIMESTAMP_QUERY);
        let timestamp_period = f64::from(queue.get_timestamp_period());
        Arc::new(DeviceShared {
            index,
            info: adapter.get_info(),
            limits: device.limits(),
            adapter,
            device,
            queue,
            timestamps,
            timestamp_period,
            memory,
            submissions: Mutex::new(Submissions::default()),
            done: Arc::new(AtomicU64::new(0)),
            errors,
            kernels: OnceLock::new(),
            calibration: Mutex::new(None),
            slots: SlotPool::default(),
            notifier: Notifier::default(),
        })
    }

    /// A label for messages: `wgpu:0 (llvmpipe ..., Vulkan)`.
    pub(crate) fn label(&self) -> String {
        format!(
            "{}:{} ({}, {:?})",
            crate::NAME,
            self.index,
            self.info.name,
            self.info.backend
        )
    }

    /// The compute pipelines, built on first use.
    pub(crate) fn kernels(&self) -> DeviceResult<&Kernels> {
        self.kernels
            .get_or_init(|| Kernels::new(self))
            .as_ref()
            .map_err(|e| wgpu_error("wgpu::Device::create_compute_pipeline", e))
    }

    /// Refuse work on a lost device, naming wgpu's reason.
    pub(crate) fn check_lost(&self, call: &'static str) -> DeviceResult<()> {
        match &*self.errors.lost.lock() {
            Some(reason) => Err(wgpu_error(
                call,
                format!("the device {} was lost: {reason}", self.label()),
            )),
            None => Ok(()),
        }
    }

    /// Errors wgpu raised outside error scopes since the last call, as one error.
    pub(crate) fn take_errors(&self) -> DeviceResult<()> {
        if let Some(reason) = &*self.errors.lost.lock() {
            return Err(wgpu_error(
                "wgpu::Device",
                format!("the device {} was lost: {reason}", self.label()),
            ));
        }
        if !self.errors.pending.load(Ordering::Acquire) {
            return Ok(());
        }
        let messages = std::mem::take(&mut *self.errors.messages.lock());
        self.errors.pending.store(false, Ordering::Release);
        if messages.is_empty() {
            return Ok(());
        }
        Err(wgpu_error(
            "wgpu (an error raised asynchronously)",
            format!(
                "{} error(s) on {} since the last synchronize: {}",
                messages.len(),
                self.label(),
                messages.join("; ")
            ),
        ))
    }

    /// Run `f` inside validation and out-of-memory error scopes of the calling thread: an
    /// error wgpu raises there comes back here, with wgpu's text, instead of going to the
    /// uncaptured-error handler.
    pub(crate) fn scoped<R>(&self, call: &'static str, f: impl FnOnce() -> R) -> DeviceResult<R> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let r = f();
        let invalid = pollster::block_on(validation.pop());
        let out_of_memory = pollster::block_on(oom.pop());
        if let Some(e) = invalid.or(out_of_memory) {
            return Err(wgpu_error(call, e));
        }
        Ok(r)
    }

    /// Submit `commands` after `stage` (which may queue `Queue::write_buffer` data: wgpu runs
    /// it at the start of this submission); returns the submission's number.
    pub(crate) fn submit(
        &self,
        stage: impl FnOnce(&wgpu::Queue),
        commands: Option<wgpu::CommandBuffer>,
    ) -> DeviceResult<u64> {
        self.check_lost("wgpu::Queue::submit")?;
        let mut subs = self.submissions.lock();
        stage(&self.queue);
        let index = self.queue.submit(commands);
        let n = subs.last + 1;
        subs.last = n;
        let done = Arc::clone(&self.done);
        // Registered under the lock right after our submit, so "the previous submit" this
        // callback is about is this one.
        self.queue.on_submitted_work_done(move || {
            done.fetch_max(n, Ordering::AcqRel);
        });
        subs.in_flight.push_back((n, index));
        Ok(n)
    }

    /// The highest submission number the GPU is known to have finished.
    #[inline]
    pub(crate) fn done(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    /// Whether submission `n` has finished, polling the device once if it is not known yet.
    #[inline]
    pub(crate) fn query(&self, n: u64) -> DeviceResult<bool> {
        if self.done() >= n {
            return Ok(true);
        }
        self.poll()?;
        Ok(self.done() >= n)
    }

    /// Poll the device once without blocking (runs the callbacks of finished submissions).
    pub(crate) fn poll(&self) -> DeviceResult<()> {
        let last = self.submissions.lock().last;
        let status = self
            .device
            .poll(wgpu::PollType::Poll)
            .map_err(|e| wgpu_error("wgpu::Device::poll", e))?;
        if status.is_queue_empty() {
            // Nothing was in flight when the poll began: everything up to `last` is done.
            self.done.fetch_max(last, Ordering::AcqRel);
        }
        self.forget_finished();
        Ok(())
    }

    /// Block until submission `n` has finished.
    pub(crate) fn wait(&self, n: u64) -> DeviceResult<()> {
        self.wait_timeout(n, None).map(drop)
    }

    /// Block until submission `n` has finished or `timeout` has passed; whether it finished.
    pub(crate) fn wait_timeout(&self, n: u64, timeout: Option<Duration>) -> DeviceResult<bool> {
        while self.done() < n {
            let index = {
                let subs = self.submissions.lock();
                subs.in_flight
                    .iter()
                    .find(|(m, _)| *m >= n)
                    .map(|(m, i)| (*m, i.clone()))
            };
            let Some((m, index)) = index else {
                // Already forgotten: finished (forget_finished only drops finished ones).
                self.done.fetch_max(n, Ordering::AcqRel);
                break;
            };
            match self.device.poll(wgpu::PollType::Wait {
                submission_index: Some(index),
                timeout,
            }) {
                Ok(_) => {}
                Err(wgpu::PollError::Timeout) => return Ok(false),
                Err(e) => return Err(wgpu_error("wgpu::Device::poll (wait for a submission)", e)),
            }
            // The wait for `m` succeeded: it and everything before it have finished, whether
            // or not this thread ran their callbacks (another poll may have taken them).
            self.done.fetch_max(m, Ordering::AcqRel);
        }
        self.forget_finished();
        self.check_lost("wgpu::Device::poll")?;
        Ok(true)
    }

    /// Drop finished submissions from the in-flight list.
    fn forget_finished(&self) {
        let done = self.done();
        let mut subs = self.submissions.lock();
        while subs.in_flight.front().is_some_and(|(m, _)| *m <= done) {
            subs.in_flight.pop_front();
        }
    }

    /// The last submission number handed out.
    pub(crate) fn last_submitted(&self) -> u64 {
        self.submissions.lock().last
    }

    /// Convert GPU timestamp ticks to ns on accelrt's clock ([`accelrt::event::clock_ns`]),
    /// calibrating (again) when needed.
    pub(crate) fn ticks_to_clock_ns(&self, ticks: u64) -> DeviceResult<u64> {
        let fresh = self
            .calibration
            .lock()
            .filter(|c| c.taken.elapsed().as_secs() < CALIBRATION_MAX_AGE_S);
        let c = match fresh {
            Some(c) => c,
            None => {
                let c = self.calibrate()?;
                *self.calibration.lock() = Some(c);
                c
            }
        };
        let delta = (ticks as f64 - c.gpu_ticks as f64) * self.timestamp_period;
        Ok((c.host_ns as f64 + delta).max(0.0) as u64)
    }

    /// Round trips of one timestamp write: the host time halfway through the shortest of
    /// them is taken as the moment the GPU wrote its timestamp.
    fn calibrate(&self) -> DeviceResult<Calibration> {
        let mut best: Option<(u64, Calibration)> = None;
        for _ in 0..5 {
            let slot = self.slots.take(self)?;
            let before = accelrt::event::clock_ns();
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("accelrt calibration"),
                });
            slot.encode(&mut encoder);
            let n = self.submit(|_| {}, Some(encoder.finish()))?;
            self.wait(n)?;
            let after = accelrt::event::clock_ns();
            let ticks = slot.read(self)?;
            self.slots.give(slot);
            let round_trip = after.saturating_sub(before);
            let c = Calibration {
                host_ns: before + round_trip / 2,
                gpu_ticks: ticks,
                taken: Instant::now(),
            };
            if best.is_none_or(|(rt, _)| round_trip < rt) {
                best = Some((round_trip, c));
            }
        }
        Ok(best.expect("five rounds ran").1)
    }
}

/// Map a `MAP_READ` buffer whose writes have finished and copy it out.
pub(crate) fn map_read(dev: &DeviceShared, buffer: &wgpu::Buffer) -> DeviceResult<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    buffer.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    let mapped = loop {
        // The buffer's writes have finished, so the mapping completes at the next poll; a
        // short wait only guards against a driver that is slow to report it (a wait for "the
        // latest submission" could otherwise sit behind other streams' long kernels).
        dev.poll()?;
        if let Ok(r) = rx.try_recv() {
            break r;
        }
        dev.check_lost("wgpu::Buffer::map_async")?;
        match dev.device.poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: Some(Duration::from_millis(1)),
        }) {
            Ok(_) | Err(wgpu::PollError::Timeout) => {}
            Err(e) => {
                return Err(wgpu_error(
                    "wgpu::Device::poll (map a buffer for reading)",
                    e,
                ))
            }
        }
        if let Ok(r) = rx.try_recv() {
            break r;
        }
    };
    mapped.map_err(|e| wgpu_error("wgpu::Buffer::map_async", e))?;
    let bytes = buffer
        .get_mapped_range(..)
        .map_err(|e| wgpu_error("wgpu::Buffer::get_mapped_range", e))?
        .to_vec();
    buffer.unmap();
    Ok(bytes)
}
