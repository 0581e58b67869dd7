//! Stream handles. A stream is an ordered queue of work on one device.

use crate::device::Device;

/// A stream: a device and the stream's index on that device.
///
/// Index 0 is the device's default stream. Handles are plain values (`Copy`); the
/// backend owns the native stream, which lives as long as the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Stream {
    pub device: Device,
    pub index: u32,
}

impl Stream {
    /// Whether this is the device's default stream.
    pub fn is_default(&self) -> bool {
        self.index == 0
    }
}

impl std::fmt::Display for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/stream{}", self.device, self.index)
    }
}

/// Priority of a pooled stream. Lower numbers run first, as in CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StreamPriority {
    #[default]
    Normal,
    High,
}
