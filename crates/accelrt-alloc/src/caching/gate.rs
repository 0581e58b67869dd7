//! The check gate of `debug_checks` (see `check.rs`): public calls that change the
//! allocator's structure share it, the invariant check after each holds it alone, so the
//! check never sees a call on another thread half done.

use std::cell::RefCell;

use parking_lot::RwLock;

use super::CachingAllocator;

/// Calls share it, the checker takes it alone (only with `debug_checks`).
#[derive(Debug, Default)]
pub(crate) struct CheckGate(RwLock<()>);

thread_local! {
    /// The allocators (by address) whose gate this thread holds shared, innermost last: a
    /// call made from inside another (a callback freeing memory, a free inside an
    /// allocation) runs under the outer call's share, and only the outermost call checks.
    static HELD: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// Takes this thread's mark of holding `id`'s gate off again, also when the call unwinds.
struct Held(usize);

impl Held {
    fn mark(id: usize) -> Held {
        HELD.with(|h| h.borrow_mut().push(id));
        Held(id)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|&x| x == self.0) {
                h.remove(i);
            }
        });
    }
}

impl CachingAllocator {
    fn gate_id(&self) -> usize {
        self as *const CachingAllocator as usize
    }

    /// Whether this thread is inside a gated call of this allocator.
    fn holds_gate(&self) -> bool {
        let id = self.gate_id();
        HELD.with(|h| h.borrow().contains(&id))
    }

    /// Whether a call entering now must take the gate: `debug_checks` is on and this thread
    /// is not already inside a gated call of this allocator.
    #[inline]
    pub(crate) fn outside_gate(&self) -> bool {
        self.config().debug_checks && !self.holds_gate()
    }

    /// Run the public call `what` (`call`) so that the invariant checker never sees it half
    /// done, and check every invariant after it: with `debug_checks` only (otherwise just
    /// `call()`). A call nested in another of the same allocator runs as it is.
    #[inline]
    pub(crate) fn gated<R>(&self, what: &'static str, call: impl FnOnce() -> R) -> R {
        if !self.outside_gate() {
            return call();
        }
        self.gated_and_checked(what, call)
    }

    #[cold]
    #[inline(never)]
    fn gated_and_checked<R>(&self, what: &'static str, call: impl FnOnce() -> R) -> R {
        let result = {
            // Shared with other calls. A new call queues behind a waiting checker, but it takes
            // the gate before any pool lock and the checker holds none while it waits, so
            // neither can hold up what the other needs.
            let _shared = self.gate.0.read();
            let _held = Held::mark(self.gate_id());
            call()
        };
        // A thread inside another allocator's call (a callback) leaves the check to the
        // outermost call, so that two threads never wait on each other's gates.
        if HELD.with(|h| h.borrow().is_empty()) {
            let _alone = self.gate.0.write();
            if let Err(e) = self.check_now() {
                panic!("accelrt allocator invariant broken after {what}: {e}");
            }
        }
        result
    }

    /// Run `f` with no gated call in flight on any thread and none starting (inside one of
    /// this allocator's own calls, e.g. from a callback, `f` runs at once and sees the state
    /// as that call left it).
    pub(crate) fn holding_gate_alone<R>(&self, f: impl FnOnce() -> R) -> R {
        let _alone = (!self.holds_gate()).then(|| self.gate.0.write());
        f()
    }
}
