//! The registered wgpu backend, or a skip with the reason when this machine has no adapter
//! (a failure instead with `ACCELRT_REQUIRE_WGPU=1`, as CI sets where lavapipe is installed).

#![allow(dead_code)]

use accelrt::Backend;
use accelrt_wgpu::WgpuBackend;

/// Set to make a missing adapter a failure.
pub const REQUIRE_ENV: &str = "ACCELRT_REQUIRE_WGPU";

pub fn backend() -> Option<&'static WgpuBackend> {
    let b = accelrt_wgpu::register().expect("register the wgpu backend");
    if b.is_available() {
        return Some(b);
    }
    let reason = b.unavailable_reason().unwrap_or_default();
    if std::env::var_os(REQUIRE_ENV).is_some_and(|v| v != "0") {
        panic!("{REQUIRE_ENV} is set but the wgpu backend is unavailable: {reason}");
    }
    eprintln!("SKIPPED: no wgpu adapter here: {reason}");
    None
}

/// As [`backend`], as the `&dyn Backend` the conformance suite takes.
pub fn dyn_backend() -> Option<&'static dyn Backend> {
    backend().map(|b| b as &dyn Backend)
}
