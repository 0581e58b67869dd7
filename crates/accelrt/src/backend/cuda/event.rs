//! CUDA events from the event pool: `CU_EVENT_DISABLE_TIMING` unless timing is asked for.
//! `notify` waits for the event on a private stream and hands the callback to a dispatcher
//! thread, so callbacks may call CUDA (host functions may not).

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use super::context::Context;
use super::stream::CudaStream;
use super::sys::{self, CUevent};
use super::task::{check_not_in_host_task, panic_text};
use crate::driver::EventCallback;
use crate::error::{DeviceError, DeviceResult};

/// An event of a [`crate::backend::cuda::CudaDriver`].
pub struct CudaEvent {
    pub(crate) raw: CUevent,
    pub(crate) ctx: Arc<Context>,
    timing: bool,
}

// SAFETY: a CUevent is an opaque driver handle usable from any thread (the driver API is
// thread-safe); we never dereference it.
unsafe impl Send for CudaEvent {}
// SAFETY: as above; the handle is never mutated.
unsafe impl Sync for CudaEvent {}

impl std::fmt::Debug for CudaEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaEvent")
            .field("device", &self.ctx.ordinal)
            .field("timing", &self.timing)
            .finish()
    }
}

impl CudaEvent {
    pub(crate) fn create(ctx: Arc<Context>, timing: bool) -> DeviceResult<CudaEvent> {
        ctx.deferred.take()?;
        let raw = {
            let _current = ctx.bind()?;
            sys::event_create(timing)?
        };
        Ok(CudaEvent { raw, ctx, timing })
    }

    /// Whether the event records completion times.
    pub fn timing(&self) -> bool {
        self.timing
    }

    #[inline]
    pub(crate) fn record(&self, stream: &CudaStream) -> DeviceResult<()> {
        self.ctx.deferred.take()?;
        // SAFETY: the event is live while borrowed; the stream's handle is live or null (then
        // `call` makes its context, which is the event's, current).
        stream.call(|s| unsafe { sys::event_record(self.raw, s) })
    }

    #[inline]
    /// Make `stream` wait for this event (`cuStreamWaitEvent`; PyTorch's
    /// `Event.wait(stream)`).
    pub(crate) fn wait(&self, stream: &CudaStream) -> DeviceResult<()> {
        stream.ctx.deferred.take()?;
        // SAFETY: both handles are live (the event is borrowed for the call).
        stream.call(|s| unsafe { sys::stream_wait_event(s, self.raw) })
    }

    pub(crate) fn query(&self) -> DeviceResult<bool> {
        self.ctx.deferred.take()?;
        // SAFETY: the event is live while borrowed.
        Ok(unsafe { sys::event_query(self.raw) }?)
    }

    pub(crate) fn synchronize(&self) -> DeviceResult<()> {
        check_not_in_host_task("synchronize an event")?;
        self.ctx.deferred.take()?;
        // SAFETY: the event is live while borrowed.
        Ok(unsafe { sys::event_synchronize(self.raw) }?)
    }

    pub(crate) fn elapsed_ms(start: &CudaEvent, end: &CudaEvent) -> DeviceResult<f64> {
        start.ctx.deferred.take()?;
        // SAFETY: both events are live while borrowed.
        match unsafe { sys::event_elapsed_ms(start.raw, end.raw) } {
            Ok(ms) => Ok(f64::from(ms)),
            Err(e) if e.code == sys::CUresult::CUDA_ERROR_NOT_READY => Err(DeviceError::Event(
                "an event has not completed yet: synchronize it (or its stream) before asking \
                 for the elapsed time"
                    .into(),
            )),
            Err(e) => Err(e.into_error()),
        }
    }

