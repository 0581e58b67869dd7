//! Replaying a [`Trace`] through accelrt's [`CachingAllocator`].
//!
//! The replay measures what matters for a device allocator on real work: peak reserved bytes
//! against peak live requested bytes (fragmentation), device allocations, and the time per
//! allocate/free call. Trace stream numbers map directly to stream indices of the replay
//! device (`Stream { device, index: n }`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Trace, TraceOp};
use crate::alloc::{AllocatorConfig, CachingAllocator, MemoryProvider};
use crate::backend::host::HostMemory;
use crate::device::{Device, DeviceType};
use crate::error::Error;
use crate::stream::Stream;

/// How to replay a trace.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// The allocator configuration to replay under.
    pub config: AllocatorConfig,
    /// Size of the simulated device in bytes; `None` uses [`HostMemory::with_default_capacity`].
    pub capacity: Option<u64>,
}

/// What a replay measured. Counts cover the events done before a stop.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReplayReport {
    /// The trace's name.
    pub trace: String,
    /// The configuration as a `key:value` string ([`AllocatorConfig::to_conf_string`]).
    pub config: String,
    /// Events completed (all of them unless the replay stopped).
    pub ops: u64,
    /// Events in the trace.
    pub total_ops: u64,
    /// Peak of live requested bytes over the completed events.
    pub peak_allocated_bytes: u64,
    /// Peak of bytes the allocator reserved from the device.
    pub peak_reserved_bytes: u64,
    /// Segments the allocator took from the device.
    pub device_allocs: u64,
    /// Out-of-memory failures the allocator counted.
    pub ooms: u64,
    /// Wall time of the allocate/free loop divided by the calls made, in nanoseconds.
    pub ns_per_call: f64,
    /// Wall time of the allocate/free loop, in seconds.
    pub seconds: f64,
}

impl ReplayReport {
    /// Peak reserved / peak allocated (1.0 is the floor); `None` when nothing was allocated.
    pub fn ratio(&self) -> Option<f64> {
        (self.peak_allocated_bytes > 0)
            .then(|| self.peak_reserved_bytes as f64 / self.peak_allocated_bytes as f64)
    }

    /// Whether every event of the trace was replayed.
    pub fn completed(&self) -> bool {
        self.ops == self.total_ops
    }
}

/// The result of a replay: the report, and why it stopped early, if it did.
#[derive(Debug, Clone)]
pub struct ReplayOutcome {
    /// What was measured up to the stop (or the end).
    pub report: ReplayReport,
    /// Why the replay stopped before the end: an [`Error::Parse`] naming the trace file and the
    /// line of the event that failed, with the allocator's error in the message (or, when the
    /// allocator could not even be built, that error as is).
    pub error: Option<Error>,
    /// The allocator's own error behind `error` (e.g. [`Error::OutOfMemory`]).
    pub cause: Option<Error>,
}

impl ReplayOutcome {
    /// The report when the whole trace replayed, else the error naming the failed line.
    pub fn into_result(self) -> Result<ReplayReport, Error> {
        match self.error {
            None => Ok(self.report),
            Some(e) => Err(e),
        }
    }

    /// True when the replay stopped on an out-of-memory.
    pub fn is_out_of_memory(&self) -> bool {
        self.cause.as_ref().is_some_and(Error::is_out_of_memory)
    }
}

/// The device replays run on.
const REPLAY_DEVICE: Device = Device {
    kind: DeviceType::Host,
    index: 0,
};

/// Replay `trace` through a fresh host allocator (capacity and configuration from `opts`).
pub fn replay(trace: &Trace, opts: &ReplayOptions) -> ReplayOutcome {
    let provider = match opts.capacity {
        Some(bytes) => HostMemory::new(bytes),
        None => HostMemory::with_default_capacity(),
    };
    replay_on(trace, &opts.config, Arc::new(provider), REPLAY_DEVICE)
}

/// Replay `trace` through a fresh allocator for `device` over `provider` (e.g. a real GPU's
/// memory: `accelrt replay --backend cuda`). Everything the replay took from the provider is
/// given back before returning, including allocations the trace never freed.
pub fn replay_on(
    trace: &Trace,
    config: &AllocatorConfig,
    provider: Arc<dyn MemoryProvider>,
    device: Device,
) -> ReplayOutcome {
    let config_string = config.to_conf_string();
    match CachingAllocator::new(device, provider, None, config.clone()) {
        Ok(alloc) => {
            let (outcome, live) = run(trace, &alloc);
            for ptr in live {
                // Live pointers of this replay: freeing them cannot fail, and a failure
                // would only leave memory cached until `empty_cache` reports it.
                let _ = alloc.raw_free(ptr);
            }
            let _ = alloc.empty_cache();
            outcome
        }
        // Not tied to a line of the trace: the allocator could not be built (its
        // configuration was refused).
        Err(e) => ReplayOutcome {
            report: empty_report(trace, config_string),
            error: Some(e.clone()),
            cause: Some(e),
        },
    }
}

fn empty_report(trace: &Trace, config: String) -> ReplayReport {
    ReplayReport {
        trace: trace.name.clone(),
        config,
        ops: 0,
        total_ops: trace.ops.len() as u64,
        peak_allocated_bytes: 0,
        peak_reserved_bytes: 0,
        device_allocs: 0,
        ooms: 0,
        ns_per_call: 0.0,
        seconds: 0.0,
    }
}

/// One event with its allocation resolved to a dense slot (no hashing in the timed loop).
#[derive(Clone, Copy)]
enum Step {
    Alloc {
        slot: u32,
        size: usize,
        stream: Stream,
    },
    Free {
        slot: u32,
    },
}

