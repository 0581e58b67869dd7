//! The process-wide state behind the C functions: which backend, each device's caching
//! allocator, the wrapped PyTorch streams, and the private-pool routes in force.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use accelrt::alloc::{CachingAllocator, HistoryConfig, ROUNDUP_INTERVALS};
use accelrt::{Backend, DeviceError, DeviceType, MempoolId, Stream};
use parking_lot::Mutex;

use crate::errors::Failure;

/// Environment variable choosing the backend: `cuda` (default) or `host` (to exercise the
/// library without a GPU: stream handles are then host stream ids).
pub const BACKEND_ENV: &str = "ACCELRT_TORCH_BACKEND";

/// Wrapped streams a thread remembers (PyTorch uses a handful per device).
const THREAD_STREAMS: usize = 16;

static CHOSEN: OnceLock<Result<DeviceType, String>> = OnceLock::new();
static STATE: OnceLock<Result<State, String>> = OnceLock::new();

/// Choose the backend before the first call (Rust callers and tests; C callers set
/// `ACCELRT_TORCH_BACKEND`). An error once another backend is in use.
pub fn use_backend(kind: DeviceType) -> Result<(), String> {
    match CHOSEN.get_or_init(|| Ok(kind)) {
        Ok(k) if *k == kind => Ok(()),
        Ok(k) => Err(format!(
            "accelrt_torch already uses the {k} backend (chosen by {BACKEND_ENV} or an earlier \
             call): the backend can be chosen once per process, before the first call"
        )),
        Err(e) => Err(e.clone()),
    }
}

fn chosen_kind() -> Result<DeviceType, String> {
    CHOSEN
        .get_or_init(|| match std::env::var(BACKEND_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(DeviceType::Cuda),
            Err(std::env::VarError::NotUnicode(v)) => Err(format!(
                "{BACKEND_ENV}={v:?} is not valid UTF-8: set it to cuda or host"
            )),
            Ok(v) if v.trim().is_empty() => Ok(DeviceType::Cuda),
            Ok(v) => v.parse::<DeviceType>().map_err(|e| {
                format!("{BACKEND_ENV}={v:?}: {e} (cuda, the default, or host for tests)")
            }),
        })
        .clone()
}

/// The process's state, opened on first use; the reason when the backend is unusable.
#[inline]
pub(crate) fn state() -> Result<&'static State, Failure> {
    match STATE.get_or_init(State::open) {
        Ok(s) => Ok(s),
        Err(e) => Err(e.clone().into()),
    }
}

thread_local! {
    /// (device, native handle, wrapped stream), most recently added last.
    static STREAMS: RefCell<Vec<(u32, usize, Stream)>> = const { RefCell::new(Vec::new()) };
}

pub(crate) struct State {
    pub backend: &'static dyn Backend,
    pub kind: DeviceType,
    pub device_count: u32,
    allocators: Box<[OnceLock<Arc<CachingAllocator>>]>,
    /// Routes to private pools begun and not yet ended: (device, pool).
    routes: Mutex<HashSet<(u32, MempoolId)>>,
    /// `routes.len()`, read on every allocation.
    route_count: AtomicUsize,
    /// Settings given for every device, applied to allocators created later too.
    for_all: Mutex<ForAll>,
}

/// Settings given for every device at once.
#[derive(Default)]
struct ForAll {
    /// `record_history(-1, ..)`.
    history: Option<HistoryConfig>,
    /// `set_rounding`: divisions per size interval and the garbage-collection threshold.
    rounding: Option<([u32; ROUNDUP_INTERVALS], Option<f64>)>,
    /// `record_peak_breakdown`.
    peak_breakdown: bool,
}

impl State {
    fn open() -> Result<State, String> {
        let kind = chosen_kind()?;
        let backend = accelrt::backend(kind);
        if let Some(reason) = backend.unavailable_reason() {
            return Err(DeviceError::BackendUnavailable {
                backend: kind,
                reason,
            }
            .to_string());
        }
        backend.init().map_err(|e| e.to_string())?;
        let device_count = backend.device_count();
        Ok(State {
            backend,
            kind,
            device_count,
            allocators: (0..device_count).map(|_| OnceLock::new()).collect(),
            routes: Mutex::new(HashSet::new()),
            route_count: AtomicUsize::new(0),
            for_all: Mutex::new(ForAll::default()),
        })
    }

    /// `device` as an index, if this backend has it.
    #[inline]
    pub fn check_device(&self, device: c_int) -> Result<u32, Failure> {
        match u32::try_from(device) {
            Ok(d) if d < self.device_count => Ok(d),
            _ => Err(self.invalid_device(device)),
        }
    }

    #[cold]
    fn invalid_device(&self, device: c_int) -> Failure {
        let n = self.device_count;
        format!(
            "invalid device index {device} for the {} backend: it has {n} device(s) (valid: \
             0..{n}); check CUDA_VISIBLE_DEVICES",
            self.kind
        )
        .into()
    }

    /// The device's caching allocator, created on first use.
    #[inline]
    pub fn allocator(&self, device: c_int) -> Result<&Arc<CachingAllocator>, Failure> {
        let d = self.check_device(device)?;
        match self.allocators[d as usize].get() {
            Some(a) => Ok(a),
            None => self.create_allocator(d),
        }
    }

