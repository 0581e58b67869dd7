//! The backend registry: one process-wide [`Backend`] per [`DeviceType`], and the global
//! allocator callbacks.
//!
//! The built-in backends (`host`, `cuda`) sit in a fixed table and are built on first use; a
//! backend that is not compiled in is a [`Runtime`] over a driver whose probe says so ([`crate::backend::noop`]): no `cfg` here.
//! Any other crate adds a backend at run time with [`register`] (a `&'static dyn Backend`,
//! usually a [`Runtime`] over its own [`Driver`], whose `KIND` is
//! [`DeviceType::custom`]`("name")`), after PyTorch's hooks registries that extensions fill
//! in (`REGISTER_MPS_HOOKS`, the MTIA hooks loaded with their extension). From then on it is
//! reached by the same lookups as the built-in ones: [`backend`], [`backend_by_name`],
//! [`backends`], `DeviceType::from_str` (so `accelrt replay --backend NAME` and
//! `accelrt bench --backend NAME` find it), and `accelrt info` lists it.
//!
//! Allocator callbacks registered here ([`add_allocator_callback`]) apply to every caching
//! allocator of the process, those that exist and those created later, next to each
//! allocator's own ([`crate::alloc::CachingAllocator::add_callback`]): PyTorch's
//! `MPSAllocatorCallbacksRegistry`.

use std::sync::OnceLock;

use parking_lot::{Mutex, RwLock};

use crate::backend::host::HostDriver;
use crate::backend::UnavailableBackend;
use crate::device::{BackendName, DeviceType};
use crate::driver::Driver;
use crate::error::{DeviceError, Error, Result};
use crate::hooks::Backend;
use crate::runtime::Runtime;

// ---- the built-in backends ------------------------------------------------------------------

/// One built-in backend: its device type and the function that returns its static.
struct Builtin {
    kind: DeviceType,
    get: fn() -> &'static dyn Backend,
}

/// The built-in backends, in [`DeviceType::ALL`] order.
static BUILTIN: &[Builtin] = &[
    Builtin {
        kind: DeviceType::Host,
        get: host_backend,
    },
    Builtin {
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
pub fn cuda() -> &'static Runtime<crate::backend::cuda::CudaDriver> {
    static CUDA: OnceLock<Runtime<crate::backend::cuda::CudaDriver>> = OnceLock::new();
    CUDA.get_or_init(Runtime::new)
}

fn cuda_backend() -> &'static dyn Backend {
    cuda()
}

// ---- backends registered at run time ----------------------------------------------------------

/// Backends registered with [`register`], in registration order.
static REGISTERED: RwLock<Vec<&'static dyn Backend>> = RwLock::new(Vec::new());

/// Stand-ins handed out by [`backend`] for names nobody registered (one per name).
static MISSING: Mutex<Vec<&'static UnavailableBackend>> = Mutex::new(Vec::new());

/// Add `backend` to the registry under its device type's name, for the life of the process.
///
/// Its [`Backend::device_type`] must be a [`DeviceType::Custom`]; registering the same
/// object again is allowed and changes nothing. Errors: a built-in device type, or a name
/// another backend holds.
pub fn register(backend: &'static dyn Backend) -> Result<()> {
    let DeviceType::Custom(name) = backend.device_type() else {
        return Err(DeviceError::InvalidArgument(format!(
            "cannot register a backend of device type {}: it is built in; a registered \
             backend's driver has `const KIND: DeviceType = DeviceType::custom(\"name\")`",
            backend.device_type()
        ))
        .into());
    };
    let mut registered = REGISTERED.write();
    if let Some(existing) = registered
        .iter()
        .find(|b| b.device_type() == DeviceType::Custom(name))
    {
        if std::ptr::addr_eq(*existing, backend) {
            return Ok(());
        }
        return Err(DeviceError::InvalidArgument(format!(
            "a backend named '{name}' is already registered (another object): registered \
             backends live for the whole process; give this one another name"
        ))
        .into());
    }
    registered.push(backend);
    crate::device::note_registered(name);
    Ok(())
}

