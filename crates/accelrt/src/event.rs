//! The event pool, after PyTorch's `MPSEventPool`.
//!
//! Creating a device event costs a driver call (~160 ns on CUDA, more with timing); frameworks
//! create and drop events constantly (every cross-stream free, every `record_stream`). The pool
//! keeps released events on a free stack per device and per timing flag, so the common case is
//! one atomic swap to take an event and one to put it back (a one-event hot slot in front of
//! each locked stack).
//!
//! Two ways to hold an event:
//! - [`PooledEvent`], an RAII handle that returns its event to the pool on drop (the fast path);
//! - the id API ([`EventPool::acquire_id`], [`EventPool::get`], [`EventPool::release_id`]) that
//!   keeps in-use events in a map under an [`EventId`] that is unique and never reused, for
//!   callers that cannot hold a Rust borrow (the [`crate::Backend`] hooks, FFI).
//!
//! The pool stores raw events (`E`, the driver's event type) with their device, their timing
//! flag and whether they have been recorded since they left the pool. What the event *does*
//! (record, query, ...) is the driver's business; [`crate::runtime::Runtime`] combines the two.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{DeviceError, DeviceResult};

/// Nanoseconds on accelrt's clock: a monotonic clock whose epoch is its first use in the
/// process. Event completion times ([`crate::Backend::event_completion_time`]) are on it.
pub fn clock_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// [`clock_ns`] in milliseconds: "now", to compare with event completion times.
pub fn clock_ms() -> f64 {
    clock_ns() as f64 / 1e6
}

/// The id of an event acquired through the id API. Unique within its pool, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct EventId(pub u64);

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "event#{}", self.0)
    }
}

/// One pooled event: the driver's raw event and what the pool knows about it.
#[derive(Debug)]
pub struct EventSlot<E> {
    raw: E,
    device: u32,
    timing: bool,
    /// Recorded since it left the free list. An event never recorded counts as complete
    /// without asking the driver, so the pool never has to reset driver state on reuse.
    recorded: AtomicBool,
    /// The graph whose capture the last record was part of (0: a record on the device).
    captured: AtomicU64,
}

impl<E> EventSlot<E> {
    /// The driver's event.
    #[inline]
    pub fn raw(&self) -> &E {
        &self.raw
    }
    /// The device the event was created on.
    #[inline]
    pub fn device(&self) -> u32 {
        self.device
    }
    /// Whether the event records completion times (`enable_timing`).
    #[inline]
    pub fn timing(&self) -> bool {
        self.timing
    }
    /// Whether the event was recorded since it was acquired.
    #[inline]
    pub fn is_recorded(&self) -> bool {
        self.recorded.load(Ordering::Acquire)
    }
    /// Note that the driver has recorded the event (call after the driver's record):
    /// `graph` is the graph whose capture the record was part of, 0 for a plain record.
    #[inline]
    pub fn mark_recorded(&self, graph: u64) {
        self.captured.store(graph, Ordering::Relaxed);
        self.recorded.store(true, Ordering::Release);
    }
    /// The graph whose capture the last record was part of (0: none, or never recorded).
    #[inline]
    pub fn captured_in(&self) -> u64 {
        self.captured.load(Ordering::Relaxed)
    }
}

/// Creates a raw event for `(device, enable_timing)` when the free list is empty.
pub type EventFactory<E> = Box<dyn Fn(u32, bool) -> DeviceResult<E> + Send + Sync>;

/// One free list: a single-event "hot" slot taken and refilled with one atomic swap each
/// (the acquire-record-release cycle of one thread never locks), then a locked stack.
struct FreeList<E> {
    /// An `Arc::into_raw` pointer owned by the list, or null.
    hot: AtomicPtr<EventSlot<E>>,
    rest: Mutex<Vec<Arc<EventSlot<E>>>>,
    /// `hot` owns an `Arc`: the list is Send/Sync only when that `Arc` is.
    _owns: std::marker::PhantomData<Arc<EventSlot<E>>>,
}

impl<E> FreeList<E> {
    fn new() -> Self {
        FreeList {
            hot: AtomicPtr::new(std::ptr::null_mut()),
            rest: Mutex::new(Vec::new()),
            _owns: std::marker::PhantomData,
        }
    }

