//! The lock of one stream's pool: one atomic read-modify-write to take it, a plain store to
//! give it back.
//!
//! A pool is locked by every allocation and free on its stream, and almost never by two
//! threads at once (one stream is usually driven by one thread; another thread takes the lock
//! for a cross-stream free, a statistics read or a slow path). `parking_lot::Mutex` spends a
//! second atomic read-modify-write on unlock, to learn whether a thread sleeps on the lock;
//! on the cached alloc+free pair the locked instructions were about half of the time (perf on
//! `accelrt bench`, `BENCHMARKS.md`). This lock lets no thread sleep on it, so unlocking tells
//! no one: a waiting thread spins briefly, then yields its core, then naps between attempts.
//! That suits a lock held for short, bounded pieces of work: pool locks are not held across
//! driver calls or event queries (those run with the pool unlocked, see `process_pending` and
//! `safe_tick`).
//!
//! The protocol is generic over the flag so that the loom model (`cargo test` with
//! `--cfg accelrt_loom`) runs this code on loom's atomics.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::Duration;

/// A pool's lock (see the module docs).
pub(crate) type PoolMutex<T> = lock_api::Mutex<RawPoolLock, T>;
/// The guard of a [`PoolMutex`].
pub(crate) type PoolGuard<'a, T> = lock_api::MutexGuard<'a, RawPoolLock, T>;

/// Spins (each a `spin_loop` hint) before a waiting thread yields its core.
const SPINS: u32 = 64;
/// Yields before a waiting thread naps between attempts.
const YIELDS: u32 = 16;
/// The nap: long enough to give the core away, short next to a slow path's driver calls.
const NAP: Duration = Duration::from_micros(20);

/// The atomic flag the protocol runs on (std's, or loom's in the model).
trait Flag {
    fn try_set(&self) -> bool;
    fn is_set(&self) -> bool;
    fn clear(&self);
    /// Wait a little before looking at the flag again (`attempt` counts the waits so far).
    fn back_off(attempt: u32);
}

impl Flag for AtomicBool {
    #[inline(always)]
    fn try_set(&self) -> bool {
        self.compare_exchange(false, true, Acquire, Relaxed).is_ok()
    }
    #[inline(always)]
    fn is_set(&self) -> bool {
        self.load(Relaxed)
    }
    #[inline(always)]
    fn clear(&self) {
        self.store(false, Release)
    }
    fn back_off(attempt: u32) {
        if attempt < SPINS {
            std::hint::spin_loop();
        } else if attempt < SPINS + YIELDS {
            std::thread::yield_now();
        } else {
            std::thread::sleep(NAP);
        }
    }
}

/// Take the lock: one compare-exchange when it is free.
#[inline(always)]
fn acquire<F: Flag>(flag: &F) {
    if !flag.try_set() {
        acquire_contended(flag);
    }
}

#[cold]
#[inline(never)]
fn acquire_contended<F: Flag>(flag: &F) {
    let mut attempt = 0u32;
    loop {
        // Wait until the lock looks free before trying again: reading leaves the cache line
        // shared with the holder instead of taking it away.
        while flag.is_set() {
            F::back_off(attempt);
            attempt = attempt.saturating_add(1);
        }
        if flag.try_set() {
            return;
        }
    }
}

pub(crate) struct RawPoolLock {
    locked: AtomicBool,
}

// SAFETY: `lock` returns only after this thread's compare-exchange moved `locked` from false
// to true with Acquire ordering, so at most one thread holds the lock at a time; `unlock`
// (called only by the holder, as `lock_api` requires of its callers) stores false with
// Release ordering, so everything the holder wrote happens-before the next holder's Acquire.
// The guard may move to another thread (`GuardSend`): unlocking is a plain store, valid from
// any thread.
unsafe impl lock_api::RawMutex for RawPoolLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = RawPoolLock {
        locked: AtomicBool::new(false),
    };

    type GuardMarker = lock_api::GuardSend;

    #[inline(always)]
    fn lock(&self) {
        acquire(&self.locked);
    }

    #[inline(always)]
    fn try_lock(&self) -> bool {
        self.locked.try_set()
    }

    #[inline(always)]
    unsafe fn unlock(&self) {
        self.locked.clear();
    }

    #[inline]
    fn is_locked(&self) -> bool {
        self.locked.is_set()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn threads_hammering_one_lock_lose_no_update() {
        // Eight threads (more than this machine's cores, so holders get preempted and waiters
        // reach every stage: spin, yield, nap) add to a counter behind the lock; a lock that
        // let two in at once would lose increments of the non-atomic read-modify-write.
        let m = Arc::new(PoolMutex::new(0u64));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        let mut g = m.lock();
                        let v = *g;
                        std::hint::black_box(&mut *g);
                        *g = v + 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*m.lock(), 8 * 20_000);
    }

    #[test]
    fn try_lock_and_is_locked_see_the_holder() {
        let m = PoolMutex::new(());
        let g = m.lock();
        assert!(m.is_locked());
        assert!(m.try_lock().is_none());
        drop(g);
        assert!(!m.is_locked());
        assert!(m.try_lock().is_some());
    }
}

/// The lock protocol above on loom's atomics, every interleaving: mutual exclusion, and the
/// holder's writes visible to the next holder (a Relaxed unlock fails this model).
#[cfg(all(test, accelrt_loom))]
mod loom_model {
    use super::{acquire, Flag};
    use loom::cell::UnsafeCell;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;
    use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

    impl Flag for AtomicBool {
        fn try_set(&self) -> bool {
            self.compare_exchange(false, true, Acquire, Relaxed).is_ok()
        }
        fn is_set(&self) -> bool {
            self.load(Relaxed)
        }
        fn clear(&self) {
            self.store(false, Release)
        }
        fn back_off(_attempt: u32) {
            loom::thread::yield_now();
        }
    }

    struct Locked {
        flag: AtomicBool,
        value: UnsafeCell<u32>,
    }
    // SAFETY: `value` is only touched by the thread that holds `flag` (the model checks it).
    unsafe impl Sync for Locked {}

    #[test]
    fn loom_pool_lock_excludes_and_publishes() {
        loom::model(|| {
            let l = Arc::new(Locked {
                flag: AtomicBool::new(false),
                value: UnsafeCell::new(0),
            });
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let l = Arc::clone(&l);
                    loom::thread::spawn(move || {
                        acquire(&l.flag);
                        // SAFETY: the lock is held; loom reports any racing access.
                        l.value.with_mut(|v| unsafe { *v += 1 });
                        l.flag.clear();
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            // SAFETY: both threads have been joined.
            assert_eq!(l.value.with(|v| unsafe { *v }), 2);
        });
    }
}
