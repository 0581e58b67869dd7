//! The allocator's errors: what [`CachingAllocator`](crate::CachingAllocator),
//! [`PinnedAllocator`](crate::PinnedAllocator) and the configuration parser refuse.
//!
//! One error model per domain: the allocator's errors here, the devices' and drivers' in
//! `accelrt` (`DeviceError`), the files' in `accelrt-formats` (`FormatError`), the command
//! line's in the CLI; `accelrt::Error` is a thin wrapper over them. Every message says what
//! was asked, what was available, and what to try.

use std::sync::Arc;

use crate::device_type::DeviceType;

/// Result alias of the allocator crate.
pub type Result<T, E = AllocError> = std::result::Result<T, E>;

/// The name the allocator's own modules use for [`AllocError`].
pub(crate) use self::AllocError as Error;

/// What the allocator refuses, or what failed under it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// The device (or the configured limit) could not satisfy an allocation; the report
    /// names the limit hit and what to try.
    #[error("{0}")]
    OutOfMemory(Box<OomReport>),

    /// A pointer that accelrt did not allocate, or already freed.
    #[error(
        "pointer {ptr:#x} was not allocated by this allocator or was already freed ({context})"
    )]
    InvalidPointer { ptr: usize, context: &'static str },

    /// A stream the allocator cannot serve (another device's, a pool's limit).
    #[error("invalid stream {stream} on {backend}:{device}: {reason}")]
    InvalidStream {
        backend: DeviceType,
        device: u32,
        stream: u32,
        reason: String,
    },

    /// A request that can never be satisfied (size overflow, zero-sized where not allowed,
    /// a pool in the wrong state, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A malformed configuration string or option (`ACCELRT_ALLOC_CONF`).
    #[error("invalid allocator configuration: {0}")]
    Config(String),

    /// A capability the memory of this backend does not have.
    #[error("{what} is not supported by the {backend} backend")]
    Unsupported {
        backend: DeviceType,
        what: &'static str,
    },

    /// A call the allocator made to its memory provider failed (mapping a chunk, a driver
    /// allocation that is not an out-of-memory): which call, the driver's result code when
    /// it has one (CUDA's `CUresult`, as cudarc keeps it), and what it said.
    #[error("{call} failed: {message}")]
    Driver {
        call: &'static str,
        code: Option<i32>,
        message: String,
    },

    /// A call the allocator made to the backend's streams and events
    /// ([`StreamEvents`](crate::StreamEvents)) failed: the backend's own error, kept whole
    /// (`accelrt` turns it back into its device error).
    #[error(transparent)]
    Backend(BackendError),
}

/// A backend's error carried through the allocator (see [`AllocError::Backend`]): shared, so
/// errors stay `Clone`; two are equal when their words are.
#[derive(Debug, Clone)]
pub struct BackendError(pub Arc<dyn std::error::Error + Send + Sync + 'static>);

impl BackendError {
    /// Wrap a backend's error.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        BackendError(Arc::new(e))
    }
    /// The backend's error, if it is an `E`.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.0.downcast_ref::<E>()
    }
}

impl PartialEq for BackendError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Everything a user needs to understand an out-of-memory.
#[derive(Debug, Clone, PartialEq)]
pub struct OomReport {
    pub device: String,
    pub requested: u64,
    pub device_total: u64,
    pub device_free: u64,
    /// Bytes handed out to callers by accelrt (rounded block sizes).
    pub allocated: u64,
    /// Bytes accelrt holds from the device but has not handed out.
    pub reserved_unallocated: u64,
    /// The limit that was hit, e.g. `high watermark (1.70 x recommended max = 26.00 GiB)`, or `device memory`.
    pub limit: String,
    /// What to try next, naming the option.
    pub hint: String,
}

impl std::fmt::Display for OomReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::bytes::format_size as fs;
        write!(
            f,
            "out of memory on {}: tried to allocate {}; the device has {} total, {} free; \
             accelrt has {} allocated and {} reserved but unallocated; limit hit: {}. {}",
            self.device,
            fs(self.requested),
            fs(self.device_total),
            fs(self.device_free),
            fs(self.allocated),
            fs(self.reserved_unallocated),
            self.limit,
            self.hint
        )
    }
}

impl AllocError {
    /// The words of a [`AllocError::Config`] without the prefix its `Display` adds (for a
    /// message that names the configuration itself); any other error's `Display`.
    pub fn config_message(&self) -> String {
        match self {
            AllocError::Config(m) => m.clone(),
            other => other.to_string(),
        }
    }

    /// Shorthand for [`AllocError::Unsupported`].
    pub fn unsupported(backend: DeviceType, what: &'static str) -> Self {
        AllocError::Unsupported { backend, what }
    }
    /// True for [`AllocError::OutOfMemory`].
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, AllocError::OutOfMemory(_))
    }
}
