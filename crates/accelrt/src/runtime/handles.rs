//! Handles users hold: [`Event`] (a pooled event with the runtime's operations) and
//! [`DeviceGuard`].

use super::*;

/// A pooled event with the runtime's operations, after PyTorch's `MPSEvent`. Returns to the
/// event pool when dropped.
pub struct Event<'a, D: Driver> {
    pub(super) core: &'a Core<D>,
    pub(super) ev: PooledEvent<'a, D::Event>,
}

impl<D: Driver> std::fmt::Debug for Event<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.ev, f)
    }
}

impl<D: Driver> Event<'_, D> {
    /// Mark the current end of `stream` (a stream of the event's device).
    #[inline]
    pub fn record(&self, stream: Stream) -> Result<()> {
        Ok(self.core.record(&self.ev, stream)?)
    }
    /// Record, then flush the stream so the event can complete without further work.
    pub fn sync_record(&self, stream: Stream) -> Result<()> {
        Ok(self.core.sync_record(&self.ev, stream)?)
    }
    /// True when complete; true for an event never recorded.
    #[inline]
    pub fn query(&self) -> Result<bool> {
        Ok(self.core.query(&self.ev)?)
    }
    /// Block until the event completes.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.core.synchronize(&self.ev)?)
    }
    /// Make later work on `stream` wait for this event.
    pub fn wait(&self, stream: Stream) -> Result<()> {
        Ok(self.core.wait(&self.ev, stream)?)
    }
    /// Milliseconds from this (start) event to `end`; both timing events, completed.
    pub fn elapsed_ms(&self, end: &Event<'_, D>) -> Result<f64> {
        Ok(self.core.elapsed(&self.ev, &end.ev, (None, None))?)
    }
    /// When this completed timing event completed, in ms on [`crate::event::clock_ms`]'s
    /// clock (MPS's `getCompletionTime`).
    pub fn completion_time_ms(&self) -> Result<f64> {
        Ok(self.core.completion_time(&self.ev, None)?)
    }
    /// Run `callback` once the event completes (now, if it has).
    pub fn notify(&self, callback: impl FnOnce() + Send + 'static) -> Result<()> {
        Ok(self.core.notify(&self.ev, Box::new(callback))?)
    }
    /// Whether the event records completion times.
    pub fn timing(&self) -> bool {
        self.ev.timing()
    }
    /// The device the event belongs to.
    pub fn device(&self) -> u32 {
        self.ev.device()
    }
    /// Hand the event over to the id API (released with `event_release`).
    pub fn into_id(self) -> EventId {
        self.ev.into_id()
    }
}

/// Sets the current device and restores the previous one on drop (PyTorch's `DeviceGuard`).
pub struct DeviceGuard<'a> {
    pub(super) backend: &'a dyn Backend,
    pub(super) previous: u32,
}

impl<'a> DeviceGuard<'a> {
    /// Make `device` current on this thread until the guard drops. An invalid device is an
    /// error and changes nothing.
    pub fn new(backend: &'a dyn Backend, device: u32) -> Result<Self> {
        let previous = backend.exchange_device(device)?;
        Ok(DeviceGuard { backend, previous })
    }

    /// The device that will be restored.
    pub fn previous(&self) -> u32 {
        self.previous
    }
}

impl Drop for DeviceGuard<'_> {
    fn drop(&mut self) {
        // `previous` was valid when read, and device counts never shrink.
        let _ = self.backend.set_device(self.previous);
    }
}

impl std::fmt::Debug for DeviceGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceGuard")
            .field("backend", &self.backend.device_type())
            .field("previous", &self.previous)
            .finish()
    }
}
