//! Events: a recorded event is a [`Point`] (`device/points.rs`), a position in the device's
//! queue given as a submission number. It completes when the GPU has finished that submission
//! (`Queue::on_submitted_work_done`, driven by `Device::poll`).
//!
//! A non-timing record submits nothing: the point is the stream's last submission so far
//! (its *frontier*), exactly the work the event stands for. When the stream still holds work
//! back (a host task blocks it, or it waits for another stream), the point is resolved later,
//! by the stream's worker when it reaches the record. A timing record is a submission of its
//! own that writes a GPU timestamp (`Features::TIMESTAMP_QUERY`) into a query set and copies
//! it into a mappable buffer; elapsed times are differences of timestamps, completion times
//! are timestamps calibrated against accelrt's clock.

use std::sync::Arc;

use accelrt::error::{DeviceError, DeviceResult};
use parking_lot::Mutex;

use crate::device::points::Point;
use crate::device::DeviceShared;

/// A wgpu event. Re-recording moves it to a new point.
pub struct WgpuEvent {
    pub(crate) device: Arc<DeviceShared>,
    pub(crate) timing: bool,
    pub(crate) point: Mutex<Option<Arc<Point>>>,
}

impl std::fmt::Debug for WgpuEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuEvent")
            .field("device", &self.device.index)
            .field("timing", &self.timing)
            .field("point", &*self.point.lock())
            .finish()
    }
}

impl WgpuEvent {
    pub(crate) fn new(device: Arc<DeviceShared>, timing: bool) -> Self {
        WgpuEvent {
            device,
            timing,
            point: Mutex::new(None),
        }
    }

    /// Whether the event was created for timing.
    pub fn timing(&self) -> bool {
        self.timing
    }

    /// The submission number the event stands for (`None`: never recorded, recorded in a
    /// capture, or not resolved yet).
    pub fn submission(&self) -> Option<u64> {
        self.point.lock().as_ref().and_then(|p| p.resolved())
    }

    #[inline]
    pub(crate) fn current(&self) -> Option<Arc<Point>> {
        self.point.lock().clone()
    }

    /// Timing is available: the event was made for it and the device has timestamps.
    fn check_timing(&self, call: &'static str) -> DeviceResult<()> {
        if self.timing && !self.device.timestamps {
            return Err(DeviceError::unsupported(
                crate::KIND,
                match call {
                    "event_elapsed_time" => {
                        "event_elapsed_time() on this adapter (it has no \
                         Features::TIMESTAMP_QUERY, so GPU work cannot be timed)"
                    }
                    _ => {
                        "event_completion_time() on this adapter (it has no \
                         Features::TIMESTAMP_QUERY, so GPU work cannot be timed)"
                    }
                },
            ));
        }
        Ok(())
    }

    fn recorded(&self, which: &str) -> DeviceResult<Arc<Point>> {
        self.current().ok_or_else(|| {
            DeviceError::Event(format!(
                "the {which}event was never recorded: record it on a stream first"
            ))
        })
    }

    pub(crate) fn elapsed_ms(start: &WgpuEvent, end: &WgpuEvent) -> DeviceResult<f64> {
        start.check_timing("event_elapsed_time")?;
        end.check_timing("event_elapsed_time")?;
        let dev = &start.device;
        let t0 = start.recorded("start ")?.ticks(dev, "start ")?;
        let t1 = end.recorded("end ")?.ticks(dev, "end ")?;
        let ns_per_tick = dev.timestamp_period;
        if t1 < t0 {
            return Err(DeviceError::Event(format!(
                "the end event was not recorded after the start event: it completed {:.3} ms \
                 earlier",
                (t0 - t1) as f64 * ns_per_tick / 1e6
            )));
        }
        Ok((t1 - t0) as f64 * ns_per_tick / 1e6)
    }

    pub(crate) fn completion_ns(&self) -> DeviceResult<u64> {
        self.check_timing("event_completion_time")?;
        let ticks = self.recorded("")?.ticks(&self.device, "")?;
        self.device.ticks_to_clock_ns(ticks)
    }
}
