//! The backend registry: one process-wide [`Backend`] per [`DeviceType`], and the global
//! allocator callbacks.
//!
//! The built-in backends (`host`, `cuda`) sit in a fixed table and are built on first use; a
//! backend that is not compiled in is a [`crate::backend::UnavailableBackend`] that says so.
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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use crate::alloc::{AllocatorEvent, CallbackId};
use crate::backend::host::HostDriver;
use crate::backend::UnavailableBackend;
use crate::device::{BackendName, Device, DeviceType};
use crate::driver::Driver;
use crate::error::{Error, Result};
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

// ---- backends registered at run time ----------------------------------------------------------

/// Backends registered with [`register`], in registration order.
static REGISTERED: RwLock<Vec<&'static dyn Backend>> = RwLock::new(Vec::new());

/// Stand-ins handed out by [`backend`] for names nobody registered (one per name).
static MISSING: Mutex<Vec<&'static UnavailableBackend>> = Mutex::new(Vec::new());

/// Names met in input (snapshots) that no backend registered, kept for the process's life.
static INTERNED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// Most distinct unregistered names [`intern_name`] keeps (hostile input cannot grow it).
const MAX_INTERNED: usize = 256;

/// Add `backend` to the registry under its device type's name, for the life of the process.
///
/// Its [`Backend::device_type`] must be a [`DeviceType::Custom`]; registering the same
/// object again is allowed and changes nothing. Errors: a built-in device type, or a name
/// another backend holds.
pub fn register(backend: &'static dyn Backend) -> Result<()> {
    let DeviceType::Custom(name) = backend.device_type() else {
        return Err(Error::InvalidArgument(format!(
            "cannot register a backend of device type {}: it is built in; a registered \
             backend's driver has `const KIND: DeviceType = DeviceType::custom(\"name\")`",
            backend.device_type()
        )));
    };
    let mut registered = REGISTERED.write();
    if let Some(existing) = registered
        .iter()
        .find(|b| b.device_type() == DeviceType::Custom(name))
    {
        if std::ptr::addr_eq(*existing, backend) {
            return Ok(());
        }
        return Err(Error::InvalidArgument(format!(
            "a backend named '{name}' is already registered (another object): registered \
             backends live for the whole process; give this one another name"
        )));
    }
    registered.push(backend);
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
            return Err(Error::InvalidArgument(format!(
                "a backend named '{name}' is already registered: register_driver registers \
                 a new runtime each call; call it once per process"
            )));
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
    DeviceType::ALL
        .iter()
        .map(|k| k.name())
        .chain(REGISTERED.read().iter().map(|b| b.device_type().name()))
        .collect()
}

/// The backend called `name`: `host` (or `cpu`), `cuda` (or `gpu`), case-insensitively, or
/// a registered backend's exact name. This is the lookup the CLI's `--backend NAME` uses.
/// An unknown name is an error that lists the names known.
pub fn backend_by_name(name: &str) -> Result<&'static dyn Backend> {
    if let Some(kind) = DeviceType::builtin(name) {
        return Ok(backend(kind));
    }
    let found = REGISTERED
        .read()
        .iter()
        .copied()
        .find(|b| b.device_type().name() == name);
    found.ok_or_else(|| {
        Error::InvalidArgument(format!(
            "unknown device type '{name}': expected one of {} (cpu and gpu are aliases of \
             host and cuda; other backends are known once their crate has registered them)",
            names().join(", ")
        ))
    })
}

/// A [`BackendName`] for `name` from input (a snapshot's device type): a registered
/// backend's, or one kept for the process (at most [`MAX_INTERNED`] distinct names).
pub(crate) fn intern_name(name: &str) -> Result<BackendName> {
    if let Some(why) = BackendName::check(name) {
        return Err(Error::InvalidArgument(format!(
            "'{name}' is not a device type: {why}"
        )));
    }
    if let Some(b) = REGISTERED
        .read()
        .iter()
        .find(|b| b.device_type().name() == name)
    {
        if let DeviceType::Custom(n) = b.device_type() {
            return Ok(n);
        }
    }
    let mut interned = INTERNED.lock();
    if let Some(&n) = interned.iter().find(|n| **n == name) {
        return Ok(BackendName::new(n));
    }
    if interned.len() >= MAX_INTERNED {
        return Err(Error::InvalidArgument(format!(
            "'{name}' is not a registered backend, and {MAX_INTERNED} other unregistered \
             names were already read: refusing to keep more"
        )));
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    interned.push(leaked);
    Ok(BackendName::new(leaked))
}

// ---- global allocator callbacks ---------------------------------------------------------------

/// A callback for every allocator: (device, ptr, size, event), with the same meaning and
/// timing as an allocator's own [`crate::alloc::AllocatorCallback`].
pub type GlobalAllocatorCallback = Arc<dyn Fn(Device, usize, u64, AllocatorEvent) + Send + Sync>;

static CALLBACKS: RwLock<Vec<(CallbackId, GlobalAllocatorCallback)>> = RwLock::new(Vec::new());
static HAS_CALLBACKS: AtomicBool = AtomicBool::new(false);
static NEXT_CALLBACK: AtomicU64 = AtomicU64::new(1);

/// Register a callback that every caching allocator of the process calls, existing and
/// future ones, after its own callbacks (PyTorch's `REGISTER_MPS_ALLOCATOR_CALLBACK`).
/// Callbacks run on the thread that made the allocator call, with no allocator lock held.
pub fn add_allocator_callback(callback: GlobalAllocatorCallback) -> CallbackId {
    let id = CallbackId(NEXT_CALLBACK.fetch_add(1, Ordering::Relaxed));
    let mut callbacks = CALLBACKS.write();
    callbacks.push((id, callback));
    HAS_CALLBACKS.store(true, Ordering::Relaxed);
    id
}

/// Remove a global callback; false if it was not registered.
pub fn remove_allocator_callback(id: CallbackId) -> bool {
    let mut callbacks = CALLBACKS.write();
    let before = callbacks.len();
    callbacks.retain(|(i, _)| *i != id);
    HAS_CALLBACKS.store(!callbacks.is_empty(), Ordering::Relaxed);
    callbacks.len() != before
}

/// Whether any global callback is registered (one relaxed load, for allocators' fast paths).
#[inline]
pub(crate) fn has_allocator_callbacks() -> bool {
    HAS_CALLBACKS.load(Ordering::Relaxed)
}

/// Call every global callback (outside the registry's lock, so a callback may register or
/// remove callbacks).
#[cold]
pub(crate) fn fire_allocator_callbacks(
    device: Device,
    ptr: usize,
    size: u64,
    event: AllocatorEvent,
) {
    if !has_allocator_callbacks() {
        return;
    }
    let callbacks: Vec<GlobalAllocatorCallback> = CALLBACKS
        .read()
        .iter()
        .map(|(_, c)| Arc::clone(c))
        .collect();
    for callback in callbacks {
        callback(device, ptr, size, event);
    }
}

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
}
