//! The global allocator callbacks: registered once, called by every caching allocator of the
//! process, those that exist and those created later, next to each allocator's own
//! ([`crate::CachingAllocator::add_callback`]): PyTorch's `MPSAllocatorCallbacksRegistry`.
//! `accelrt::registry` re-exports them. Also here, what every callback is told: the
//! [`AllocatorEvent`]s, the callback types and the [`CallbackId`] that removes one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::device::Device;

/// What a registered callback is told, and when it fires. Callbacks run on the thread that
/// made the call, after the allocator's locks are released, so they may call the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum AllocatorEvent {
    /// A new segment came from the device (ptr and size of the segment).
    Allocated,
    /// A cached block was handed out again (ptr and size of the block).
    Recycled,
    /// A block was returned to the cache by a free (for a block used on other streams:
    /// when it was freed, not when the other streams passed it).
    Freed,
    /// A segment was given back to the device (ptr and size of the segment).
    Released,
    /// The device (or a limit) refused a new segment; fired before the allocator retries, so
    /// a callback may free memory (ptr 0, size = bytes requested).
    AllocationFailed,
}

/// A callback: (ptr, size, event).
pub type AllocatorCallback = Arc<dyn Fn(usize, u64, AllocatorEvent) + Send + Sync>;

/// Handle for removing a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallbackId(pub u64);

/// A callback for every allocator: (device, ptr, size, event), with the same meaning and
/// timing as an allocator's own [`AllocatorCallback`].
pub type GlobalAllocatorCallback = Arc<dyn Fn(Device, usize, u64, AllocatorEvent) + Send + Sync>;

static CALLBACKS: RwLock<Vec<(CallbackId, GlobalAllocatorCallback)>> = RwLock::new(Vec::new());
static HAS_CALLBACKS: AtomicBool = AtomicBool::new(false);
static NEXT_CALLBACK: AtomicU64 = AtomicU64::new(1);

/// Register a callback that every caching allocator of the process calls, existing and
/// future ones, after its own callbacks (PyTorch's `REGISTER_MPS_ALLOCATOR_CALLBACK`).
/// Callbacks run on the thread that made the allocator call, with no allocator lock held.
pub fn add_allocator_callback(callback: GlobalAllocatorCallback) -> CallbackId {
    let id = CallbackId(NEXT_CALLBACK.fetch_add(1, Ordering::Relaxed));
    let mut callbacks = CALLBACKS.write();
    callbacks.push((id, callback));
    HAS_CALLBACKS.store(true, Ordering::Relaxed);
    id
}

/// Remove a global callback; false if it was not registered.
pub fn remove_allocator_callback(id: CallbackId) -> bool {
    let mut callbacks = CALLBACKS.write();
    let before = callbacks.len();
    callbacks.retain(|(i, _)| *i != id);
    HAS_CALLBACKS.store(!callbacks.is_empty(), Ordering::Relaxed);
    callbacks.len() != before
}

/// Whether any global callback is registered (one relaxed load, for allocators' fast paths).
#[inline]
pub(crate) fn has_allocator_callbacks() -> bool {
    HAS_CALLBACKS.load(Ordering::Relaxed)
}

/// Call every global callback (outside the lock, so a callback may register or remove
/// callbacks).
#[cold]
pub(crate) fn fire_allocator_callbacks(
    device: Device,
    ptr: usize,
    size: u64,
    event: AllocatorEvent,
) {
    if !has_allocator_callbacks() {
        return;
    }
    let callbacks: Vec<GlobalAllocatorCallback> = CALLBACKS
        .read()
        .iter()
        .map(|(_, c)| Arc::clone(c))
        .collect();
    for callback in callbacks {
        callback(device, ptr, size, event);
    }
}
