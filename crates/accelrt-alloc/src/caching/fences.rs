//! Fences: events recorded on a pool's own stream, proving which of the pool's freed memory
//! queued work no longer uses (its safe tick), asked as little as possible (`safe_tick`) and
//! recorded only when memory needs covering (`cover`). The pool keeps them
//! (`pool/waits.rs`).

use super::*;
use crate::pool::QUIET_TICKS;

impl CachingAllocator {
    /// The pool tick up to which memory freed in `pool` is no longer used by queued work, as
    /// proven by completed fences (events on the pool's own stream); `None` until one has
    /// completed (`u64::MAX` without an event source: there is no queued work). Never waits,
    /// never records.
    ///
    /// Fences are asked only when an answer can help: none while the safe tick already
    /// reaches `want` (the oldest use the caller would like to be past), and then the oldest
    /// fence recorded at or after `want` first. A stream passes its fences in order, so that
    /// one answer stands for every older fence; when it is done, the newest is asked (done:
    /// all are) and the first pending one found by halving. After a "not yet" that fence and
    /// the newer ones are not asked again at the same pool tick, and with [`Need::Later`] not
    /// before [`QUIET_TICKS`] more (`Fence::pending_at`).
    ///
    /// The events are asked with the pool's lock released, as `process_pending` asks pending
    /// frees': the fences to ask are taken under the lock, asked unlocked (a driver query
    /// takes microseconds; allocations and frees of the pool go on meanwhile), and the answers
    /// applied under the lock again to the fences still there. One thread at a time asks a
    /// pool's fences (`StreamPool::fence_queries`), so no ticket is released while another
    /// thread asks it: only the asking thread drains completed fences, and a fence `cover`
    /// replaces meanwhile keeps its ticket until the asking thread is done.
    pub(super) fn safe_tick(&self, pool: &StreamPool, want: u64, need: Need) -> Option<u64> {
        let Some(events) = self.events.as_ref() else {
            return Some(u64::MAX);
        };
        let asking = pool.fence_queries.lock();
        let mut st = pool.state.lock();
        let answer = self.ask_fences(&mut st, &**events, want, need);
        st.release_retired(|t| events.release(t));
        // Done asking, while the pool is still locked: a fence replaced from now on is
        // released at once (`cover`).
        drop(asking);
        answer
    }

    /// `safe_tick`'s question, with `fence_queries` held: `st` is unlocked while the events
    /// are asked, and locked again on return.
    fn ask_fences(
        &self,
        st: &mut PoolGuard<'_, PoolState>,
        events: &dyn StreamEvents,
        want: u64,
        need: Need,
    ) -> Option<u64> {
        if self.capturing() {
            return st.proven_safe_tick(); // no event query during a capture
        }
        let quiet = match need {
            Need::Now => 1,
            Need::Later => QUIET_TICKS,
        };
        let Some(probe) = st.fences_to_ask(want, quiet) else {
            return st.proven_safe_tick(); // nothing to ask, or asked too recently
        };
        // Every fence up to `done` completed, none from `pending` on did (`None`: a broken
        // stream).
        let answers = PoolGuard::unlocked(st, || {
            let ask = |ticket: u64| {
                self.driver.event_query.fetch_add(1, Relaxed);
                events.query(ticket)
            };
            let (first, len) = (probe.first, probe.fences.len());
            let (mut done, mut pending) = (None::<usize>, len);
            let mut at = first;
            loop {
                match ask(probe.fences[at].ticket) {
                    Ok(true) => done = Some(at),
                    Ok(false) => pending = at,
                    Err(_) => return None,
                }
                let lo = done.map_or(first, |d| d + 1);
                if lo >= pending {
                    break;
                }
                at = if pending == len && done == Some(first) {
                    len - 1 // the first useful one is done: perhaps all are
                } else {
                    lo + (pending - lo) / 2
                };
            }
            Some((done, (pending < len).then_some(pending)))
        });
        // A broken stream: leave its memory alone.
        let (done, pending) = answers?;
        st.apply_fence_answers(&probe, done, pending, |t| events.release(t));
        st.proven_safe_tick()
    }

    /// Make sure a fence on `pool`'s stream covers pool tick `tick` (the last use of memory
    /// the caller wants to reuse or give back later): one in flight recorded at or after it
    /// does; else record one at the stream's current position. With `MAX_FENCES` in flight
    /// the newest is replaced (the new one covers everything it did). Only for the pool being
    /// allocated on (its stream is alive; another pool's may be an external stream its owner
    /// destroyed). Asks nothing, never waits.
    pub(super) fn cover(&self, pool: &StreamPool, tick: u64) {
        let Some(events) = self.events.as_ref() else {
            return;
        };
        let mut st = pool.state.lock();
        if tick <= st.newest_covered() || self.capturing() {
            return;
        }
        self.driver.event_record.fetch_add(1, Relaxed);
        if let Ok(ticket) = events.record(pool.stream) {
            // A thread asking the fences (with the pool unlocked) may be asking the one
            // replaced: then its ticket is released when that thread is done.
            let asked = pool.fence_queries.is_locked();
            if let Some(replaced) = st.add_fence(ticket, asked) {
                events.release(replaced);
            }
        }
    }
}

/// Whether a fence's answer is needed now ([`CachingAllocator::safe_tick`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// Memory is needed now: without the answer a chunk or segment is created, or the
    /// allocation fails. Asked again at the next pool tick after a "not yet".
    Now,
    /// Housekeeping that can wait (unmapping lent ranges, which hold no memory of their own):
    /// asked again only [`QUIET_TICKS`] after a "not yet".
    Later,
}
