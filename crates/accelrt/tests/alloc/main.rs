//! The caching allocator on host memory and host streams: one test binary, a module per area
//! (`cargo test -p accelrt --test alloc moves::`). Every test builds its own allocator or
//! runtime, so they run side by side.

#[path = "../common/mod.rs"]
mod common;

mod behaviour;
mod capture;
mod cross_stream;
mod expandable;
mod fences;
mod history;
mod hostile_input;
mod model;
mod moves;
mod pinned;
mod private_pools;
mod races;
mod stress;
