//! Errors that happened where none could be returned (a `Drop`, a callback, a host task on a
//! stream's worker), kept for the next call that can return one: cudarc's rule. One type for
//! the allocator (failed frees of dropped buffers), CUDA contexts (failed releases, callback
//! errors) and host streams (panicking tasks).

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::error::AllocError;

/// An error [`Deferred`] can keep: its words, and for a failed driver call its message
/// alone and its result code (the allocator's [`AllocError`], `accelrt`'s device error).
pub trait KeptError: std::fmt::Display {
    /// `(message, code)` when this is a failed driver call.
    fn driver_parts(&self) -> Option<(&str, Option<i32>)>;
}

impl KeptError for AllocError {
    fn driver_parts(&self) -> Option<(&str, Option<i32>)> {
        match self {
            AllocError::Driver { message, code, .. } => Some((message, *code)),
            _ => None,
        }
    }
}

/// At most this many errors are kept whole; later ones are only counted, so a stream of
/// failures costs bounded memory.
pub const KEPT_ERRORS: usize = 32;

/// Kept errors, reported once by [`Deferred::take`].
#[derive(Debug)]
pub struct Deferred<E = AllocError> {
    pending: AtomicBool,
    kept: Mutex<Kept<E>>,
}

impl<E> Default for Deferred<E> {
    fn default() -> Self {
        Deferred {
            pending: AtomicBool::new(false),
            kept: Mutex::new(Kept::default()),
        }
    }
}

#[derive(Debug)]
struct Kept<E> {
    errors: Vec<E>,
    /// Errors past [`KEPT_ERRORS`], counted only.
    dropped: usize,
}

impl<E> Default for Kept<E> {
    fn default() -> Self {
        Kept {
            errors: Vec::new(),
            dropped: 0,
        }
    }
}

/// What [`Deferred::take`] hands the caller to turn into one error: every error kept (oldest
/// first, at most [`KEPT_ERRORS`]) and how many more happened.
pub struct Taken<E = AllocError> {
    pub errors: Vec<E>,
    pub dropped: usize,
}

impl<E: KeptError> Taken<E> {
    /// How many errors happened in all.
    pub fn count(&self) -> usize {
        self.errors.len() + self.dropped
    }

    /// The errors' words, `; `-separated, with the count of those not kept.
    pub fn joined(&self) -> String {
        self.join(|e| e.to_string())
    }

    /// The same, a driver error by its message alone (for callers whose report names the
    /// call, as a stream's "host task" errors do).
    pub fn joined_messages(&self) -> String {
        self.join(|e| match e.driver_parts() {
            Some((message, _)) => message.to_string(),
            None => e.to_string(),
        })
    }

    fn join(&self, words_of: impl Fn(&E) -> String) -> String {
        let mut words: Vec<String> = self.errors.iter().map(words_of).collect();
        if self.dropped > 0 {
            words.push(format!("and {} more", self.dropped));
        }
        words.join("; ")
    }

    /// The result code of the first driver error that has one.
    pub fn code(&self) -> Option<i32> {
        self.errors
            .iter()
            .find_map(|e| e.driver_parts().and_then(|(_, code)| code))
    }
}

impl<E> Deferred<E> {
    /// Keep `error` for the next call.
    #[cold]
    pub fn keep(&self, error: E) {
        let mut kept = self.kept.lock();
        if kept.errors.len() < KEPT_ERRORS {
            kept.errors.push(error);
        } else {
            kept.dropped += 1;
        }
        self.pending.store(true, Ordering::Release);
    }

    /// Whether an error is waiting (one atomic load).
    #[inline]
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// `Err` made by `report` from every kept error (each reported once), else `Ok`. One
    /// atomic load when nothing is kept.
    #[inline]
    pub fn take(&self, report: impl FnOnce(Taken<E>) -> E) -> Result<(), E> {
        if !self.is_pending() {
            return Ok(());
        }
        self.take_slow(report)
    }

    #[cold]
    fn take_slow(&self, report: impl FnOnce(Taken<E>) -> E) -> Result<(), E> {
        let kept = std::mem::take(&mut *self.kept.lock());
        self.pending.store(false, Ordering::Release);
        if kept.errors.is_empty() && kept.dropped == 0 {
            return Ok(()); // another caller took them between the load and the lock
        }
        Err(report(Taken {
            errors: kept.errors,
            dropped: kept.dropped,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver(message: &str, code: Option<i32>) -> AllocError {
        AllocError::Driver {
            call: "x",
            code,
            message: message.into(),
        }
    }

    #[test]
    fn errors_are_reported_once_in_order_and_bounded() {
        let d = Deferred::default();
        assert!(d.take(|_| unreachable!()).is_ok());
        d.keep(driver("first", None));
        d.keep(driver("second", Some(700)));
        let err = d
            .take(|t| {
                assert_eq!((t.count(), t.code()), (2, Some(700)));
                driver(&t.joined_messages(), t.code())
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "x failed: first; second");
        d.keep(driver("third", None));
        let err = d.take(|t| driver(&t.joined(), None)).unwrap_err();
        assert_eq!(err.to_string(), "x failed: x failed: third");
        assert!(!d.is_pending() && d.take(|_| unreachable!()).is_ok());
        for i in 0..KEPT_ERRORS + 5 {
            d.keep(driver(&i.to_string(), None));
        }
        d.take(|t| {
            assert_eq!((t.errors.len(), t.dropped), (KEPT_ERRORS, 5));
            assert!(t.joined().ends_with("; and 5 more"));
            driver("", None)
        })
        .unwrap_err();
    }
}
