//! Backends: drivers for each device type, and the noop driver whose runtimes stand in for
//! backends that cannot be used ([`noop`]).

#[cfg(feature = "cuda")]
pub mod cuda;
/// The CUDA backend of builds without the `cuda` feature: a driver that cannot exist, whose
/// probe says the feature is off (see [`noop`]).
#[cfg(not(feature = "cuda"))]
#[path = "cuda_off.rs"]
pub mod cuda;
pub mod host;
pub mod noop;

pub use noop::{NoDriver, UnavailableBackend};
