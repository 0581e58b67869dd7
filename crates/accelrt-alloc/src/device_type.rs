//! The kinds of device ([`DeviceType`]) and the names of backends registered at run time
//! ([`BackendName`]): plain values, so the allocator's errors can name them. Parsing them
//! from text, which knows the registered names and can fail, is `device.rs`'s.

use serde::Serialize;

/// The kinds of device a backend can drive. The registry is keyed by this.
///
/// `Host` and `Cuda` are built in; [`DeviceType::Custom`] names a backend registered at run
/// time (`accelrt::registry::register`), e.g. a crate outside `accelrt` that implements
/// `accelrt::driver::Driver`. Values print, parse and serialize as their lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceType {
    /// Host memory and worker-thread streams; always built.
    Host,
    /// NVIDIA GPUs through the CUDA driver API.
    Cuda,
    /// A backend registered by name at run time.
    Custom(BackendName),
}

/// The name of a backend registered at run time: 1 to [`BackendName::MAX_LEN`] characters
/// from `a-z`, `0-9`, `_` and `-`, starting with a letter, and none of the built-in names or
/// their aliases (`host`, `cpu`, `cuda`, `gpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendName(&'static str);

/// Names the built-in backends answer to; a registered backend may not take one.
const RESERVED_NAMES: [&str; 4] = ["host", "cpu", "cuda", "gpu"];

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

impl BackendName {
    /// Longest name accepted.
    pub const MAX_LEN: usize = 32;

    /// Why `name` cannot name a registered backend, or `None` when it can.
    pub const fn check(name: &str) -> Option<&'static str> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() > Self::MAX_LEN {
            return Some("a backend name has 1 to 32 characters");
        }
        if !bytes[0].is_ascii_lowercase() {
            return Some("a backend name starts with a lowercase letter");
        }
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            if !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-') {
                return Some("a backend name uses only a-z, 0-9, '_' and '-'");
            }
            i += 1;
        }
        let mut r = 0;
        while r < RESERVED_NAMES.len() {
            if str_eq(name, RESERVED_NAMES[r]) {
                return Some("host, cpu, cuda and gpu name the built-in backends");
            }
            r += 1;
        }
        None
    }

    /// The name, checked. In a `const` (a driver's `KIND`), a bad name is a compile error;
    /// at run time it panics: use [`BackendName::check`] first for names from input.
    pub const fn new(name: &'static str) -> BackendName {
        if let Some(why) = Self::check(name) {
            panic!("{}", why);
        }
        BackendName(name)
    }

    /// The name as given.
    pub const fn as_str(self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for BackendName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl DeviceType {
    /// The built-in device types, in registry order (registered backends follow them).
    pub const ALL: [DeviceType; 2] = [DeviceType::Host, DeviceType::Cuda];

    /// The device type of a backend registered as `name` (see [`BackendName::new`]):
    /// `const KIND: DeviceType = DeviceType::custom("fault");` in a driver.
    pub const fn custom(name: &'static str) -> DeviceType {
        DeviceType::Custom(BackendName::new(name))
    }

    /// The lowercase name used in messages, the CLI and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            DeviceType::Host => "host",
            DeviceType::Cuda => "cuda",
            DeviceType::Custom(name) => name.as_str(),
        }
    }

    /// Whether this is one of [`DeviceType::ALL`].
    pub const fn is_builtin(self) -> bool {
        !matches!(self, DeviceType::Custom(_))
    }

    /// The built-in type `name` (or an alias: `cpu`, `gpu`) means, case-insensitively.
    pub fn builtin(name: &str) -> Option<DeviceType> {
        match name.to_ascii_lowercase().as_str() {
            "host" | "cpu" => Some(DeviceType::Host),
            "cuda" | "gpu" => Some(DeviceType::Cuda),
            _ => None,
        }
    }
}

impl std::fmt::Display for DeviceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for DeviceType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}
