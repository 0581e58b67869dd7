//! Device kinds, indices and properties.

use serde::{Deserialize, Serialize};

/// The kinds of device a backend can drive. The registry is keyed by this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    /// Host memory and worker-thread streams; always built.
    Host,
    /// NVIDIA GPUs through the CUDA driver API.
    Cuda,
}

impl DeviceType {
    /// Every device type accelrt knows, in registry order.
    pub const ALL: [DeviceType; 2] = [DeviceType::Host, DeviceType::Cuda];

    /// The lowercase name used in messages, the CLI and JSON.
    pub fn name(self) -> &'static str {
        match self {
            DeviceType::Host => "host",
            DeviceType::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for DeviceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DeviceType {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "host" | "cpu" => Ok(DeviceType::Host),
            "cuda" | "gpu" => Ok(DeviceType::Cuda),
            other => Err(crate::Error::InvalidArgument(format!(
                "unknown device type '{other}': expected one of host, cuda"
            ))),
        }
    }
}

/// A device: its type and its index within that backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Device {
    pub kind: DeviceType,
    pub index: u32,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.index)
    }
}

/// What `device_properties` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceProperties {
    pub name: String,
    /// Total device memory in bytes.
    pub total_memory: u64,
    /// The working-set size the device recommends (MPS's recommendedMaxWorkingSetSize; total memory elsewhere).
    pub recommended_max_memory: u64,
    /// Streaming multiprocessors on a GPU, cores on the host.
    pub multiprocessor_count: u32,
    /// (major, minor) compute capability; (0, 0) for the host.
    pub capability: (u32, u32),
    pub l2_cache_bytes: u64,
    /// Whether device memory can be read and written by the host directly.
    pub host_visible_memory: bool,
}
