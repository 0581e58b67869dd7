//! `CudaDriver` in a build without the `cuda` feature: uninhabited, its probe gives the
//! reason, so `registry::cuda()` is the same `Runtime<CudaDriver>` in every build.

use super::noop::{not_compiled_reason, uninhabited_driver_methods, Never};
use crate::device::DeviceType;
use crate::driver::Driver;

/// The CUDA driver, not compiled into this build.
#[derive(Debug)]
pub enum CudaDriver {}

impl Driver for CudaDriver {
    type Stream = Never;
    type Event = Never;
    type Graph = Never;

    const KIND: DeviceType = DeviceType::Cuda;
    const BUILT: bool = false;

    fn probe() -> Result<Self, String> {
        Err(not_compiled_reason(DeviceType::Cuda))
    }

    uninhabited_driver_methods!();
}
