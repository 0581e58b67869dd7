//! [`FaultDriver`]: a [`Driver`] that runs on another driver's devices and consults
//! [`Faults`] on every call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use accelrt::alloc::MemoryProvider;
use accelrt::driver::{Driver, MemoryUsage};
use accelrt::driver::{EventCallback, HostTask};
use accelrt::error::{DeviceError, DeviceResult};
use accelrt::{DeviceProperties, DeviceType, StreamPriority};

use crate::faults::{Fault, Faults};
use crate::memory::FaultMemory;
use crate::{FAULTS_ENV, KIND};

/// Another driver's devices, with faults injected on demand (see the crate docs). Its
/// streams and graphs are the inner driver's; its events carry a completion delay.
pub struct FaultDriver<D: Driver> {
    inner: D,
    faults: Arc<Faults>,
    memory: Box<[OnceLock<Arc<dyn MemoryProvider>>]>,
    env: &'static [&'static str],
}

impl<D: Driver> std::fmt::Debug for FaultDriver<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultDriver")
            .field("over", &D::KIND)
            .field("devices", &self.inner.device_count())
            .finish()
    }
}

impl<D: Driver> FaultDriver<D> {
    /// `inner`'s devices, with `faults` injected.
    pub fn new(inner: D, faults: Arc<Faults>) -> Self {
        let env: Vec<&'static str> = inner
            .env_vars()
            .iter()
            .copied()
            .chain([FAULTS_ENV])
            .collect();
        FaultDriver {
            memory: (0..inner.device_count()).map(|_| OnceLock::new()).collect(),
            inner,
            faults,
            // One small list per driver, for `show_config`.
            env: Box::leak(env.into_boxed_slice()),
        }
    }

    /// The faults this driver injects.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// The driver whose devices this one runs on.
    pub fn inner(&self) -> &D {
        &self.inner
    }
}

/// An event of a [`FaultDriver`]: the inner driver's, and the time before which it does not
/// count as complete (the completion delay when it was recorded).
pub struct FaultEvent<E> {
    inner: E,
    /// On accelrt's clock, in ns; 0: no delay.
    not_before: AtomicU64,
}

impl<E> FaultEvent<E> {
    /// The inner driver's event.
    pub fn inner(&self) -> &E {
        &self.inner
    }

    /// How long until the delay has passed (zero when it has, or there is none).
    fn remaining(&self) -> Duration {
        let not_before = self.not_before.load(Ordering::Acquire);
        Duration::from_nanos(not_before.saturating_sub(accelrt::event::clock_ns()))
    }
}

impl<E> std::fmt::Debug for FaultEvent<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultEvent")
            .field("delayed_for", &self.remaining())
            .finish()
    }
}

impl<D: Driver> Driver for FaultDriver<D> {
    type Stream = D::Stream;
    type Event = FaultEvent<D::Event>;
    type Graph = D::Graph;

    const KIND: DeviceType = KIND;

    /// The inner driver's probe, with faults from [`FAULTS_ENV`] (a malformed value makes
    /// the backend unavailable, naming it).
    fn probe() -> std::result::Result<Self, String> {
        let inner = D::probe()?;
        let faults = Arc::new(Faults::new());
        crate::configure_from_env(&faults)?;
        Ok(FaultDriver::new(inner, faults))
    }

    fn device_count(&self) -> u32 {
        self.inner.device_count()
    }

    fn device_properties(&self, device: u32) -> DeviceResult<DeviceProperties> {
        let mut p = self.inner.device_properties(device)?;
        p.name = format!("{} (fault injection over {})", p.name, D::KIND);
        Ok(p)
    }

    fn runtime_version(&self) -> (u32, u32) {
        self.inner.runtime_version()
    }