/// Replay `trace` on an allocator the caller owns (for checking the allocator afterwards;
/// allocations still live at the end of the trace stay allocated). Statistics are read from
/// the allocator, so it should be fresh (or have had its peaks reset).
pub fn replay_into(trace: &Trace, alloc: &CachingAllocator) -> ReplayOutcome {
    run(trace, alloc).0
}

/// The replay, and the pointers still live at its end (or at the stop).
fn run(trace: &Trace, alloc: &CachingAllocator) -> (ReplayOutcome, Vec<usize>) {
    let mut report = empty_report(trace, alloc.config().to_conf_string());
    let device = alloc.device();
    let stop = |index: usize, cause: Error, what: String| {
        let error = Error::Parse {
            file: trace.source.clone(),
            line: trace.line_of(index),
            message: format!(
                "replay stopped at event {} of {} ({what}): {cause}",
                index + 1,
                trace.ops.len()
            ),
        };
        (error, cause)
    };

    // Resolve ids to slots before timing. A `Trace` from the reader is valid; one built by
    // hand is checked here so the loop below cannot index out of bounds.
    let (steps, sizes) = match plan(trace, device) {
        Ok(plan) => plan,
        Err((index, message)) => {
            let (error, cause) = stop(index, Error::InvalidArgument(message.clone()), message);
            let outcome = ReplayOutcome {
                report,
                error: Some(error),
                cause: Some(cause),
            };
            return (outcome, Vec::new());
        }
    };

    let mut ptrs: Vec<usize> = vec![0; sizes.len()];
    let mut failure: Option<(usize, Error)> = None;
    let start = Instant::now();
    for (index, step) in steps.iter().enumerate() {
        let result = match *step {
            Step::Alloc { slot, size, stream } => alloc
                .raw_alloc(size, stream)
                .map(|ptr| ptrs[slot as usize] = ptr),
            Step::Free { slot } => alloc.raw_free(ptrs[slot as usize]),
        };
        if let Err(e) = result {
            failure = Some((index, e));
            break;
        }
    }
    let elapsed: Duration = start.elapsed();

    let done = failure.as_ref().map_or(steps.len(), |(index, _)| *index);
    let calls = failure.as_ref().map_or(done, |_| done + 1);
    let stats = alloc.stats();
    let mut live = vec![false; sizes.len()];
    for step in &steps[..done] {
        match *step {
            Step::Alloc { slot, .. } => live[slot as usize] = true,
            Step::Free { slot } => live[slot as usize] = false,
        }
    }
    let live: Vec<usize> = live
        .iter()
        .zip(&ptrs)
        .filter(|(alive, _)| **alive)
        .map(|(_, &ptr)| ptr)
        .collect();
    report.ops = done as u64;
    report.peak_allocated_bytes = peak_live(&steps[..done], &sizes);
    report.peak_reserved_bytes = stats.reserved_bytes_peak;
    report.device_allocs = stats.counters.num_device_alloc;
    report.ooms = stats.counters.num_ooms;
    report.seconds = elapsed.as_secs_f64();
    report.ns_per_call = if calls == 0 {
        0.0
    } else {
        elapsed.as_nanos() as f64 / calls as f64
    };

    let outcome = match failure {
        None => ReplayOutcome {
            report,
            error: None,
            cause: None,
        },
        Some((index, e)) => {
            let what = match trace.ops[index] {
                TraceOp::Alloc { id, size, stream } => {
                    format!(
                        "a {id} {size} {stream}: allocate {}",
                        crate::alloc::format_size(size)
                    )
                }
                TraceOp::Free { id } => format!("f {id}"),
            };
            let (error, cause) = stop(index, e, what);
            ReplayOutcome {
                report,
                error: Some(error),
                cause: Some(cause),
            }
        }
    };
    (outcome, live)
}

/// Turn trace events into steps over dense slots; `Err((event index, problem))` for an
/// event that cannot be replayed.
#[allow(clippy::type_complexity)]
fn plan(trace: &Trace, device: Device) -> Result<(Vec<Step>, Vec<u64>), (usize, String)> {
    let mut slots: std::collections::HashMap<u64, u32> =
        std::collections::HashMap::with_capacity(trace.ops.len() / 2 + 1);
    let mut sizes: Vec<u64> = Vec::with_capacity(trace.ops.len() / 2 + 1);
    let mut steps = Vec::with_capacity(trace.ops.len());
    for (index, op) in trace.ops.iter().enumerate() {
        match *op {
            TraceOp::Alloc { id, size, stream } => {
                let slot = u32::try_from(sizes.len())
                    .map_err(|_| (index, "more than 2^32 allocations in one trace".to_string()))?;
                if slots.insert(id, slot).is_some() {
                    return Err((index, format!("duplicate live id {id}")));
                }
                let size = usize::try_from(size).map_err(|_| {
                    (
                        index,
                        format!("size {size} does not fit in this machine's address space"),
                    )
                })?;
                sizes.push(size as u64);
                steps.push(Step::Alloc {
                    slot,
                    size,
                    stream: Stream {
                        device,
                        index: stream,
                    },
                });
            }
            TraceOp::Free { id } => {
                let slot = slots
                    .remove(&id)
                    .ok_or_else(|| (index, format!("free of unknown id {id}")))?;
                steps.push(Step::Free { slot });
            }
        }
    }
    Ok((steps, sizes))
}

/// Peak of live requested bytes over `steps`.
fn peak_live(steps: &[Step], sizes: &[u64]) -> u64 {
    let (mut current, mut peak) = (0u64, 0u64);
    for step in steps {
        match *step {
            Step::Alloc { slot, .. } => {
                current += sizes[slot as usize];
                peak = peak.max(current);
            }
            Step::Free { slot } => current -= sizes[slot as usize],
        }
    }
    peak
}
