//! Errors, one model per domain, and the thin wrapper the hooks return.
//!
//! - [`DeviceError`] (here): devices, streams, events, graphs, drivers and backends: what a
//!   [`Driver`](crate::driver::Driver) and the runtime's validation refuse. A failed driver
//!   call keeps the driver's result code (`code`, CUDA's `CUresult`, as cudarc does).
//! - [`AllocError`] (`accelrt-alloc`): what the allocator refuses (out of memory with its
//!   report, invalid pointers, limits, pools, its configuration).
//! - [`FormatError`] (`accelrt-formats`): malformed traces and snapshots (file, line or
//!   place), files that cannot be read or written (the `io::Error` as the source), replays
//!   the allocator stopped (the allocator's error as the source).
//! - the CLI's argument errors live in the CLI.
//!
//! [`Error`] wraps the three so `?` works across layers; its words are the domain error's.

pub use accelrt_alloc::error::{AllocError, BackendError, OomReport};
pub use accelrt_formats::error::{FormatError, IoSource};

use crate::device::DeviceType;

/// Result alias of the hooks: any domain's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Result alias of drivers, backends, events and the runtime's validation.
pub type DeviceResult<T, E = DeviceError> = std::result::Result<T, E>;

/// Any of accelrt's errors: a thin wrapper over the domain errors, shown as the domain
/// error is (`#[error(transparent)]`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A device, stream, event, graph, driver or backend error.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The allocator's error.
    #[error(transparent)]
    Alloc(AllocError),
    /// A trace's, a snapshot's or a file's error.
    #[error(transparent)]
    Format(FormatError),
}

/// A device error that went through the allocator (its stream events) comes back out as
/// the device error it was.
impl From<AllocError> for Error {
    fn from(e: AllocError) -> Self {
        if let AllocError::Backend(b) = &e {
            if let Some(d) = b.downcast_ref::<DeviceError>() {
                return Error::Device(d.clone());
            }
        }
        Error::Alloc(e)
    }
}

/// The allocator's errors passed through the formats come back out as the allocator's.
impl From<FormatError> for Error {
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::Alloc(a) => a.into(),
            other => Error::Format(other),
        }
    }
}

/// A device error met by the allocator (in its [`StreamEvents`](crate::alloc::StreamEvents)):
/// carried whole, see `From<AllocError> for Error`.
impl From<DeviceError> for AllocError {
    fn from(e: DeviceError) -> Self {
        AllocError::Backend(BackendError::new(e))
    }
}

impl Error {
    /// True when the allocator ran out of memory (directly, or stopping a replay).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            Error::Alloc(e) => e.is_out_of_memory(),
            Error::Format(e) => e.is_out_of_memory(),
            Error::Device(_) => false,
        }
    }
    /// The device error, if this is one.
    pub fn as_device(&self) -> Option<&DeviceError> {
        match self {
            Error::Device(e) => Some(e),
            _ => None,
        }
    }
    /// The allocator's error, if this is one.
    pub fn as_alloc(&self) -> Option<&AllocError> {
        match self {
            Error::Alloc(e) => Some(e),
            _ => None,
        }
    }
    /// The formats' error, if this is one.
    pub fn as_format(&self) -> Option<&FormatError> {
        match self {
            Error::Format(e) => Some(e),
            _ => None,
        }
    }
}

/// What can go wrong with devices, streams, events, graphs, drivers and backends.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The backend is not compiled in, or has no usable device (said of the backend as a
    /// whole; a call on it answers [`DeviceError::NeedsBackend`], which names the call).
    #[error("the {backend} backend is unavailable: {reason}")]
    BackendUnavailable { backend: DeviceType, reason: String },

    /// A capability this backend does not have.
    #[error("{what} is not supported by the {backend} backend")]
    Unsupported {
        backend: DeviceType,
        what: &'static str,
    },

    /// A call on a backend that cannot be used here, naming the call (PyTorch's "Cannot
    /// execute init() without MPS backend."): `call` is the hook's name, `reason` why the
    /// backend is unavailable.
    #[error("cannot execute {call}() without the {needs} backend: {reason}")]
    NeedsBackend {
        call: &'static str,
        needs: DeviceType,
        reason: String,
    },

    /// A device index that does not exist.
    #[error("invalid device index {index} for the {backend} backend: it has {count} device(s) (valid: 0..{count})")]
    InvalidDevice {
        backend: DeviceType,
        index: u32,
        count: u32,
    },

    /// A stream handle that does not belong to this backend or device.
    #[error("invalid stream {stream} on {backend}:{device}: {reason}")]
    InvalidStream {
        backend: DeviceType,
        device: u32,
        stream: u32,
        reason: String,
    },

    /// An address that is not inside the memory a driver handed out (the allocator's own
    /// refusal of a pointer is [`AllocError::InvalidPointer`], in the same words).
    #[error(
        "pointer {ptr:#x} was not allocated by this allocator or was already freed ({context})"
    )]
    InvalidPointer { ptr: usize, context: &'static str },

    /// An event id that was never handed out or was already released.
    #[error("unknown event id {id}: it was never acquired from this pool or was already released")]
    UnknownEvent { id: u64 },

    /// A misuse of events (e.g. timing on events without `enable_timing`).
    #[error("{0}")]
    Event(String),

    /// A graph id that does not exist or is in the wrong state for the call.
    #[error("graph error: {0}")]
    Graph(String),

    /// A request that can never be satisfied (a seed, a copy's range, a registration).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An operating-system or driver call failed: which call, the driver's numeric result
    /// code when the failure came from a driver that has them (CUDA's `CUresult`, as cudarc
    /// keeps it; the message names it too), and what it said.
    #[error("{call} failed: {message}")]
    Driver {
        call: &'static str,
        code: Option<i32>,
        message: String,
    },
}

impl DeviceError {
    /// Shorthand for [`DeviceError::Unsupported`].
    pub fn unsupported(backend: DeviceType, what: &'static str) -> Self {
        DeviceError::Unsupported { backend, what }
    }
}

/// Kept by [`Deferred`](crate::alloc::Deferred) (CUDA contexts, host streams).
impl accelrt_alloc::KeptError for DeviceError {
    fn driver_parts(&self) -> Option<(&str, Option<i32>)> {
        match self {
            DeviceError::Driver { message, code, .. } => Some((message, *code)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_error_through_the_allocator_comes_back_as_itself() {
        let d = DeviceError::Driver {
            call: "cuEventRecord",
            code: Some(700),
            message: "an illegal address".into(),
        };
        let through: AllocError = d.clone().into();
        assert_eq!(through.to_string(), d.to_string());
        assert_eq!(Error::from(through), Error::Device(d));
    }

    #[test]
    fn the_wrapper_shows_the_domain_errors_words() {
        let a = AllocError::Config("bad".into());
        let e: Error = FormatError::Alloc(a.clone()).into();
        assert_eq!(e, Error::Alloc(a.clone()));
        assert_eq!(e.to_string(), a.to_string());
        let oom = Error::from(FormatError::Replay {
            file: "t".into(),
            line: 1,
            message: "stopped".into(),
            cause: Box::new(AllocError::OutOfMemory(Box::new(OomReport {
                device: "host:0".into(),
                requested: 1,
                device_total: 0,
                device_free: 0,
                allocated: 0,
                reserved_unallocated: 0,
                limit: "device memory".into(),
                hint: String::new(),
            }))),
        });
        assert!(oom.is_out_of_memory());
        assert!(matches!(oom, Error::Format(FormatError::Replay { .. })));
    }
}
