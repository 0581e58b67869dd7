//! The clock the allocator weighs its driver work against.
//!
//! Moving idle memory to where it is needed saves memory and costs driver calls (a moved
//! chunk is mapped and given access at its new place and unmapped at its old one: about
//! 60 us on the H200). When the device runs behind the CPU, as in training, those calls hide
//! behind queued work; when the CPU is the bottleneck (an allocation loop at its peak, RMM's
//! random benchmark) they are the time. So moves are budgeted in time as well as in number:
//! the driver time of moves may take a fixed share of the time that passes (see
//! `caching/expandable.rs`, `MOVE_TIME_SHARE`). Real use measures time with the process's
//! monotonic clock; a replay measures it on the trace's own CPU clock, so it predicts what the
//! recorded process would have done.

use std::sync::Arc;
use std::time::Instant;

/// Where the allocator reads the time (see the module docs).
#[derive(Clone, Default)]
pub enum Clock {
    /// The process's monotonic clock (the default).
    #[default]
    Wall,
    /// Microseconds from a source the caller keeps, non-decreasing: a replay's trace clock.
    External(Arc<dyn Fn() -> u64 + Send + Sync>),
    /// No clock: moves are budgeted by count only (a replay of a trace without times).
    Off,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Clock::Wall => "Wall",
            Clock::External(_) => "External",
            Clock::Off => "Off",
        })
    }
}

impl Clock {
    /// Microseconds now: since `born` on the wall clock, the source's reading, or `None`.
    pub(crate) fn now_us(&self, born: Instant) -> Option<u64> {
        match self {
            Clock::Wall => Some(born.elapsed().as_micros().min(u64::MAX as u128) as u64),
            Clock::External(read) => Some(read()),
            Clock::Off => None,
        }
    }
}
