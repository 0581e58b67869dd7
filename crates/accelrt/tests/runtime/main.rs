//! The runtime on the host backend: the hooks, streams, events, graphs, generators, the
//! registry, the profiler, several devices, and the conformance suite. One test binary, a
//! module per area (`cargo test -p accelrt --test runtime graphs::`). Tests build private
//! runtimes (`common::runtime(n)`); the few that look at the process-wide registry only read
//! it or add names of their own, and only the conformance suite uses the process-wide host
//! backend's allocators.

#[path = "../common/mod.rs"]
mod common;

mod events;
mod generator;
mod graphs;
mod hooks_allocator;
mod hooks_host;
mod multi_device;
mod profiler;
mod registry;
mod streams;

// The conformance suite (`accelrt-conformance`) on the process-wide host backend: one test
// per check, `conformance::CHECK`.
accelrt_conformance::conformance_tests!(Some(accelrt::registry::host() as &dyn accelrt::Backend));
