//! The backend registry: one lazily built, process-wide [`Backend`] per [`DeviceType`].
//!
//! Backends register in the `REGISTRY` table, one row each; nothing else matches on device types.
//! A backend that is not compiled in registers a [`crate::backend::UnavailableBackend`] that
//! says so.

use std::sync::OnceLock;

use crate::backend::host::HostDriver;
#[cfg(not(feature = "cuda"))]
use crate::backend::UnavailableBackend;
use crate::device::DeviceType;
use crate::hooks::Backend;
use crate::runtime::Runtime;

/// One registered backend: its device type and the function that returns its static.
struct Registration {
    kind: DeviceType,
    get: fn() -> &'static dyn Backend,
}

/// Every backend, in [`DeviceType::ALL`] order.
static REGISTRY: &[Registration] = &[
    Registration {
        kind: DeviceType::Host,
        get: host_backend,
    },
    Registration {
        kind: DeviceType::Cuda,
        get: cuda_backend,
    },
];

/// The process-wide host runtime, for callers that want its concrete API (RAII events,
/// the event pool) rather than the [`Backend`] hooks.
pub fn host() -> &'static Runtime<HostDriver> {
    static HOST: OnceLock<Runtime<HostDriver>> = OnceLock::new();
    HOST.get_or_init(Runtime::new)
}

fn host_backend() -> &'static dyn Backend {
    host()
}

/// The process-wide CUDA runtime, for callers that want its concrete API (the driver's
/// kernels and copies, RAII events, [`Runtime::with_stream`]). Opening it never fails: on a
/// machine without a usable driver it is unavailable and says why.
#[cfg(feature = "cuda")]
pub fn cuda() -> &'static Runtime<crate::backend::cuda::CudaDriver> {
    static CUDA: OnceLock<Runtime<crate::backend::cuda::CudaDriver>> = OnceLock::new();
    CUDA.get_or_init(Runtime::new)
}

#[cfg(feature = "cuda")]
fn cuda_backend() -> &'static dyn Backend {
    cuda()
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend() -> &'static dyn Backend {
    static CUDA: OnceLock<UnavailableBackend> = OnceLock::new();
    CUDA.get_or_init(|| UnavailableBackend::not_compiled(DeviceType::Cuda))
}

/// The backend hooks for `kind` (built on first use; never fails: an unusable backend
/// answers `is_available() == false` and says why).
pub fn backend(kind: DeviceType) -> &'static dyn Backend {
    let registration = REGISTRY
        .iter()
        .find(|r| r.kind == kind)
        .expect("every DeviceType has a row in REGISTRY (checked by a test)");
    (registration.get)()
}

/// Every backend, available or not, in registry order.
pub fn backends() -> Vec<&'static dyn Backend> {
    REGISTRY.iter().map(|r| (r.get)()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_type_is_registered_once_in_order() {
        let kinds: Vec<DeviceType> = REGISTRY.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, DeviceType::ALL.to_vec());
        for kind in DeviceType::ALL {
            assert_eq!(backend(kind).device_type(), kind);
        }
    }
}
