//! The noop driver: a driver that cannot exist (an uninhabited type), so a runtime over it
//! is unavailable and its probe says why. `Runtime<NoDriver>` is the stand-in for names
//! nobody registered, and `backend::cuda::CudaDriver` is such a driver in builds without
//! the `cuda` feature: the registry treats every backend alike, with no `cfg` branches.

use crate::device::DeviceType;
use crate::driver::Driver;
use crate::runtime::Runtime;

/// A driver with no values: its probe always fails, so no method can ever be called.
#[derive(Debug)]
pub enum NoDriver {}

/// Uninhabited stream, event and graph types of [`NoDriver`] (and of stand-in drivers).
#[derive(Debug)]
pub enum Never {}

/// The words of a backend whose cargo feature was not enabled.
pub fn not_compiled_reason(kind: DeviceType) -> String {
    format!("accelrt was built without the {kind} backend (feature `{kind}`)")
}

/// The [`Driver`] methods a driver that cannot exist needs: each body is `match *self {}`.
/// Used by [`NoDriver`] and by the CUDA stand-in of builds without the `cuda` feature.
macro_rules! uninhabited_driver_methods {
    () => {
        fn device_count(&self) -> u32 {
            match *self {}
        }
        fn device_properties(
            &self,
            _device: u32,
        ) -> $crate::error::DeviceResult<$crate::device::DeviceProperties> {
            match *self {}
        }
        fn runtime_version(&self) -> (u32, u32) {
            match *self {}
        }
        fn stream_create(
            &self,
            _device: u32,
            _priority: $crate::stream::StreamPriority,
            _default: bool,
        ) -> $crate::error::DeviceResult<Self::Stream> {
            match *self {}
        }
        fn stream_native_handle(&self, stream: &Self::Stream) -> u64 {
            match *stream {}
        }
        fn stream_synchronize(&self, stream: &Self::Stream) -> $crate::error::DeviceResult<()> {
            match *stream {}
        }
        fn stream_query(&self, stream: &Self::Stream) -> $crate::error::DeviceResult<bool> {
            match *stream {}
        }
        fn stream_wait_event(
            &self,
            stream: &Self::Stream,
            _event: &Self::Event,
        ) -> $crate::error::DeviceResult<()> {
            match *stream {}
        }
        fn event_create(
            &self,
            _device: u32,
            _timing: bool,
        ) -> $crate::error::DeviceResult<Self::Event> {
            match *self {}
        }
        fn event_record(
            &self,
            event: &Self::Event,
            _stream: &Self::Stream,
        ) -> $crate::error::DeviceResult<()> {
            match *event {}
        }
        fn event_query(&self, event: &Self::Event) -> $crate::error::DeviceResult<bool> {
            match *event {}
        }
        fn event_synchronize(&self, event: &Self::Event) -> $crate::error::DeviceResult<()> {
            match *event {}
        }
        fn event_elapsed_ms(
            &self,
            start: &Self::Event,
            _end: &Self::Event,
        ) -> $crate::error::DeviceResult<f64> {
            match *start {}
        }
        fn memory_provider(
            &self,
            _device: u32,
        ) -> $crate::error::DeviceResult<std::sync::Arc<dyn $crate::alloc::MemoryProvider>> {
            match *self {}
        }
    };
}
#[cfg_attr(feature = "cuda", allow(unused_imports))]
pub(crate) use uninhabited_driver_methods;

impl Driver for NoDriver {
    type Stream = Never;
    type Event = Never;
    type Graph = Never;

    /// Never used for the backend's name: a stand-in is made with
    /// [`Runtime::unavailable`], which names its own device type.
    const KIND: DeviceType = DeviceType::custom("none");
    const BUILT: bool = false;

    fn probe() -> Result<Self, String> {
        Err("no backend".into())
    }

    uninhabited_driver_methods!();
}

/// The stand-in for a backend that cannot be used: no devices, the reason, and
/// `NeedsBackend` naming the call from every call.
pub type UnavailableBackend = Runtime<NoDriver>;

impl Runtime<NoDriver> {
    /// A stand-in for `kind` (built into this process) that gives `reason` on every call.
    pub fn unavailable(kind: DeviceType, reason: impl Into<String>) -> Self {
        Runtime::stand_in(kind, reason.into(), true)
    }

    /// The stand-in for a backend whose cargo feature was not enabled (`is_built() == false`).
    pub fn not_compiled(kind: DeviceType) -> Self {
        Runtime::stand_in(kind, not_compiled_reason(kind), false)
    }

    /// The stand-in for a registered backend's name that nothing registered.
    pub(crate) fn unregistered(kind: DeviceType, reason: String) -> Self {
        Runtime::stand_in(kind, reason, false)
    }
}
