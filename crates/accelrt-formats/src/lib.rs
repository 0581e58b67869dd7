//! accelrt's file formats: allocator traces ([`trace`]: v1/v2 text, plain or gzip, the
//! planner and the replay engine that times an [`accelrt_alloc::CachingAllocator`] over
//! them on a simulated device) and memory snapshots ([`snapshot`]: PyTorch's pickles,
//! accelrt's JSON, the HTML timeline). Built on `accelrt-alloc` only; `accelrt`
//! re-exports both modules (`accelrt::trace`, `accelrt::snapshot`).

pub mod error;
pub mod snapshot;
pub mod trace;

pub use error::{FormatError, IoSource, Result};
