//! What to inject: [`Fault`] kinds, and the [`Faults`] a driver consults on every call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use accelrt::DeviceError;
use parking_lot::Mutex;

/// A kind of call that can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// Taking device memory (a segment, or a page of an expandable segment): the device
    /// answers "out of memory", so the allocator frees its cache and retries, then reports
    /// an out-of-memory.
    Allocation,
    /// Creating a stream.
    StreamCreate,
    /// Synchronizing a stream (also through a device synchronize).
    StreamSynchronize,
    /// Asking whether a stream is done.
    StreamQuery,
    /// Launching a host task.
    LaunchHost,
    /// Creating an event (the event pool's misses).
    EventCreate,
    /// Recording an event.
    EventRecord,
    /// Asking whether an event completed.
    EventQuery,
    /// Waiting on the host for an event.
    EventSynchronize,
    /// Making a stream wait for an event.
    EventWait,
}

impl Fault {
    /// Every kind, in declaration order.
    pub const ALL: [Fault; 10] = [
        Fault::Allocation,
        Fault::StreamCreate,
        Fault::StreamSynchronize,
        Fault::StreamQuery,
        Fault::LaunchHost,
        Fault::EventCreate,
        Fault::EventRecord,
        Fault::EventQuery,
        Fault::EventSynchronize,
        Fault::EventWait,
    ];