    #[inline]
    fn pop(&self) -> Option<Arc<EventSlot<E>>> {
        let hot = self.hot.swap(std::ptr::null_mut(), Ordering::Acquire);
        if !hot.is_null() {
            // SAFETY: a non-null `hot` is an `Arc::into_raw` pointer whose reference the list
            // owned; the swap moved that ownership to us alone.
            return Some(unsafe { Arc::from_raw(hot) });
        }
        self.rest.lock().pop()
    }

    #[inline]
    fn push(&self, slot: Arc<EventSlot<E>>) {
        let raw = Arc::into_raw(slot).cast_mut();
        if self
            .hot
            .compare_exchange(
                std::ptr::null_mut(),
                raw,
                Ordering::Release,
                Ordering::Relaxed,
            )
            .is_err()
        {
            // SAFETY: `raw` came from `Arc::into_raw` just above and was not published.
            self.rest.lock().push(unsafe { Arc::from_raw(raw) });
        }
    }

    fn len(&self) -> usize {
        usize::from(!self.hot.load(Ordering::Acquire).is_null()) + self.rest.lock().len()
    }

    /// Take every event off the list.
    fn drain(&self) -> Vec<Arc<EventSlot<E>>> {
        let mut taken = std::mem::take(&mut *self.rest.lock());
        taken.extend(self.pop());
        taken
    }
}

impl<E> Drop for FreeList<E> {
    fn drop(&mut self) {
        let hot = *self.hot.get_mut();
        if !hot.is_null() {
            // SAFETY: the list owns the reference behind a non-null `hot`; nothing else can
            // reach the list any more.
            drop(unsafe { Arc::from_raw(hot) });
        }
    }
}

/// A pool of reusable events: per device, one free stack for timing events and one for
/// the others, plus the map of events handed out through the id API.
pub struct EventPool<E> {
    /// `free[device][timing as usize]`.
    free: Box<[[FreeList<E>; 2]]>,
    in_use: Mutex<HashMap<u64, Arc<EventSlot<E>>>>,
    next_id: AtomicU64,
    created: AtomicU64,
    destroyed: AtomicU64,
    create: EventFactory<E>,
}

impl<E: Send + Sync + 'static> std::fmt::Debug for EventPool<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPool")
            .field("devices", &self.free.len())
            .field("in_use", &self.in_use_count())
            .field("created", &self.created_count())
            .field("destroyed", &self.destroyed_count())
            .finish()
    }
}

