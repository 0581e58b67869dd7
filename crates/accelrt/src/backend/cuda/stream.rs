//! CUDA streams: created by the backend (non-blocking, with a priority), the device's legacy
//! default stream (handle 0, like PyTorch's default stream), or a stream created elsewhere
//! (PyTorch's) that the backend uses without owning. Host tasks run through
//! `cuLaunchHostFunc`.

use std::ffi::c_void;
use std::sync::Arc;

use parking_lot::Mutex;

use super::context::{Context, DeviceErrors};
use super::sys::{self, CUgraph, CUstream, CuResult};
use super::task::{check_not_in_host_task, run_task_kept, run_task_once, TaskBox};
use crate::driver::HostTask;
use crate::error::{DeviceError, DeviceResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ownership {
    /// Created by the backend; destroyed on drop.
    Owned,
    /// The legacy default stream (handle 0) of the context.
    Default,
    /// Created elsewhere (e.g. by PyTorch); never destroyed by us.
    External,
}

/// A stream of a [`crate::backend::cuda::CudaDriver`].
pub struct CudaStream {
    pub(crate) raw: CUstream,
    pub(crate) ctx: Arc<Context>,
    ownership: Ownership,
    /// Panics of host tasks, reported by the next synchronize.
    errors: Arc<DeviceErrors>,
    /// Boxes of host tasks launched while the stream was capturing; moved into the graph at
    /// `end_capture` (boxed: the driver holds their addresses, which must not move).
    #[allow(clippy::vec_box)]
    captured: Mutex<Vec<Box<TaskBox>>>,
    /// Serialises capture begin/end with host-task launches (which must know whether they are
    /// being captured).
    capture_lock: Mutex<()>,
}

// SAFETY: the CUstream handle is an opaque driver handle usable from any thread; every other
// field is Send + Sync (TaskBox holds an `Arc<dyn Fn + Send + Sync>`).
unsafe impl Send for CudaStream {}
// SAFETY: as above; the handle itself is never mutated.
unsafe impl Sync for CudaStream {}

impl std::fmt::Debug for CudaStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaStream")
            .field("device", &self.ctx.ordinal)
            .field("handle", &self.raw)
            .field("ownership", &self.ownership)
            .finish()
    }
}

impl CudaStream {
    fn new(raw: CUstream, ctx: Arc<Context>, ownership: Ownership) -> CudaStream {
        CudaStream {
            raw,
            ctx,
            ownership,
            errors: Arc::new(DeviceErrors::default()),
            captured: Mutex::new(Vec::new()),
            capture_lock: Mutex::new(()),
        }
    }

    /// The legacy default stream of the context (native handle 0).
    pub(crate) fn default_stream(ctx: Arc<Context>) -> CudaStream {
        CudaStream::new(std::ptr::null_mut(), ctx, Ownership::Default)
    }

    /// A new non-blocking stream at CUDA priority `priority`.
    pub(crate) fn create(ctx: Arc<Context>, priority: i32) -> DeviceResult<CudaStream> {
        ctx.deferred.take()?;
        let raw = {
            let _current = ctx.bind()?;
            sys::stream_create(priority)?
        };
        Ok(CudaStream::new(raw, ctx, Ownership::Owned))
    }

    /// Use a stream created elsewhere, without owning it.
    ///
    /// # Safety
    /// `handle` must be 0 or a live `CUstream`, and stay alive while this value is used.
    pub(crate) unsafe fn external(ctx: Arc<Context>, handle: u64) -> DeviceResult<CudaStream> {
        if handle == 0 {
            return Ok(CudaStream::default_stream(ctx));
        }
        let raw = handle as usize as CUstream;
        // SAFETY: the caller guarantees `raw` is a live stream.
        let owner = unsafe { sys::stream_get_ctx(raw)? };
        if owner != ctx.raw {
            return Err(DeviceError::InvalidArgument(format!(
                "stream {handle:#x} does not belong to the primary context of cuda:{} (it was \
                 created in another context or on another device): wrap it on its own device",
                ctx.ordinal
            )));
        }
        Ok(CudaStream::new(raw, ctx, Ownership::External))
    }

    /// The native handle (`CUstream` address; 0 for the legacy default stream).
    pub fn handle(&self) -> u64 {
        self.raw as usize as u64
    }

    /// The device the stream belongs to.
    pub fn device(&self) -> u32 {
        self.ctx.ordinal
    }

    /// Whether this is the legacy default stream.
    pub fn is_default(&self) -> bool {
        self.ownership == Ownership::Default
    }

    /// Run `f` on the handle; for the default stream (handle 0, which means "the current
    /// context's"), with this stream's context made current first.
    #[inline]
    pub(crate) fn call<R>(&self, f: impl FnOnce(CUstream) -> CuResult<R>) -> DeviceResult<R> {
        if self.raw.is_null() {
            let _current = self.ctx.bind()?;
            return Ok(f(self.raw)?);
        }
        Ok(f(self.raw)?)
    }

