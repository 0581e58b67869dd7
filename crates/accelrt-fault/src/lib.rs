//! accelrt-fault: a backend for accelrt that runs on another backend's devices and injects
//! faults on demand, for reliability tests.
//!
//! It lives outside the `accelrt` crate and reaches accelrt's users the way any out-of-tree
//! backend does: [`FaultDriver`] implements [`accelrt::driver::Driver`] (with
//! `KIND = DeviceType::custom("fault")`), accelrt's [`accelrt::runtime::Runtime`] turns it
//! into a full [`accelrt::Backend`], and [`register`] adds it to accelrt's registry, after
//! which `accelrt::registry::backend_by_name("fault")`, `"fault".parse::<DeviceType>()`,
//! `accelrt info`, `accelrt bench --backend fault` and `accelrt replay --backend fault`
//! find it.
//!
//! What it injects ([`Faults`], shared with the test that drives it):
//! - failed calls: the next N calls of a [`Fault`] kind fail with a driver error naming the
//!   call (stream creation, synchronize and query; host launches; event creation, record,
//!   query, synchronize and wait);
//! - failed allocations: the next N requests for device memory (segments or pages) answer
//!   "out of memory", so the caching allocator's retry and out-of-memory paths run;
//! - asynchronous stream errors, reported by the stream's next synchronize, as a faulting
//!   kernel's would be;
//! - delayed completion: events complete a set time after the device says they did, so
//!   cross-stream frees stay pending and waits wait longer.
//!
//! With no fault asked for, it behaves exactly as the backend it runs on (it passes the same
//! conformance suite, `accelrt-conformance`).
//!
//! ```
//! use accelrt::{Backend, StreamPriority};
//! use accelrt_fault::Fault;
//!
//! let fault = accelrt_fault::register().unwrap();
//! let stream = fault.new_stream(0, StreamPriority::Normal).unwrap();
//! accelrt_fault::faults().fail_next(Fault::StreamSynchronize, 1);
//! assert!(fault.stream_synchronize(stream).is_err()); // injected
//! fault.stream_synchronize(stream).unwrap(); // and only once
//! ```

mod driver;
mod faults;
mod memory;

use std::sync::{Arc, OnceLock};

use accelrt::backend::host::HostDriver;
use accelrt::driver::Driver;
use accelrt::runtime::Runtime;
use accelrt::{DeviceType, Result};

pub use driver::{FaultDriver, FaultEvent};
pub use faults::{Fault, Faults};
pub use memory::FaultMemory;

/// The name the backend registers under.
pub const NAME: &str = "fault";

/// Its device type.
pub const KIND: DeviceType = DeviceType::custom(NAME);

/// Environment variable with faults to inject from the start, in [`Faults::configure`]'s
/// syntax, e.g. `ACCELRT_FAULTS=allocation=2,delay_ms=5` (for the CLI: `accelrt replay
/// --backend fault` then replays with two failed device allocations). A malformed value
/// makes the backend unavailable, naming the problem.
pub const FAULTS_ENV: &str = "ACCELRT_FAULTS";

/// The registered backend: fault injection over the host backend's devices
/// (`ACCELRT_HOST_DEVICES` of them).
pub type FaultBackend = Runtime<FaultDriver<HostDriver>>;

struct Registered {
    backend: &'static FaultBackend,
    faults: Arc<Faults>,
}

fn registered() -> &'static Registered {
    static REGISTERED: OnceLock<Registered> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        let faults = Arc::new(Faults::new());
        let shared = Arc::clone(&faults);
        let runtime = Runtime::with_probe(move || {
            let inner = HostDriver::probe()?;
            configure_from_env(&shared)?;
            Ok(FaultDriver::new(inner, shared))
        });
        Registered {
            backend: Box::leak(Box::new(runtime)),
            faults,
        }
    })
}

/// Apply [`FAULTS_ENV`] to `faults`, or say why it cannot be (the unavailable reason).
pub(crate) fn configure_from_env(faults: &Faults) -> std::result::Result<(), String> {
    let Some(spec) = std::env::var_os(FAULTS_ENV) else {
        return Ok(());
    };
    let spec = spec
        .to_str()
        .ok_or_else(|| format!("{FAULTS_ENV} is not valid UTF-8"))?;
    faults
        .configure(spec)
        .map_err(|e| format!("{FAULTS_ENV}={spec:?}: {e}"))
}

/// Register the fault backend with accelrt (idempotent: later calls return the same one).
/// Its devices are opened on first use.
pub fn register() -> Result<&'static FaultBackend> {
    let r = registered();
    accelrt::registry::register(r.backend)?;
    Ok(r.backend)
}

/// The faults of the registered backend (whether or not [`register`] was called yet).
pub fn faults() -> &'static Arc<Faults> {
    &registered().faults
}