impl<E: Send + Sync + 'static> EventPool<E> {
    /// A pool for `devices` devices that creates events with `create(device, enable_timing)`.
    pub fn new(
        devices: u32,
        create: impl Fn(u32, bool) -> DeviceResult<E> + Send + Sync + 'static,
    ) -> Self {
        let free = (0..devices)
            .map(|_| [FreeList::new(), FreeList::new()])
            .collect();
        EventPool {
            free,
            in_use: Mutex::new(HashMap::new()),
            // 0 is never handed out, so a zeroed id is always unknown.
            next_id: AtomicU64::new(1),
            created: AtomicU64::new(0),
            destroyed: AtomicU64::new(0),
            create: Box::new(create),
        }
    }

    /// Number of devices the pool serves.
    pub fn device_count(&self) -> u32 {
        self.free.len() as u32
    }

    #[inline]
    fn free_list(&self, device: u32, timing: bool) -> DeviceResult<&FreeList<E>> {
        match self.free.get(device as usize) {
            Some(lists) => Ok(&lists[timing as usize]),
            None => Err(self.bad_device(device)),
        }
    }

    #[cold]
    fn bad_device(&self, device: u32) -> DeviceError {
        DeviceError::InvalidArgument(format!(
            "event pool: device {device} does not exist (the pool serves {} device(s))",
            self.free.len()
        ))
    }

    /// Take an event from the free list (or create one) as an RAII handle.
    ///
    /// Fast path: one atomic swap (the hot slot), else one lock and a pop. The event goes back to the pool when the handle drops.
    #[inline]
    pub fn acquire(&self, device: u32, enable_timing: bool) -> DeviceResult<PooledEvent<'_, E>> {
        let list = self.free_list(device, enable_timing)?;
        let popped = list.pop();
        let slot = match popped {
            Some(slot) => slot,
            None => self.create_slot(device, enable_timing)?,
        };
        Ok(PooledEvent {
            pool: self,
            slot: Some(slot),
        })
    }

    #[cold]
    #[inline(never)]
    fn create_slot(&self, device: u32, timing: bool) -> DeviceResult<Arc<EventSlot<E>>> {
        let raw = (self.create)(device, timing)?;
        self.created.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(EventSlot {
            raw,
            device,
            timing,
            recorded: AtomicBool::new(false),
            captured: AtomicU64::new(0),
        }))
    }

    /// Put a slot back on its free list, cleared.
    #[inline]
    fn give_back(&self, slot: Arc<EventSlot<E>>) {
        slot.recorded.store(false, Ordering::Relaxed);
        slot.captured.store(0, Ordering::Relaxed);
        // The slot was created for an existing device, so the index is valid.
        let list = &self.free[slot.device as usize][slot.timing as usize];
        list.push(slot);
    }

    /// Acquire an event through the id API: it stays in the in-use map until
    /// [`EventPool::release_id`].
    pub fn acquire_id(&self, device: u32, enable_timing: bool) -> DeviceResult<EventId> {
        Ok(self.acquire(device, enable_timing)?.into_id())
    }

    /// The in-use event behind `id`.
    #[inline]
    pub fn get(&self, id: EventId) -> DeviceResult<Arc<EventSlot<E>>> {
        match self.in_use.lock().get(&id.0) {
            Some(slot) => Ok(Arc::clone(slot)),
            None => Err(DeviceError::UnknownEvent { id: id.0 }),
        }
    }

    /// Return the event behind `id` to the pool. An unknown or already released id is an
    /// [`DeviceError::UnknownEvent`] and leaves the pool unchanged.
    pub fn release_id(&self, id: EventId) -> DeviceResult<()> {
        let slot = self
            .in_use
            .lock()
            .remove(&id.0)
            .ok_or(DeviceError::UnknownEvent { id: id.0 })?;
        self.give_back(slot);
        Ok(())
    }

    /// Events waiting on the free list of `(device, timing)`; 0 for a device that does not exist.
    pub fn free_count(&self, device: u32, enable_timing: bool) -> usize {
        self.free_list(device, enable_timing)
            .map(FreeList::len)
            .unwrap_or(0)
    }

    /// Events currently handed out through the id API.
    pub fn in_use_count(&self) -> usize {
        self.in_use.lock().len()
    }

    /// Raw events created so far (the pool's misses).
    pub fn created_count(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }

    /// Raw events destroyed by [`EventPool::empty_cache`] so far.
    pub fn destroyed_count(&self) -> u64 {
        self.destroyed.load(Ordering::Relaxed)
    }

    /// Destroy every event waiting on a free list (MPSEventPool's `emptyCache`): the driver
    /// gets them back now instead of at exit. Events in use (RAII handles, ids) are kept and
    /// return to the pool as usual. Returns how many were destroyed.
    pub fn empty_cache(&self) -> u64 {
        let mut destroyed = 0;
        for lists in self.free.iter() {
            for list in lists {
                let taken = list.drain();
                destroyed += taken.len() as u64;
                // Dropping the last reference destroys the raw event (the driver's Drop).
                drop(taken);
            }
        }
        self.destroyed.fetch_add(destroyed, Ordering::Relaxed);
        destroyed
    }
}

/// An event borrowed from an [`EventPool`]; returns to the pool when dropped.
pub struct PooledEvent<'a, E: Send + Sync + 'static> {
    pool: &'a EventPool<E>,
    /// Always `Some` until drop or [`PooledEvent::into_id`].
    slot: Option<Arc<EventSlot<E>>>,
}

impl<E: Send + Sync + 'static> PooledEvent<'_, E> {
    /// The pooled slot (raw event, device, timing flag).
    #[inline]
    pub fn slot(&self) -> &EventSlot<E> {
        self.slot
            .as_deref()
            .expect("PooledEvent holds its slot until dropped")
    }

    /// Move the event into the pool's id map; it then lives until [`EventPool::release_id`].
    pub fn into_id(mut self) -> EventId {
        let slot = self
            .slot
            .take()
            .expect("PooledEvent holds its slot until dropped");
        let id = self.pool.next_id.fetch_add(1, Ordering::Relaxed);
        self.pool.in_use.lock().insert(id, slot);
        EventId(id)
    }
}

impl<E: Send + Sync + 'static> std::ops::Deref for PooledEvent<'_, E> {
    type Target = EventSlot<E>;
    #[inline]
    fn deref(&self) -> &EventSlot<E> {
        self.slot()
    }
}