    pub(crate) fn synchronize(&self) -> DeviceResult<()> {
        check_not_in_host_task("synchronize a stream")?;
        self.ctx.deferred.take()?;
        // SAFETY: `self.raw` is live (owned, external per the wrap contract, or null).
        self.call(|s| unsafe { sys::stream_synchronize(s) })?;
        self.take_errors()
    }

    /// The host-task panics kept since the last synchronize.
    pub(crate) fn take_errors(&self) -> DeviceResult<()> {
        self.errors.take().map_err(|e| match e {
            DeviceError::Driver { message, code, .. } => DeviceError::Driver {
                call: "host task",
                code,
                message: format!(
                    "on cuda:{} stream {:#x}: {message}",
                    self.ctx.ordinal,
                    self.handle()
                ),
            },
            other => other,
        })
    }

    #[inline]
    pub(crate) fn query(&self) -> DeviceResult<bool> {
        self.ctx.deferred.take()?;
        // SAFETY: `self.raw` is live or null.
        self.call(|s| unsafe { sys::stream_query(s) })
    }

    pub(crate) fn launch_host(&self, task: HostTask) -> DeviceResult<()> {
        self.ctx.deferred.take()?;
        let _capture = self.capture_lock.lock();
        // SAFETY: `self.raw` is live or null.
        let capturing = self.call(|s| unsafe { sys::stream_is_capturing(s) })?;
        let boxed = Box::new(TaskBox {
            task,
            errors: Arc::clone(&self.errors),
        });
        if capturing {
            let data = (&*boxed as *const TaskBox).cast_mut().cast::<c_void>();
            // Kept alive before the launch can reference it; a failed launch just leaves an
            // unused box until the capture ends.
            self.captured.lock().push(boxed);
            // SAFETY: `data` points into a box the stream keeps until `end_capture` moves it
            // into the graph, which keeps it for all its replays.
            self.call(|s| unsafe { sys::launch_host_func(s, run_task_kept, data) })
        } else {
            let data = Box::into_raw(boxed).cast::<c_void>();
            // SAFETY: `data` is a fresh box handed to this one launch; run_task_once frees it.
            let launched = self.call(|s| unsafe { sys::launch_host_func(s, run_task_once, data) });
            if launched.is_err() {
                // SAFETY: the launch failed, so the driver never took `data`; we still own it.
                drop(unsafe { Box::from_raw(data.cast::<TaskBox>()) });
            }
            launched
        }
    }

    pub(crate) fn begin_capture(&self) -> DeviceResult<()> {
        if self.is_default() {
            return Err(DeviceError::Graph(format!(
                "cannot capture the default stream of cuda:{} (the legacy NULL stream, which \
                 CUDA cannot capture): capture on a stream from stream_from_pool or new_stream, \
                 as PyTorch does",
                self.ctx.ordinal
            )));
        }
        self.ctx.deferred.take()?;
        let _capture = self.capture_lock.lock();
        // SAFETY: `self.raw` is a live, non-default stream.
        Ok(unsafe { sys::stream_begin_capture(self.raw) }?)
    }

    /// The boxes of host tasks captured on this stream so far (a stream that joined another
    /// stream's capture hands them to that capture's graph).
    #[allow(clippy::vec_box)] // boxed: the driver holds their addresses
    pub(crate) fn take_captured_tasks(&self) -> Vec<Box<TaskBox>> {
        let _capture = self.capture_lock.lock();
        std::mem::take(&mut *self.captured.lock())
    }

    /// End the capture on this stream: the driver's graph (null when the capture was
    /// invalidated) and the boxes of the host tasks captured on it, which the graph must keep
    /// (`CudaGraph::end_capture` makes the graph).
    #[allow(clippy::vec_box)] // boxed: the driver holds their addresses
    pub(crate) fn end_capture_raw(&self) -> (CuResult<CUgraph>, Vec<Box<TaskBox>>) {
        let _capture = self.capture_lock.lock();
        // SAFETY: `self.raw` is live; the driver reports a stream that is not capturing.
        let graph = unsafe { sys::stream_end_capture(self.raw) };
        (graph, std::mem::take(&mut *self.captured.lock()))
    }
}

impl Drop for CudaStream {
    fn drop(&mut self) {
        // Boxes of host tasks captured by someone else's graph (an external capture) may
        // still be run by that graph: leak them rather than free them under it.
        let captured = std::mem::take(&mut *self.captured.lock());
        if !captured.is_empty() {
            std::mem::forget(captured);
        }
        if self.ownership == Ownership::Owned {
            // SAFETY: we created the stream and own it; the runtime drops it only when no
            // handle can reach it any more.
            if let Err(e) = unsafe { sys::stream_destroy(self.raw) } {
                self.ctx.deferred.keep(e.into_error());
            }
        }
    }
}
