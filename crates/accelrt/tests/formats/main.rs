//! Traces, snapshots and the replay engine (`accelrt::trace`, `accelrt::snapshot`): one test
//! binary, a module per area (`cargo test -p accelrt --test formats trace_parse::v2::`).
//! `replay_stream.rs` stays a binary of its own: it measures its process's peak memory.

mod replay;
mod snapshot;
mod trace_parse;