impl<E: Send + Sync + 'static> Drop for PooledEvent<'_, E> {
    #[inline]
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.pool.give_back(slot);
        }
    }
}

impl<E: Send + Sync + 'static> std::fmt::Debug for PooledEvent<'_, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.slot();
        f.debug_struct("PooledEvent")
            .field("device", &s.device)
            .field("timing", &s.timing)
            .field("recorded", &s.is_recorded())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> EventPool<(u32, bool)> {
        EventPool::new(2, |d, t| Ok((d, t)))
    }

    #[test]
    fn free_list_hot_slot_then_stack_owns_every_event_once() {
        let slot = |n: u32| {
            Arc::new(EventSlot {
                raw: n,
                device: 0,
                timing: false,
                recorded: AtomicBool::new(false),
                captured: AtomicU64::new(0),
            })
        };
        let list = FreeList::new();
        let (a, b, c) = (slot(1), slot(2), slot(3));
        for s in [&a, &b, &c] {
            list.push(Arc::clone(s));
        }
        assert_eq!(list.len(), 3);
        assert_eq!(Arc::strong_count(&a), 2);
        // The hot slot (the first pushed) comes out first, then the stack, last in first out.
        let order: Vec<u32> = std::iter::from_fn(|| list.pop()).map(|s| s.raw).collect();
        assert_eq!(order, [1, 3, 2]);
        assert_eq!(list.len(), 0);
        assert_eq!(Arc::strong_count(&a), 1);
        // A list dropped with events in it releases them.
        list.push(Arc::clone(&a));
        list.push(Arc::clone(&b));
        drop(list);
        assert_eq!((Arc::strong_count(&a), Arc::strong_count(&b)), (1, 1));
    }

    #[test]
    fn raii_handle_returns_event_and_reuses_it() {
        let p = pool();
        {
            let e = p.acquire(1, true).unwrap();
            assert_eq!(*e.raw(), (1, true));
            e.mark_recorded(7);
            assert_eq!(e.captured_in(), 7);
            assert_eq!(p.free_count(1, true), 0);
        }
        assert_eq!(p.free_count(1, true), 1);
        let e = p.acquire(1, true).unwrap();
        assert!(!e.is_recorded(), "a reused event starts unrecorded");
        assert_eq!(e.captured_in(), 0, "and outside any capture");
        assert_eq!(p.created_count(), 1);
    }

    #[test]
    fn empty_cache_destroys_free_events_and_keeps_those_in_use() {
        let p = pool();
        let held = p.acquire(0, false).unwrap();
        let id = p.acquire_id(1, true).unwrap();
        // Three free events over two lists (one in each hot slot, one on a stack).
        let free: Vec<_> = (0..3).map(|i| p.acquire(i % 2, false).unwrap()).collect();
        drop(free);
        assert_eq!(p.free_count(0, false) + p.free_count(1, false), 3);
        assert_eq!(p.empty_cache(), 3);
        assert_eq!((p.free_count(0, false), p.free_count(1, false)), (0, 0));
        assert_eq!((p.created_count(), p.destroyed_count()), (5, 3));
        // In-use events survive and come back to the (now empty) lists.
        drop(held);
        p.release_id(id).unwrap();
        assert_eq!((p.free_count(0, false), p.free_count(1, true)), (1, 1));
        assert_eq!(p.empty_cache(), 2);
        assert_eq!(p.empty_cache(), 0, "nothing left");
        // The next acquire creates a new event.
        drop(p.acquire(0, false).unwrap());
        assert_eq!(p.created_count(), 6);
    }

    #[test]
    fn timing_and_plain_events_use_separate_lists() {
        let p = pool();
        drop(p.acquire(0, false).unwrap());
        let t = p.acquire(0, true).unwrap();
        assert!(t.timing());
        assert_eq!(p.created_count(), 2);
        assert_eq!(p.free_count(0, false), 1);
    }

    #[test]
    fn ids_are_never_reused_and_double_release_fails() {
        let p = pool();
        let a = p.acquire_id(0, false).unwrap();
        p.release_id(a).unwrap();
        let b = p.acquire_id(0, false).unwrap();
        assert_ne!(a, b);
        assert_eq!(p.release_id(a), Err(DeviceError::UnknownEvent { id: a.0 }));
        assert_eq!(p.in_use_count(), 1);
        assert_eq!(p.free_count(0, false), 0);
        assert!(p.acquire(2, false).is_err());
    }
}
