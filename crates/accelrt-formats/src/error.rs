//! The file formats' errors: a malformed trace or snapshot (with its file and line, or the
//! place in the snapshot), a file that could not be read or written (with the `io::Error`
//! as the source), a replay the allocator stopped (with the allocator's error as the
//! source), and the allocator's own errors passed through.

use std::sync::Arc;

use accelrt_alloc::AllocError;

/// Result alias of the formats crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// What can go wrong reading, writing or replaying a trace or a snapshot.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// A malformed input file (a trace) with its location.
    #[error("{file}:{line}: {message}")]
    Parse {
        file: String,
        line: u64,
        message: String,
    },

    /// A malformed or inconsistent memory snapshot (a PyTorch pickle or accelrt's JSON):
    /// `at` says where (`byte 1234`, `device_traces[0][17].size`, `segments[3]`).
    #[error("{file}: {at}: {message}")]
    Snapshot {
        file: String,
        at: String,
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

    /// A replay stopped by the allocator (an out-of-memory, a refused call) at an event of
    /// its input: the input file, the event's line, and what failed, naming the allocator's
    /// error (`cause`, also the error's source). Not an input error: those are
    /// [`FormatError::Parse`].
    #[error("{file}:{line}: {message}")]
    Replay {
        file: String,
        line: u64,
        message: String,
        #[source]
        cause: Box<AllocError>,
    },

    /// An option that cannot be used (a device model's words, a timeline's moment).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The allocator's own error (its configuration, setting up a replay's allocator).
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

impl FormatError {
    /// A [`FormatError::Io`] on `path`: `message` says what was being done (and usually
    /// quotes `source`), `source` is kept.
    pub fn io(path: impl Into<String>, message: impl Into<String>, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.into(),
            message: message.into(),
            source: source.into(),
        }
    }

    /// The allocator's error behind this one: the cause of a stopped replay, or a passed
    /// through allocator error.
    pub fn alloc_error(&self) -> Option<&AllocError> {
        match self {
            FormatError::Replay { cause, .. } => Some(cause),
            FormatError::Alloc(e) => Some(e),
            _ => None,
        }
    }

    /// True when the allocator behind this error ran out of memory.
    pub fn is_out_of_memory(&self) -> bool {
        self.alloc_error().is_some_and(AllocError::is_out_of_memory)
    }
}

/// The `io::Error` behind a [`FormatError::Io`]: shared, so errors stay `Clone`; two are
/// equal when their kind and text are.
#[derive(Debug, Clone)]
pub struct IoSource(pub Arc<std::io::Error>);

impl IoSource {
    /// The error as the operating system reported it.
    pub fn get(&self) -> &std::io::Error {
        &self.0
    }
}

impl From<std::io::Error> for IoSource {
    fn from(e: std::io::Error) -> Self {
        IoSource(Arc::new(e))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_their_source_and_replays_their_cause() {
        use std::error::Error as _;
        let e = FormatError::io(
            "t.trace",
            "cannot open: no such file",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(e.to_string(), "t.trace: cannot open: no such file");
        let source = e.source().expect("the io::Error is the source");
        assert!(source.downcast_ref::<IoSource>().is_some());
        assert!(!e.is_out_of_memory());

        let cause = AllocError::InvalidArgument("no".into());
        let e = FormatError::Replay {
            file: "t.trace".into(),
            line: 3,
            message: "replay stopped".into(),
            cause: Box::new(cause.clone()),
        };
        assert_eq!(e.to_string(), "t.trace:3: replay stopped");
        assert_eq!(e.alloc_error(), Some(&cause));
        assert_eq!(e.source().unwrap().to_string(), cause.to_string());
    }
}