    fn env_vars(&self) -> &'static [&'static str] {
        self.env
    }

    fn has_primary_context(&self, device: u32) -> Option<bool> {
        self.inner.has_primary_context(device)
    }

    fn device_of_ptr(&self, ptr: usize) -> Option<u32> {
        self.inner.device_of_ptr(ptr)
    }

    fn memory_usage(&self, device: u32) -> DeviceResult<MemoryUsage> {
        self.inner.memory_usage(device)
    }

    // ---- streams ---------------------------------------------------------------------------

    fn stream_create(
        &self,
        device: u32,
        priority: StreamPriority,
        default: bool,
    ) -> DeviceResult<D::Stream> {
        self.faults.check(Fault::StreamCreate)?;
        self.inner.stream_create(device, priority, default)
    }

    unsafe fn stream_wrap(&self, device: u32, handle: u64) -> DeviceResult<D::Stream> {
        // SAFETY: forwarded from this method's contract.
        unsafe { self.inner.stream_wrap(device, handle) }
    }

    fn stream_native_handle(&self, stream: &D::Stream) -> u64 {
        self.inner.stream_native_handle(stream)
    }

    fn stream_commit(&self, stream: &D::Stream) -> DeviceResult<()> {
        self.inner.stream_commit(stream)
    }

    fn stream_synchronize(&self, stream: &D::Stream) -> DeviceResult<()> {
        self.faults.check(Fault::StreamSynchronize)?;
        self.inner.stream_synchronize(stream)?;
        self.faults
            .take_stream_errors(self.inner.stream_native_handle(stream))
    }

    fn stream_query(&self, stream: &D::Stream) -> DeviceResult<bool> {
        self.faults.check(Fault::StreamQuery)?;
        self.inner.stream_query(stream)
    }

    fn stream_wait_event(&self, stream: &D::Stream, event: &Self::Event) -> DeviceResult<()> {
        self.faults.check(Fault::EventWait)?;
        let remaining = event.remaining();
        if !remaining.is_zero() {
            // The stream waits for the delayed completion too: hold it that long first.
            let until = event.not_before.load(Ordering::Acquire);
            self.inner
                .launch_host(stream, Arc::new(move || sleep_until(until)))?;
        }
        self.inner.stream_wait_event(stream, &event.inner)
    }

    fn launch_host(&self, stream: &D::Stream, task: HostTask) -> DeviceResult<()> {
        self.faults.check(Fault::LaunchHost)?;
        self.inner.launch_host(stream, task)
    }

    fn device_synchronize(&self, device: u32, streams: &[&D::Stream]) -> DeviceResult<()> {
        self.faults.check(Fault::StreamSynchronize)?;
        let synced = self.inner.device_synchronize(device, streams);
        let mut first_error = synced.err();
        for s in streams {
            if let Err(e) = self
                .faults
                .take_stream_errors(self.inner.stream_native_handle(s))
            {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    // ---- events ----------------------------------------------------------------------------

    fn event_create(&self, device: u32, timing: bool) -> DeviceResult<Self::Event> {
        self.faults.check(Fault::EventCreate)?;
        Ok(FaultEvent {
            inner: self.inner.event_create(device, timing)?,
            not_before: AtomicU64::new(0),
        })
    }

    fn event_record(&self, event: &Self::Event, stream: &D::Stream) -> DeviceResult<()> {
        self.faults.check(Fault::EventRecord)?;
        self.inner.event_record(&event.inner, stream)?;
        event
            .not_before
            .store(self.faults.not_before(), Ordering::Release);
        Ok(())
    }

    fn event_record_captured(&self, event: &Self::Event, stream: &D::Stream) -> DeviceResult<()> {
        self.faults.check(Fault::EventRecord)?;
        self.inner.event_record_captured(&event.inner, stream)?;
        event.not_before.store(0, Ordering::Release);
        Ok(())
    }

    fn event_query(&self, event: &Self::Event) -> DeviceResult<bool> {
        self.faults.check(Fault::EventQuery)?;
        Ok(self.inner.event_query(&event.inner)? && event.remaining().is_zero())
    }

    fn event_synchronize(&self, event: &Self::Event) -> DeviceResult<()> {
        self.faults.check(Fault::EventSynchronize)?;
        self.inner.event_synchronize(&event.inner)?;
        sleep_until(event.not_before.load(Ordering::Acquire));
        Ok(())
    }

    fn event_elapsed_ms(&self, start: &Self::Event, end: &Self::Event) -> DeviceResult<f64> {
        self.inner.event_elapsed_ms(&start.inner, &end.inner)
    }

    fn event_notify(&self, event: &Self::Event, callback: EventCallback) -> DeviceResult<()> {
        let until = event.not_before.load(Ordering::Acquire);
        if until == 0 {
            return self.inner.event_notify(&event.inner, callback);
        }
        self.inner.event_notify(
            &event.inner,
            Box::new(move || {
                sleep_until(until);
                callback();
            }),
        )
    }

    /// The inner completion time, or the end of the delay if that is later.
    fn event_completion_ns(&self, event: &Self::Event) -> DeviceResult<u64> {
        let inner = self.inner.event_completion_ns(&event.inner)?;
        let not_before = event.not_before.load(Ordering::Acquire);
        if !event.remaining().is_zero() {
            return Err(DeviceError::Event(
                "has not completed yet (its completion is delayed by accelrt-fault): \
                 synchronize it before asking for its completion time"
                    .into(),
            ));
        }
        Ok(inner.max(not_before))
    }

    // ---- graphs ----------------------------------------------------------------------------

    fn capture_begin(&self, stream: &D::Stream) -> DeviceResult<()> {
        self.inner.capture_begin(stream)
    }

    fn capture_end(&self, stream: &D::Stream) -> DeviceResult<D::Graph> {
        self.inner.capture_end(stream)
    }

    fn graph_launch(&self, graph: &D::Graph, stream: &D::Stream) -> DeviceResult<()> {
        self.inner.graph_launch(graph, stream)
    }

    fn graph_instantiate(&self, graph: &D::Graph) -> DeviceResult<()> {
        self.inner.graph_instantiate(graph)
    }

    fn graph_discard_template(&self, graph: &D::Graph) {
        self.inner.graph_discard_template(graph);
    }

    fn capture_join(
        &self,
        stream: &D::Stream,
        origin: &D::Stream,
        event: &Self::Event,
    ) -> DeviceResult<()> {
        self.inner.capture_join(stream, origin, &event.inner)
    }

    fn capture_leave(&self, stream: &D::Stream, graph: Option<&D::Graph>) -> DeviceResult<()> {
        self.inner.capture_leave(stream, graph)
    }

    // ---- memory ----------------------------------------------------------------------------

    fn memory_provider(&self, device: u32) -> DeviceResult<Arc<dyn MemoryProvider>> {
        let slot = &self.memory[device as usize];
        if let Some(m) = slot.get() {
            return Ok(Arc::clone(m));
        }
        let inner = self.inner.memory_provider(device)?;
        let wrapped: Arc<dyn MemoryProvider> =
            Arc::new(FaultMemory::new(inner, Arc::clone(&self.faults)));
        Ok(Arc::clone(slot.get_or_init(|| wrapped)))
    }

    fn pinned_memory_provider(&self) -> DeviceResult<Arc<dyn MemoryProvider>> {
        self.inner.pinned_memory_provider()
    }

    fn is_pinned_ptr(&self, ptr: usize) -> bool {
        self.inner.is_pinned_ptr(ptr)
    }

    unsafe fn write_async(&self, stream: &D::Stream, dst: usize, src: &[u8]) -> DeviceResult<()> {
        // SAFETY: forwarded from this method's contract.
        unsafe { self.inner.write_async(stream, dst, src) }
    }

    fn can_access_peer(&self, device: u32, peer: u32) -> DeviceResult<bool> {
        self.inner.can_access_peer(device, peer)
    }

    fn enable_peer_access(&self, device: u32, peer: u32) -> DeviceResult<()> {
        self.inner.enable_peer_access(device, peer)
    }

    unsafe fn copy_async(
        &self,
        stream: &D::Stream,
        dst: usize,
        src: usize,
        bytes: usize,
    ) -> DeviceResult<()> {
        // SAFETY: forwarded from this method's contract.
        unsafe { self.inner.copy_async(stream, dst, src, bytes) }
    }
}

/// Sleep until `until` on accelrt's clock (ns; 0 or a past time: return at once).
fn sleep_until(until: u64) {
    let now = accelrt::event::clock_ns();
    if until > now {
        std::thread::sleep(Duration::from_nanos(until - now));
    }
}
