//! accelrt: the layer a framework uses to reach a device — backend hooks, streams, pooled
//! events, a random generator, graph capture and a caching device allocator — with a host
//! (CPU) backend that is always built.
//!
//! Start at [`backend()`]: it returns the [`Backend`] hooks for a [`DeviceType`]
//! ([`registry::backend_by_name`] by name; other crates add backends with
//! [`registry::register`]).
//! `ARCHITECTURE.md` at the repository root has the map.

pub mod backend;
pub mod driver;
pub mod error;
pub mod event;
pub mod generator;
pub mod hooks;
pub mod profiler;
pub mod registry;
pub mod runtime;

/// The caching allocator: the `accelrt-alloc` crate.
pub use accelrt_alloc as alloc;
pub use accelrt_alloc::{device, graph, stream};
pub use accelrt_formats::{snapshot, trace};

pub use device::{BackendName, Device, DeviceProperties, DeviceType};
pub use error::{AllocError, DeviceError, Error, FormatError, OomReport, Result};
pub use event::EventId;
pub use graph::{GraphId, MempoolId};
pub use hooks::Backend;
pub use registry::backend;
pub use stream::{Stream, StreamPriority};
