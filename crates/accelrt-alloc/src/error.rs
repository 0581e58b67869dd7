//! The one error type of the `accelrt` crate.
//!
//! Every message says what was asked, what was available, and what to try.

use crate::device::DeviceType;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in accelrt.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend is not compiled in, or has no usable device (said of the backend as a
    /// whole; a call on it answers [`Error::NeedsBackend`], which names the call).
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

    /// An event id that was never handed out or was already released.
    #[error("unknown event id {id}: it was never acquired from this pool or was already released")]
    UnknownEvent { id: u64 },

    /// A misuse of events (e.g. timing on events without `enable_timing`).
    #[error("{0}")]
    Event(String),

    /// A graph id that does not exist or is in the wrong state for the call.
    #[error("graph error: {0}")]
    Graph(String),

    /// The device (or the configured limit) could not satisfy an allocation.
    #[error("{0}")]
    OutOfMemory(Box<OomReport>),

    /// A pointer that accelrt did not allocate, or already freed.
    #[error(
        "pointer {ptr:#x} was not allocated by this allocator or was already freed ({context})"
    )]
    InvalidPointer { ptr: usize, context: &'static str },

    /// A request that can never be satisfied (size overflow, zero-sized where not allowed, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A malformed configuration string or option.
    #[error("invalid allocator configuration: {0}")]
    Config(String),

    /// A malformed input file (trace, snapshot) with its location.
    #[error("{file}:{line}: {message}")]
    Parse {
        file: String,
        line: u64,
        message: String,
    },

    /// A replay stopped by the allocator (an out-of-memory, a refused call) at an event of
    /// its input: the input file, the event's line, and what failed, naming the allocator's
    /// error (`cause`, also the error's source). Not an input error: those are
    /// [`Error::Parse`].
    #[error("{file}:{line}: {message}")]
    Replay {
        file: String,
        line: u64,
        message: String,
        #[source]
        cause: Box<Error>,
    },

    /// A malformed or inconsistent memory snapshot (a PyTorch pickle or accelrt's JSON):
    /// `at` says where (`byte 1234`, `device_traces[0][17].size`, `segments[3]`).
    #[error("{file}: {at}: {message}")]
    Snapshot {
        file: String,
        at: String,
        message: String,
    },

    /// An operating-system or driver call failed: which call, the driver's numeric result
    /// code when the failure came from a driver that has them (CUDA's `CUresult`, as cudarc
    /// keeps it; the message names it too), and what it said.
    #[error("{call} failed: {message}")]
    Driver {
        call: &'static str,
        code: Option<i32>,
        message: String,
    },

    /// I/O while reading or writing a file: the path, what was being done (with the
    /// operating system's words), and the `io::Error` itself as the source.
    #[error("{path}: {message}")]
    Io {
        path: String,
        message: String,
        #[source]
        source: IoSource,
    },
}

/// The `io::Error` behind an [`Error::Io`]: shared, so errors stay `Clone`; two are equal
/// when their kind and text are.
#[derive(Debug, Clone)]
pub struct IoSource(pub std::sync::Arc<std::io::Error>);

impl IoSource {
    /// The error as the operating system reported it.
    pub fn get(&self) -> &std::io::Error {
        &self.0
    }
}

impl From<std::io::Error> for IoSource {
    fn from(e: std::io::Error) -> Self {
        IoSource(std::sync::Arc::new(e))
    }
}

impl PartialEq for IoSource {
    fn eq(&self, other: &Self) -> bool {
        self.0.kind() == other.0.kind() && self.0.to_string() == other.0.to_string()
    }
}

impl std::fmt::Display for IoSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for IoSource {
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

impl Error {
    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(backend: DeviceType, what: &'static str) -> Self {
        Error::Unsupported { backend, what }
    }
    /// An [`Error::Io`] on `path`: `message` says what was being done (and usually quotes
    /// `source`), `source` is kept.
    pub fn io(path: impl Into<String>, message: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            message: message.into(),
            source: source.into(),
        }
    }
    /// True for [`Error::OutOfMemory`].
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::OutOfMemory(_))
    }
}
