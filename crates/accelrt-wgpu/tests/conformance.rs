//! The conformance suite (`accelrt-conformance`) on the wgpu backend's first adapter
//! (lavapipe in CI, the GPU on a GPU machine); skipped with the reason without an adapter.
//!
//! wgpu has no virtual memory, so its allocator uses plain segments, and with plain segments
//! `release_at_peak` (on by default) gives cached segments back, or hands them to another
//! pool, before a pool grows past its previous peak, after a device-wide wait for the streams
//! that used them. Two checks assume that does not happen: `allocator_cross_stream` holds one
//! stream on a gate while another allocates, so the wait lasts until the gate times out
//! (20 s) and the check fails; `allocator_callbacks` can see a `Released` event at the
//! address it watches (the cached segment handed over). The host backend fails the first
//! the same way under `ACCELRT_ALLOC_CONF=expandable_segments:false`. This binary therefore
//! runs the suite with `release_at_peak:false` (set before the backend exists, unless
//! `ACCELRT_ALLOC_CONF` is set already).

mod common;

fn backend() -> Option<&'static dyn accelrt::Backend> {
    static CONFIGURED: std::sync::Once = std::sync::Once::new();
    CONFIGURED.call_once(|| {
        if std::env::var_os("ACCELRT_ALLOC_CONF").is_none() {
            // Every test of this binary comes here first and blocks on the `Once` until this
            // is set; nothing else of the process reads the environment meanwhile.
            std::env::set_var("ACCELRT_ALLOC_CONF", "release_at_peak:false");
        }
    });
    common::dyn_backend()
}

accelrt_conformance::conformance_tests!(backend());