    #[cold]
    fn create_allocator(&self, d: u32) -> Result<&Arc<CachingAllocator>, Failure> {
        // Held until the allocator is in place, so a concurrent `set_history_all` or
        // `set_rounding_all` sees it.
        let all = self.for_all.lock();
        let allocator = self.backend.allocator(d).map_err(|e| e.to_string())?;
        if let Some(h) = all.history {
            allocator.record_memory_history(Some(h));
        }
        if all.peak_breakdown {
            allocator.record_peak_breakdown(true);
        }
        if let Some((divisions, gc)) = &all.rounding {
            // Checked when they were set.
            allocator
                .set_rounding(divisions, *gc)
                .map_err(|e| e.to_string())?;
        }
        let allocator = self.allocators[d as usize].get_or_init(|| allocator);
        crate::trackers::hook_allocator(d, allocator);
        Ok(allocator)
    }

    /// The device's allocator if it has been created (statistics of an unused device are
    /// zeros; asking for them does not create a context).
    pub fn existing_allocator(&self, d: u32) -> Option<&Arc<CachingAllocator>> {
        self.allocators.get(d as usize).and_then(|a| a.get())
    }

    /// Every allocator created so far, with its device.
    pub fn existing_allocators(&self) -> impl Iterator<Item = (u32, &Arc<CachingAllocator>)> {
        self.allocators
            .iter()
            .enumerate()
            .filter_map(|(d, a)| a.get().map(|a| (d as u32, a)))
    }

    /// The accelrt stream for a native stream handle of `device`, wrapped on first sight.
    ///
    /// # Safety
    /// `handle` must be a live native stream of `device` (CUDA: of its primary context; 0
    /// is the default stream) that stays alive while memory allocated on it is in use.
    #[inline]
    pub unsafe fn stream(&self, device: u32, handle: usize) -> Result<Stream, Failure> {
        let hit = STREAMS.with(|c| {
            c.borrow()
                .iter()
                .rev()
                .find(|e| e.0 == device && e.1 == handle)
                .map(|e| e.2)
        });
        match hit {
            Some(s) => Ok(s),
            // SAFETY: forwarded from this function's contract.
            None => unsafe { self.wrap_stream(device, handle) },
        }
    }

    /// # Safety
    /// As [`State::stream`].
    #[cold]
    unsafe fn wrap_stream(&self, device: u32, handle: usize) -> Result<Stream, Failure> {
        let stream = if handle == 0 {
            // The default stream (CUDA's legacy NULL stream; the host's default stream).
            self.backend.default_stream(device)
        } else {
            // SAFETY: forwarded from this function's contract. Wrapping a handle twice
            // returns the same stream, so threads that race here agree.
            unsafe { self.backend.wrap_external_stream(device, handle as u64) }
        }
        .map_err(|e| format!("stream {handle:#x} of {}:{device}: {e}", self.kind))?;
        STREAMS.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() == THREAD_STREAMS {
                c.remove(0);
            }
            c.push((device, handle, stream));
        });
        Ok(stream)
    }

    /// The native handle of an accelrt stream (for stream filters and snapshots).
    pub fn native_handle(&self, stream: Stream) -> Option<u64> {
        self.backend.stream_native_handle(stream).ok()
    }

    /// Whether a route to a private pool is in force on some device: allocations then run
    /// in relaxed capture mode (see `capture.rs`).
    #[inline]
    pub fn routes_active(&self) -> bool {
        self.route_count.load(Ordering::Relaxed) != 0
    }

    pub fn route_open(&self, device: u32, id: MempoolId) -> bool {
        self.routes.lock().contains(&(device, id))
    }

    pub fn set_route(&self, device: u32, id: MempoolId, open: bool) {
        let mut routes = self.routes.lock();
        if open {
            routes.insert((device, id));
        } else {
            routes.remove(&(device, id));
        }
        self.route_count.store(routes.len(), Ordering::Relaxed);
    }

    /// Record peak breakdowns on every device (or stop), now and for allocators created later.
    pub fn set_peak_breakdown_all(&self, on: bool) {
        let mut all = self.for_all.lock();
        all.peak_breakdown = on;
        for (_, a) in self.existing_allocators() {
            a.record_peak_breakdown(on);
        }
    }

    /// Apply a history setting to every device, now and for allocators created later.
    pub fn set_history_all(&self, config: Option<HistoryConfig>) {
        let mut all = self.for_all.lock();
        all.history = config;
        for (_, a) in self.existing_allocators() {
            a.record_memory_history(config);
        }
    }

    /// Apply rounding settings ([`CachingAllocator::set_rounding`]) to every device, now and
    /// for allocators created later. Checked first, also when no allocator exists yet: an
    /// invalid setting changes nothing.
    pub fn set_rounding_all(
        &self,
        divisions: [u32; ROUNDUP_INTERVALS],
        garbage_collection_threshold: Option<f64>,
    ) -> Result<(), Failure> {
        CachingAllocator::check_rounding(&divisions, garbage_collection_threshold)
            .map_err(|e| e.to_string())?;
        let mut all = self.for_all.lock();
        for (d, a) in self.existing_allocators() {
            a.set_rounding(&divisions, garbage_collection_threshold)
                .map_err(|e| format!("{}:{d}: {e}", self.kind))?;
        }
        all.rounding = Some((divisions, garbage_collection_threshold));
        Ok(())
    }
}
