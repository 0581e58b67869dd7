//! Per-device state: the retained primary context, the scoped current-context guard, and the
//! errors kept from `Drop` (reported by the next call, cudarc's rule).

use std::sync::OnceLock;

use parking_lot::Mutex;

#[cfg(feature = "test-kernels")]
use super::kernels::Kernels;
use super::raw_stream::RawStream;
use super::sys::{self, CUcontext, CUdevice};
use crate::alloc::Deferred;
use crate::error::{DeviceError, DeviceResult};

/// Errors that could not be returned where they happened (in `Drop`, in a callback); the
/// next call on the same device returns them. Kept by the allocator's [`Deferred`] (one type
/// for every place that defers errors), bounded.
#[derive(Debug, Default)]
pub(crate) struct DeviceErrors(Deferred<DeviceError>);

impl DeviceErrors {
    /// Keep `error` (an [`DeviceError`], which keeps its driver code, or words) for the next call.
    pub(crate) fn keep(&self, error: impl Into<KeptError>) {
        self.0.keep(error.into().0);
    }

    /// `Err` with every kept error (once), else `Ok`. One atomic load when nothing is kept.
    #[inline]
    pub(crate) fn take(&self) -> DeviceResult<()> {
        self.0.take(|t| DeviceError::Driver {
            call: "an earlier release or callback",
            code: t.code(),
            message: format!(
                "{} error(s) kept since the last call (they happened where no error could be \
                 returned: a Drop or a callback): {}",
                t.count(),
                t.joined_messages()
            ),
        })
    }
}

/// An error to keep: an [`DeviceError`] as it is, words as a driver error without a code.
pub(crate) struct KeptError(DeviceError);

impl From<DeviceError> for KeptError {
    fn from(e: DeviceError) -> Self {
        KeptError(match e {
            // Keep the call's name with the words: the report names its own call.
            DeviceError::Driver {
                call,
                code,
                message,
            } => DeviceError::Driver {
                call,
                code,
                message: format!("{call} failed: {message}"),
            },
            other => other,
        })
    }
}

impl From<&str> for KeptError {
    fn from(words: &str) -> Self {
        KeptError(DeviceError::Driver {
            call: "an earlier release or callback",
            code: None,
            message: words.to_string(),
        })
    }
}

impl From<String> for KeptError {
    fn from(words: String) -> Self {
        KeptError::from(words.as_str())
    }
}

/// One device's primary context, retained for as long as this value lives.
pub(crate) struct Context {
    /// accelrt's device index (the CUDA ordinal).
    pub(crate) ordinal: u32,
    pub(crate) dev: CUdevice,
    pub(crate) raw: CUcontext,
    /// (least, greatest) stream priority.
    pub(crate) priorities: (i32, i32),
    pub(crate) deferred: DeviceErrors,
    /// The PTX kernels, loaded on first use.
    #[cfg(feature = "test-kernels")]
    pub(crate) kernels: OnceLock<Kernels>,
    #[cfg(feature = "test-kernels")]
    kernels_init: Mutex<()>,
    /// A private stream on which `event_notify` waits for events (created on first use).
    pub(crate) notify_stream: OnceLock<RawStream>,
    notify_init: Mutex<()>,
    /// A private, otherwise idle stream for reading the device's clock against the host's
    /// (event completion times; created on first use).
    clock_stream: OnceLock<RawStream>,
    clock_init: Mutex<()>,
    /// Bytes of the device that were free when this context was retained (the recommended
    /// working set, MPS's `recommendedMaxWorkingSetSize`).
    pub(crate) free_at_open: u64,
}

// SAFETY: a CUcontext is an opaque driver handle; the driver API is thread-safe and a
// context may be used (made current) from any thread. The other fields are Sync.
unsafe impl Send for Context {}
// SAFETY: as above; no field is mutated without a lock or an atomic.
unsafe impl Sync for Context {}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("ordinal", &self.ordinal)
            .field("raw", &self.raw)
            .finish()
    }
}

impl Context {
    /// Retain the primary context of device `ordinal` (creating it if no one has).
    pub(crate) fn retain(ordinal: u32) -> DeviceResult<Context> {
        let dev = sys::device_get(ordinal as i32)?;
        let raw = sys::primary_ctx_retain(dev)?;
        let mut ctx = Context {
            ordinal,
            dev,
            raw,
            priorities: (0, 0),
            deferred: DeviceErrors::default(),
            #[cfg(feature = "test-kernels")]
            kernels: OnceLock::new(),
            #[cfg(feature = "test-kernels")]
            kernels_init: Mutex::new(()),
            notify_stream: OnceLock::new(),
            notify_init: Mutex::new(()),
            clock_stream: OnceLock::new(),
            clock_init: Mutex::new(()),
            free_at_open: 0,
        };
        // If this fails, dropping `ctx` releases the reference taken above.
        let (priorities, (free, _total)) = {
            let _current = ctx.bind()?;
            (sys::ctx_stream_priority_range()?, sys::mem_get_info()?)
        };
        ctx.priorities = priorities;
        ctx.free_at_open = free as u64;
        Ok(ctx)
    }