    /// The name used in errors and in [`crate::FAULTS_ENV`]: `allocation`, `event_record`...
    pub const fn name(self) -> &'static str {
        match self {
            Fault::Allocation => "allocation",
            Fault::StreamCreate => "stream_create",
            Fault::StreamSynchronize => "stream_synchronize",
            Fault::StreamQuery => "stream_query",
            Fault::LaunchHost => "launch_host",
            Fault::EventCreate => "event_create",
            Fault::EventRecord => "event_record",
            Fault::EventQuery => "event_query",
            Fault::EventSynchronize => "event_synchronize",
            Fault::EventWait => "event_wait",
        }
    }

    /// The kind called `name`.
    pub fn from_name(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The faults to inject, shared by a [`crate::FaultDriver`] and whoever drives the test.
/// Every method takes `&self` and is thread-safe.
#[derive(Debug, Default)]
pub struct Faults {
    /// Calls of each kind still to fail.
    pending: [AtomicU64; Fault::ALL.len()],
    /// Faults of each kind injected so far.
    injected: [AtomicU64; Fault::ALL.len()],
    /// How much later than the device says events complete, in ns.
    delay_ns: AtomicU64,
    /// Errors injected into streams (by native handle), reported by their next synchronize.
    stream_errors: Mutex<HashMap<u64, Vec<String>>>,
    has_stream_errors: AtomicBool,
}

impl Faults {
    /// No faults, no delay.
    pub fn new() -> Self {
        Self::default()
    }

    /// Make the next `count` calls of kind `fault` fail (added to those still pending).
    pub fn fail_next(&self, fault: Fault, count: u64) {
        self.pending[fault.index()].fetch_add(count, Ordering::SeqCst);
    }

    /// Calls of kind `fault` still to fail.
    pub fn pending(&self, fault: Fault) -> u64 {
        self.pending[fault.index()].load(Ordering::SeqCst)
    }

    /// Faults of kind `fault` injected so far.
    pub fn injected(&self, fault: Fault) -> u64 {
        self.injected[fault.index()].load(Ordering::SeqCst)
    }

    /// Make events complete `delay` later than the device says (0: no delay). Applies to
    /// events recorded from now on: queries answer "not yet", synchronizes wait, streams
    /// that wait for them wait too, and callbacks run late (on the host backend, holding
    /// the stream whose event it is).
    pub fn set_completion_delay(&self, delay: Duration) {
        let ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.delay_ns.store(ns, Ordering::SeqCst);
    }

    /// The delay set with [`Faults::set_completion_delay`].
    pub fn completion_delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns.load(Ordering::SeqCst))
    }

    /// Report `message` as an asynchronous error of the stream whose native handle is
    /// `stream_handle` (from `Backend::stream_native_handle`), as a faulting kernel would:
    /// the next synchronize of that stream, or of its device, returns it (once).
    pub fn inject_stream_error(&self, stream_handle: u64, message: impl Into<String>) {
        self.stream_errors
            .lock()
            .entry(stream_handle)
            .or_default()
            .push(message.into());
        self.has_stream_errors.store(true, Ordering::SeqCst);
    }

    /// No more faults: nothing pending, no delay, no stream errors (the counts of faults
    /// injected are kept).
    pub fn clear(&self) {
        for p in &self.pending {
            p.store(0, Ordering::SeqCst);
        }
        self.delay_ns.store(0, Ordering::SeqCst);
        self.stream_errors.lock().clear();
        self.has_stream_errors.store(false, Ordering::SeqCst);
    }

    /// Apply a specification in [`crate::FAULTS_ENV`]'s syntax: comma-separated
    /// `KIND=COUNT` (the next COUNT calls of KIND fail; kinds as [`Fault::name`]) and
    /// `delay_ms=MS` (completion delay), e.g. `allocation=2,event_query=1,delay_ms=5`.
    /// Nothing is applied when any item is malformed; the error names it.
    pub fn configure(&self, spec: &str) -> Result<(), DeviceError> {
        let mut counts = Vec::new();
        let mut delay = None;
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                DeviceError::InvalidArgument(format!(
                    "'{item}' in the fault specification is not KEY=VALUE (e.g. allocation=2)"
                ))
            })?;
            let (key, value) = (key.trim(), value.trim());
            let number = value.parse::<u64>().map_err(|_| {
                DeviceError::InvalidArgument(format!(
                    "'{item}' in the fault specification: {value:?} is not a whole number"
                ))
            })?;
            if key == "delay_ms" {
                delay = Some(Duration::from_millis(number));
            } else if let Some(fault) = Fault::from_name(key) {
                counts.push((fault, number));
            } else {
                let known: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                return Err(DeviceError::InvalidArgument(format!(
                    "unknown fault '{key}' in the fault specification: expected delay_ms or one \
                     of {}",
                    known.join(", ")
                )));
            }
        }
        for (fault, count) in counts {
            self.fail_next(fault, count);
        }
        if let Some(delay) = delay {
            self.set_completion_delay(delay);
        }
        Ok(())
    }

    /// `Err` (and one fault fewer pending) when a call of kind `fault` is to fail.
    #[inline]
    pub(crate) fn check(&self, fault: Fault) -> Result<(), DeviceError> {
        if self.take(fault) {
            return Err(self.injected_error(fault));
        }
        Ok(())
    }

    /// Whether a call of kind `fault` is to fail (consuming one pending fault).
    #[inline]
    pub(crate) fn take(&self, fault: Fault) -> bool {
        let pending = &self.pending[fault.index()];
        let mut cur = pending.load(Ordering::SeqCst);
        while cur > 0 {
            match pending.compare_exchange_weak(cur, cur - 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    self.injected[fault.index()].fetch_add(1, Ordering::SeqCst);
                    return true;
                }
                Err(actual) => cur = actual,
            }
        }
        false
    }

    #[cold]
    fn injected_error(&self, fault: Fault) -> DeviceError {
        DeviceError::Driver {
            call: fault.name(),
            code: None,
            message: format!(
                "fault injected by accelrt-fault ({} {} so far, {} more pending)",
                self.injected(fault),
                fault.name(),
                self.pending(fault)
            ),
        }
    }

    /// The delay to add to an event recorded now, as an absolute time on accelrt's clock
    /// (0: none).
    #[inline]
    pub(crate) fn not_before(&self) -> u64 {
        match self.delay_ns.load(Ordering::Relaxed) {
            0 => 0,
            delay => accelrt::event::clock_ns().saturating_add(delay),
        }
    }

    /// The errors injected into the stream with this handle, taken (once).
    #[inline]
    pub(crate) fn take_stream_errors(&self, stream_handle: u64) -> Result<(), DeviceError> {
        if !self.has_stream_errors.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut errors = self.stream_errors.lock();
        let taken = errors.remove(&stream_handle);
        self.has_stream_errors
            .store(!errors.is_empty(), Ordering::SeqCst);
        match taken {
            Some(messages) if !messages.is_empty() => Err(DeviceError::Driver {
                call: "stream (injected asynchronous error)",
                code: None,
                message: format!(
                    "{} error(s) on stream {stream_handle:#x} since the last synchronize: {}",
                    messages.len(),
                    messages.join("; ")
                ),
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in Fault::ALL {
            assert_eq!(Fault::from_name(f.name()), Some(f));
            assert_eq!(f.to_string(), f.name());
        }
        assert_eq!(Fault::from_name("nothing"), None);
    }

    #[test]
    fn pending_faults_are_consumed_once_each() {
        let faults = Faults::new();
        faults.fail_next(Fault::EventQuery, 2);
        assert_eq!(faults.pending(Fault::EventQuery), 2);
        let results: Vec<bool> = (0..4).map(|_| faults.take(Fault::EventQuery)).collect();
        assert_eq!(results, [true, true, false, false]);
        assert_eq!(
            (
                faults.pending(Fault::EventQuery),
                faults.injected(Fault::EventQuery)
            ),
            (0, 2)
        );
        assert!(
            !faults.take(Fault::EventRecord),
            "other kinds are untouched"
        );
    }

    #[test]
    fn specifications_apply_all_or_nothing() {
        let faults = Faults::new();
        faults
            .configure(" allocation=2 , event_query=1,delay_ms=5,")
            .unwrap();
        assert_eq!(faults.pending(Fault::Allocation), 2);
        assert_eq!(faults.pending(Fault::EventQuery), 1);
        assert_eq!(faults.completion_delay(), Duration::from_millis(5));
        // (specification, fragment of the error)
        let bad = [
            ("allocation", "is not KEY=VALUE"),
            ("allocation=two", "is not a whole number"),
            ("event_query=1,nonsense=3", "unknown fault 'nonsense'"),
            ("delay_ms=-1", "is not a whole number"),
        ];
        for (spec, fragment) in bad {
            let err = faults.configure(spec).unwrap_err().to_string();
            assert!(err.contains(fragment), "{spec}: {err}");
        }
        assert_eq!(
            faults.pending(Fault::EventQuery),
            1,
            "a rejected specification applied nothing"
        );
        faults.clear();
        assert_eq!(faults.pending(Fault::Allocation), 0);
        assert_eq!(faults.completion_delay(), Duration::ZERO);
    }

    #[test]
    fn stream_errors_are_reported_once_for_their_stream() {
        let faults = Faults::new();
        faults.inject_stream_error(7, "kernel fault");
        assert!(faults.take_stream_errors(8).is_ok(), "another stream");
        let err = faults.take_stream_errors(7).unwrap_err().to_string();
        assert!(err.contains("kernel fault") && err.contains("0x7"), "{err}");
        assert!(faults.take_stream_errors(7).is_ok(), "reported once");
    }
}