    /// When this completed timing event completed, in ns on accelrt's clock. CUDA events
    /// carry no absolute time, only differences: a fresh timing event is recorded on the
    /// context's idle clock stream and waited for, the host clock is read as it completes,
    /// and the difference between the two events is taken from that reading. (The error is
    /// the few microseconds between the device completing the clock event and the host
    /// returning from the wait, plus `cuEventElapsedTime`'s resolution, ~0.5 us.)
    pub(crate) fn completion_ns(&self) -> DeviceResult<u64> {
        if !self.query()? {
            return Err(DeviceError::Event(
                "has not completed yet: synchronize it (or its stream) before asking for its \
                 completion time"
                    .into(),
            ));
        }
        check_not_in_host_task("read an event's completion time")?;
        let now = CudaEvent::create(Arc::clone(&self.ctx), true)?;
        let stream = self.ctx.clock_stream()?;
        // SAFETY: both handles are live (the clock stream lives as long as the context, which
        // `now` keeps alive).
        unsafe { sys::event_record(now.raw, stream.raw) }?;
        // SAFETY: `now` is live while borrowed.
        unsafe { sys::event_synchronize(now.raw) }?;
        let host_now = crate::event::clock_ns();
        // SAFETY: both events are live; both completed (checked above, and just waited for).
        let ms = unsafe { sys::event_elapsed_ms(self.raw, now.raw) }?;
        let before_now = (f64::from(ms.max(0.0)) * 1e6) as u64;
        Ok(host_now.saturating_sub(before_now))
    }

    pub(crate) fn notify(&self, callback: EventCallback) -> DeviceResult<()> {
        self.ctx.deferred.take()?;
        let sender = dispatcher()?;
        let stream = self.ctx.notify_stream()?;
        // SAFETY: both handles are live (the notify stream lives as long as the context).
        unsafe { sys::stream_wait_event(stream.raw, self.raw) }?;
        let job = Box::into_raw(Box::new(NotifyJob {
            callback,
            ctx: Arc::clone(&self.ctx),
            sender,
        }));
        // SAFETY: `job` is a fresh box handed to this one launch; `send_job` takes it back.
        let launched = unsafe { sys::launch_host_func(stream.raw, send_job, job.cast::<c_void>()) };
        if let Err(e) = launched {
            // SAFETY: the launch failed, so the driver never took `job`; we still own it.
            drop(unsafe { Box::from_raw(job) });
            return Err(e.into_error());
        }
        Ok(())
    }
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        // SAFETY: we created the event and own it; the pool drops it only when no handle can
        // reach it any more. (Destroying an event that work still waits on is allowed: the
        // driver releases it once that work is done.)
        if let Err(e) = unsafe { sys::event_destroy(self.raw) } {
            self.ctx.deferred.keep(e.into_error());
        }
    }
}

// ---- the notify dispatcher ---------------------------------------------------------------

struct NotifyJob {
    callback: EventCallback,
    ctx: Arc<Context>,
    sender: &'static Mutex<mpsc::Sender<Dispatched>>,
}

struct Dispatched {
    callback: EventCallback,
    ctx: Arc<Context>,
}

/// Host function of a notify launch: only moves the callback to the dispatcher thread (no
/// CUDA call here, as CUDA requires).
unsafe extern "C" fn send_job(data: *mut c_void) {
    // SAFETY: `data` is `Box::into_raw` of a NotifyJob given to exactly one (uncaptured)
    // launch, so this is its only use.
    let job = unsafe { Box::from_raw(data.cast::<NotifyJob>()) };
    let NotifyJob {
        callback,
        ctx,
        sender,
    } = *job;
    let sent = match sender.lock() {
        Ok(s) => s
            .send(Dispatched {
                callback,
                ctx: Arc::clone(&ctx),
            })
            .is_ok(),
        Err(_) => false,
    };
    if !sent {
        ctx.deferred
            .keep("an event callback was dropped: the notify dispatcher thread is gone");
    }
}

/// The dispatcher thread's queue, started on first use.
fn dispatcher() -> DeviceResult<&'static Mutex<mpsc::Sender<Dispatched>>> {
    static SENDER: OnceLock<Mutex<mpsc::Sender<Dispatched>>> = OnceLock::new();
    static INIT: Mutex<()> = Mutex::new(());
    if let Some(s) = SENDER.get() {
        return Ok(s);
    }
    let _init = INIT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = SENDER.get() {
        return Ok(s);
    }
    let (tx, rx) = mpsc::channel::<Dispatched>();
    std::thread::Builder::new()
        .name("accelrt-cuda-notify".into())
        .spawn(move || {
            for job in rx {
                if let Err(p) = catch_unwind(AssertUnwindSafe(job.callback)) {
                    job.ctx
                        .deferred
                        .keep(format!("an event callback panicked: {}", panic_text(&*p)));
                }
            }
        })
        .map_err(|e| DeviceError::Driver {
            call: "std::thread::spawn",
            code: None,
            message: format!("starting the CUDA event-callback thread: {e}"),
        })?;
    Ok(SENDER.get_or_init(|| Mutex::new(tx)))
}