    /// Make this context current on the calling thread until the guard drops (then the
    /// previous one is restored). Costs one `cuCtxGetCurrent` when it already is.
    pub(crate) fn bind(&self) -> DeviceResult<CurrentGuard> {
        let previous = sys::ctx_get_current()?;
        if previous == self.raw {
            return Ok(CurrentGuard { restore: None });
        }
        // SAFETY: `self.raw` is live while we hold our reference to it.
        unsafe { sys::ctx_set_current(self.raw)? };
        Ok(CurrentGuard {
            restore: Some(previous),
        })
    }

    /// The kernels module of this context, loaded on first use.
    #[cfg(feature = "test-kernels")]
    pub(crate) fn kernels(&self) -> DeviceResult<&Kernels> {
        if let Some(k) = self.kernels.get() {
            return Ok(k);
        }
        let _init = self.kernels_init.lock();
        if let Some(k) = self.kernels.get() {
            return Ok(k);
        }
        let kernels = {
            let _current = self.bind()?;
            Kernels::load(self.ordinal)?
        };
        Ok(self.kernels.get_or_init(|| kernels))
    }

    /// The private notify stream, created on first use.
    pub(crate) fn notify_stream(&self) -> DeviceResult<&RawStream> {
        if let Some(s) = self.notify_stream.get() {
            return Ok(s);
        }
        let _init = self.notify_init.lock();
        if let Some(s) = self.notify_stream.get() {
            return Ok(s);
        }
        let stream = {
            let _current = self.bind()?;
            RawStream::create(self.priorities.0)?
        };
        Ok(self.notify_stream.get_or_init(|| stream))
    }
}

impl Context {
    /// The private clock stream, created on first use.
    pub(crate) fn clock_stream(&self) -> DeviceResult<&RawStream> {
        if let Some(s) = self.clock_stream.get() {
            return Ok(s);
        }
        let _init = self.clock_init.lock();
        if let Some(s) = self.clock_stream.get() {
            return Ok(s);
        }
        let stream = {
            let _current = self.bind()?;
            RawStream::create(self.priorities.1)?
        };
        Ok(self.clock_stream.get_or_init(|| stream))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // Everything that lives in the context goes before the context itself.
        #[cfg(feature = "test-kernels")]
        if let Some(kernels) = self.kernels.take() {
            drop(kernels);
        }
        if let Some(stream) = self.notify_stream.take() {
            drop(stream);
        }
        if let Some(stream) = self.clock_stream.take() {
            drop(stream);
        }
        // SAFETY: balances the retain in `Context::retain`; nothing of ours uses the context
        // any more (all handles hold an Arc of this value, so they are gone).
        if let Err(e) = unsafe { sys::primary_ctx_release(self.dev) } {
            // Nothing is left to report it to: the context is gone.
            eprintln!(
                "accelrt: releasing the primary context of cuda:{}: {}",
                self.ordinal,
                e.into_error()
            );
        }
    }
}

/// Restores the previously current context on drop (see [`Context::bind`]).
#[must_use = "the context is only current while the guard lives"]
pub(crate) struct CurrentGuard {
    restore: Option<CUcontext>,
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        if let Some(previous) = self.restore {
            // SAFETY: `previous` was current on this thread a moment ago (or null); a context
            // someone else destroyed meanwhile would be their bug, and the driver reports it
            // as an error rather than faulting.
            let _ = unsafe { sys::ctx_set_current(previous) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_errors_are_reported_once() {
        let d = DeviceErrors::default();
        assert!(d.take().is_ok());
        d.keep("cuEventDestroy failed: CUDA_ERROR_INVALID_HANDLE");
        d.keep("cuStreamDestroy failed: CUDA_ERROR_INVALID_HANDLE");
        let e = d.take().unwrap_err().to_string();
        assert!(e.contains("2 error(s)"), "{e}");
        assert!(
            e.contains("cuEventDestroy") && e.contains("cuStreamDestroy"),
            "{e}"
        );
        assert!(d.take().is_ok());
    }
}