/// Register a [`Runtime`] over driver `D`, opened with [`Driver::probe`] on first use (an
/// unavailable driver is registered too, and says why). Returns the runtime, for its
/// concrete API. Each call registers a new runtime: call it once per process.
pub fn register_driver<D: Driver>() -> Result<&'static Runtime<D>> {
    register_runtime(Runtime::<D>::new())
}

/// Register `runtime` (moved to a process-wide static) and return it.
pub fn register_runtime<D: Driver>(runtime: Runtime<D>) -> Result<&'static Runtime<D>> {
    // Checked before leaking, so a refused runtime is dropped.
    if let DeviceType::Custom(name) = D::KIND {
        if registered(name).is_some() {
            return Err(DeviceError::InvalidArgument(format!(
                "a backend named '{name}' is already registered: register_driver registers \
                 a new runtime each call; call it once per process"
            ))
            .into());
        }
    }
    let runtime: &'static Runtime<D> = Box::leak(Box::new(runtime));
    register(runtime)?;
    Ok(runtime)
}

fn registered(name: BackendName) -> Option<&'static dyn Backend> {
    REGISTERED
        .read()
        .iter()
        .copied()
        .find(|b| b.device_type() == DeviceType::Custom(name))
}

/// The backend hooks for `kind` (built on first use; never fails: an unusable backend
/// answers `is_available() == false` and says why, and so does a name nobody registered).
pub fn backend(kind: DeviceType) -> &'static dyn Backend {
    match kind {
        DeviceType::Custom(name) => registered(name).unwrap_or_else(|| missing(name)),
        builtin => {
            let row = BUILTIN
                .iter()
                .find(|r| r.kind == builtin)
                .expect("every built-in DeviceType has a row in BUILTIN (checked by a test)");
            (row.get)()
        }
    }
}

#[cold]
fn missing(name: BackendName) -> &'static dyn Backend {
    let mut missing = MISSING.lock();
    if let Some(b) = missing
        .iter()
        .find(|b| b.device_type() == DeviceType::Custom(name))
    {
        return *b;
    }
    let stand_in: &'static UnavailableBackend =
        Box::leak(Box::new(UnavailableBackend::unregistered(
            DeviceType::Custom(name),
            format!(
                "no backend named '{name}' is registered in this process (registered: {}); the \
             crate that provides it must call accelrt::registry::register first",
                names().join(", ")
            ),
        )));
    missing.push(stand_in);
    stand_in
}

/// Every backend, available or not: the built-in ones, then the registered ones in
/// registration order.
pub fn backends() -> Vec<&'static dyn Backend> {
    BUILTIN
        .iter()
        .map(|r| (r.get)())
        .chain(REGISTERED.read().iter().copied())
        .collect()
}

/// The names [`backend_by_name`] accepts (aliases aside), in [`backends`] order.
pub fn names() -> Vec<&'static str> {
    crate::device::names()
}

/// The backend called `name`: `host` (or `cpu`), `cuda` (or `gpu`), case-insensitively, or
/// a registered backend's exact name. This is the lookup the CLI's `--backend NAME` uses.
/// An unknown name is an error that lists the names known.
pub fn backend_by_name(name: &str) -> Result<&'static dyn Backend> {
    // The name's refusal is the registry's argument error (device types live in the
    // allocator's crate, whose parser says it in the same words).
    let kind = name.parse::<DeviceType>().map_err(|e| match e {
        crate::error::AllocError::InvalidArgument(m) => DeviceError::InvalidArgument(m).into(),
        other => Error::from(other),
    })?;
    Ok(backend(kind))
}

// ---- global allocator callbacks ---------------------------------------------------------------

pub use crate::alloc::callbacks::{
    add_allocator_callback, remove_allocator_callback, GlobalAllocatorCallback,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_device_type_is_in_the_table_once_in_order() {
        let kinds: Vec<DeviceType> = BUILTIN.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, DeviceType::ALL.to_vec());
        for kind in DeviceType::ALL {
            assert_eq!(backend(kind).device_type(), kind);
        }
    }
}
