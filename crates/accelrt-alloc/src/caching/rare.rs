//! The rare conditions the fast paths leave to their one cold exit, one bit each in one word.
//!
//! `raw_alloc` and `raw_free` test this word (and the process-wide callback flag) once; any
//! bit set sends the call down the general path, which handles everything. The bits change
//! only on rare calls (an error deferred from a `Drop`, graph capture, history, callbacks,
//! shapes), never on the fast path.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// One bit per rare condition (see the constants).
pub(crate) struct RareFlags(AtomicU32);

impl RareFlags {
    /// An error from a call that could not return one (a `Drop`) waits for the next call.
    pub const DEFERRED: u32 = 1 << 0;
    /// Allocations are routed to private pools (graph capture, `MemPool`).
    pub const ROUTES: u32 = 1 << 1;
    /// Memory history is being recorded.
    pub const HISTORY: u32 = 1 << 2;
    /// This allocator has callbacks.
    pub const CALLBACKS: u32 = 1 << 3;
    /// Some live buffer has a shape attached.
    pub const SHAPES: u32 = 1 << 4;
    /// `debug_checks`: check every invariant after every call.
    pub const DEBUG: u32 = 1 << 5;

    pub fn new(bits: u32) -> Self {
        RareFlags(AtomicU32::new(bits))
    }

    /// Whether no rare condition holds.
    #[inline(always)]
    pub fn none(&self) -> bool {
        self.0.load(Relaxed) == 0
    }

    #[inline]
    pub fn has(&self, bit: u32) -> bool {
        self.0.load(Relaxed) & bit != 0
    }

    /// Set or clear `bit`. Callers that must keep a bit in step with some state (the routes,
    /// the shapes) change both under that state's lock.
    #[cold]
    pub fn set(&self, bit: u32, on: bool) {
        if on {
            self.0.fetch_or(bit, Relaxed);
        } else {
            self.0.fetch_and(!bit, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RareFlags;

    #[test]
    fn bits_are_independent() {
        let f = RareFlags::new(0);
        assert!(f.none());
        f.set(RareFlags::HISTORY, true);
        f.set(RareFlags::SHAPES, true);
        assert!(!f.none() && f.has(RareFlags::HISTORY) && f.has(RareFlags::SHAPES));
        f.set(RareFlags::HISTORY, false);
        assert!(!f.has(RareFlags::HISTORY) && f.has(RareFlags::SHAPES));
        f.set(RareFlags::SHAPES, false);
        assert!(f.none());
        assert!(!RareFlags::new(RareFlags::DEBUG).none());
    }
}
