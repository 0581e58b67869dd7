//! Devices (a device type and an index) and their properties; device types from text: the
//! built-in names and aliases, and the names of backends registered at run time.

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

pub use crate::device_type::{BackendName, DeviceType};

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
    /// The widest group of threads one launch may use along its first dimension (MPS's
    /// `getMaxThreadsPerThreadgroupWidth`; CUDA's maximum block width; 1 on the host, whose
    /// tasks run on one thread each).
    pub max_threads_per_group: u32,
    /// (major, minor) compute capability; (0, 0) for the host.
    pub capability: (u32, u32),
    pub l2_cache_bytes: u64,
    /// Whether device memory can be read and written by the host directly.
    pub host_visible_memory: bool,
}

// ---- device types from text: built-in names and the names of registered backends -----------

/// A built-in name or alias, or the name of a backend registered in this process
/// (`accelrt::registry::backend_by_name` looks backends up with it); anything else is an
/// error listing the names known.
impl std::str::FromStr for DeviceType {
    type Err = crate::AllocError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(kind) = DeviceType::builtin(s) {
            return Ok(kind);
        }
        let found = REGISTERED.read().iter().copied().find(|n| n.as_str() == s);
        found.map(DeviceType::Custom).ok_or_else(|| {
            crate::AllocError::InvalidArgument(format!(
                "unknown device type '{s}': expected one of {} (cpu and gpu are aliases of \
                 host and cuda; other backends are known once their crate has registered them)",
                names().join(", ")
            ))
        })
    }
}

/// Built-in names and aliases, and any well-formed backend name: a snapshot written by a
/// registered backend loads in a process where that backend is not registered (the name is
/// kept; `accelrt::registry::backend` then answers that no such backend is registered).
impl<'de> Deserialize<'de> for DeviceType {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        if let Some(kind) = DeviceType::builtin(&name) {
            return Ok(kind);
        }
        intern_name(&name)
            .map(DeviceType::Custom)
            .map_err(serde::de::Error::custom)
    }
}

/// Names of the backends registered in this process, in registration order (the runtime's
/// registry adds each one with [`note_registered`]).
static REGISTERED: RwLock<Vec<BackendName>> = RwLock::new(Vec::new());

/// Names met in input (snapshots) that no backend registered, kept for the process's life.
static INTERNED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// Most distinct unregistered names [`intern_name`] keeps (hostile input cannot grow it).
const MAX_INTERNED: usize = 256;

/// Record that a backend registered `name` (once per name; `accelrt::registry::register`
/// calls it): from then on `DeviceType::from_str` resolves it.
pub fn note_registered(name: BackendName) {
    let mut registered = REGISTERED.write();
    if !registered.contains(&name) {
        registered.push(name);
    }
}

/// The names `DeviceType::from_str` accepts (aliases aside): the built-in ones, then those
/// registered, in registration order.
pub fn names() -> Vec<&'static str> {
    DeviceType::ALL
        .iter()
        .map(|k| k.name())
        .chain(REGISTERED.read().iter().map(|n| n.as_str()))
        .collect()
}

/// A [`BackendName`] for `name` from input (a snapshot's device type): a registered
/// backend's, or one kept for the process (at most 256 distinct names).
pub fn intern_name(name: &str) -> crate::Result<BackendName> {
    if let Some(why) = BackendName::check(name) {
        return Err(crate::AllocError::InvalidArgument(format!(
            "'{name}' is not a device type: {why}"
        )));
    }
    if let Some(&n) = REGISTERED.read().iter().find(|n| n.as_str() == name) {
        return Ok(n);
    }
    let mut interned = INTERNED.lock();
    if let Some(&n) = interned.iter().find(|n| **n == name) {
        return Ok(BackendName::new(n));
    }
    if interned.len() >= MAX_INTERNED {
        return Err(crate::AllocError::InvalidArgument(format!(
            "'{name}' is not a registered backend, and {MAX_INTERNED} other unregistered \
             names were already read: refusing to keep more"
        )));
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    interned.push(leaked);
    Ok(BackendName::new(leaked))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_names_are_checked_shared_and_bounded() {
        let a = intern_name("from-a-snapshot").unwrap();
        let b = intern_name("from-a-snapshot").unwrap();
        assert!(std::ptr::eq(a.as_str(), b.as_str()), "one copy per name");
        for bad in ["", "Upper", "9lives", "has space", "cuda", "cpu"] {
            assert!(intern_name(bad).is_err(), "{bad:?}");
        }
        // Fill what is left of the bound, then one more is refused.
        let mut i = 0;
        while INTERNED.lock().len() < MAX_INTERNED {
            intern_name(&format!("filler-{i}")).unwrap();
            i += 1;
        }
        let err = intern_name("one-too-many").unwrap_err().to_string();
        assert!(err.contains("refusing to keep more"), "{err}");
        assert!(
            intern_name("from-a-snapshot").is_ok(),
            "known names still resolve"
        );
    }

    #[test]
    fn registered_names_parse_and_unknown_ones_list_the_known() {
        use std::str::FromStr;
        assert_eq!(DeviceType::from_str("GPU").unwrap(), DeviceType::Cuda);
        let err = DeviceType::from_str("device-rs-test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected one of host, cuda"), "{err}");
        let name = BackendName::new("device-rs-test");
        note_registered(name);
        note_registered(name);
        assert_eq!(
            DeviceType::from_str("device-rs-test").unwrap(),
            DeviceType::Custom(name)
        );
        assert_eq!(
            names().iter().filter(|n| **n == "device-rs-test").count(),
            1
        );
        assert_eq!(intern_name("device-rs-test").unwrap(), name);
    }
}
