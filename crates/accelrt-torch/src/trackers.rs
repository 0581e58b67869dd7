//! Segment trackers (PyTorch's `attachAllocatorTraceTracker`, which NCCL registration listens
//! to): the callbacks `accelrt_torch_add_segment_tracker` (in `full.rs`) adds, and each
//! device's allocator hooked once to call them, when it is created (`state.rs`) or when the
//! first tracker arrives.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use accelrt::alloc::{AllocatorEvent, CachingAllocator};
use parking_lot::Mutex;

/// A segment event callback: (ctx, action, device, address, size); the action is a history
/// action's number: 3 segment_alloc, 4 segment_free, 5 segment_map.
pub type TrackerFn = Option<
    unsafe extern "C" fn(ctx: *mut c_void, action: c_int, device: c_int, addr: u64, size: u64),
>;

struct Tracker {
    f: unsafe extern "C" fn(*mut c_void, c_int, c_int, u64, u64),
    ctx: *mut c_void,
}

// SAFETY: the header's contract for accelrt_torch_add_segment_tracker: the function may be
// called from any thread, concurrently, for the life of the process, with `ctx`.
unsafe impl Send for Tracker {}
// SAFETY: as above.
unsafe impl Sync for Tracker {}

static TRACKERS: Mutex<Vec<Arc<Tracker>>> = Mutex::new(Vec::new());
/// Devices whose allocator already forwards its events to [`TRACKERS`].
static HOOKED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Add a tracker (`accelrt_torch_add_segment_tracker`); allocators are hooked by the caller.
pub(crate) fn add(f: unsafe extern "C" fn(*mut c_void, c_int, c_int, u64, u64), ctx: *mut c_void) {
    TRACKERS.lock().push(Arc::new(Tracker { f, ctx }));
}

/// Make `a` (device `d`) forward its segment events to the trackers, once.
pub(crate) fn hook_allocator(d: u32, a: &CachingAllocator) {
    if TRACKERS.lock().is_empty() {
        return;
    }
    let mut hooked = HOOKED.lock();
    if hooked.contains(&d) {
        return;
    }
    hooked.push(d);
    let expandable = a.is_expandable();
    a.add_callback(Arc::new(
        move |ptr: usize, size: u64, event: AllocatorEvent| {
            let action = match event {
                // In expandable mode a new range of memory is pages mapped into a segment.
                AllocatorEvent::Allocated if expandable => 5,
                AllocatorEvent::Allocated => 3,
                AllocatorEvent::Released => 4,
                _ => return,
            };
            let trackers: Vec<Arc<Tracker>> = TRACKERS.lock().clone();
            for t in trackers {
                // SAFETY: the header's contract (see the Send impl); the function must not unwind.
                unsafe { (t.f)(t.ctx, action, d as c_int, ptr as u64, size) };
            }
        },
    ));
}
