//! What waits for streams: the cross-stream extras of live blocks (`record_stream`,
//! `record_events`), pending frees (blocks freed while other streams' work may still use
//! them), and fences (events on the pool's own stream, and the safe tick they prove).
//!
//! The allocator records and asks the events; the pool keeps the tickets and applies the
//! answers, so a block's state, the pending list and the statistics change together.

use super::{BlockState, PoolState};
use crate::stream::Stream;

/// A freed block whose reuse waits for events on other streams.
pub(super) struct PendingFree {
    pub(super) block: u32,
    pub(super) tickets: Vec<u64>,
    /// Streams whose events are still to be recorded: the block was freed during a graph
    /// capture, when no event may be recorded (PyTorch defers them the same way). They are
    /// recorded by the first `process_pending` after the capture.
    pub(super) deferred: Vec<Stream>,
}

/// Cross-stream extras of a block (rare; kept out of `Block`).
#[derive(Default)]
pub struct Extras {
    /// Streams other than the owner that used the block (`record_stream`).
    pub stream_uses: Vec<Stream>,
    /// Events from `record_events`, waited on by `wait_for_events`.
    pub events: Vec<u64>,
}

/// Fences in flight per pool: a new one is recorded when memory to cover was last used after
/// the newest in flight (`CachingAllocator::cover`), so memory freed meanwhile is covered after
/// one lag of the device, not two; with this many in flight the newest is replaced.
pub const MAX_FENCES: usize = 8;

/// An event recorded on a pool's stream (see `PoolState::fences`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// The pool's tick when it was recorded: memory freed up to it is covered.
    pub tick: u64,
    pub ticket: u64,
    /// Pool tick at which it last answered "not yet" (0: not asked yet). The stream completes
    /// its fences in order and a pending answer stays true until the device moves on, so
    /// neither this fence nor a newer one is asked again at that tick, and housekeeping waits
    /// [`QUIET_TICKS`] more (`CachingAllocator::safe_tick`). Kept here rather than in
    /// `PoolState`, whose layout the fast paths feel.
    pub pending_at: u64,
}

/// After a fence answered "not yet", housekeeping that can wait (unmapping lent ranges) asks
/// this pool's fences again only once its tick (allocations and frees) has moved this far;
/// allocations that need memory now ask again at the next tick. 1: housekeeping too asks at
/// the next tick. Larger values save queries (16: gpt2_train's replay 1,830 driver calls
/// instead of 1,972) but unmap lent ranges later, and the replay of the real GPT-2 inference
/// run recorded on the H200 (`traces/recorded/`, its own completion markers) then predicted
/// 4.1% more peak memory than that run reached (8: Llama 1.1% more); with 1 all five
/// recordings are predicted within 1% (BENCHMARKS.md, "Driver calls (issue 10)").
pub const QUIET_TICKS: u64 = 1;

/// A pending free whose events have all completed (`PoolState::finish_pending`): the block
/// is back in the cache; its tickets are the caller's to release.
pub struct FinishedFree {
    pub tickets: Vec<u64>,
    pub addr: usize,
    /// Bytes the caller had asked for.
    pub requested: u64,
}

/// The fences a query asks, taken under the pool lock (`PoolState::fences_to_ask`); the
/// answers go back with `PoolState::apply_fence_answers`.
pub struct FenceProbe {
    /// The fences in flight when they were taken, oldest first.
    pub fences: Vec<Fence>,
    /// The first one worth asking: the oldest recorded at or after the tick wanted.
    pub first: usize,
    /// The pool's tick when they were taken.
    pub tick: u64,
}

impl PoolState {
    // ---- cross-stream extras of live blocks ------------------------------------------------

    /// Live block `block` is used by `stream` too (`record_stream`): its free waits for it.
    pub fn add_stream_use(&mut self, block: u32, stream: Stream) {
        let uses = &mut self.extras.entry(block).or_default().stream_uses;
        if !uses.contains(&stream) {
            uses.push(stream);
        }
        self.blocks[block as usize].has_extras = true;
    }

    /// An event recorded for live block `block` (`record_events`): its free waits for it.
    pub fn add_event(&mut self, block: u32, ticket: u64) {
        self.extras.entry(block).or_default().events.push(ticket);
        self.blocks[block as usize].has_extras = true;
    }

    /// Take the events recorded for live block `block` (`wait_for_events`: the caller waits
    /// for them and releases them); its other streams' uses stay.
    pub fn take_events(&mut self, block: u32) -> Vec<u64> {
        let Some(x) = self.extras.get_mut(&block) else {
            return Vec::new();
        };
        let tickets = std::mem::take(&mut x.events);
        if x.stream_uses.is_empty() {
            self.extras.remove(&block);
            self.blocks[block as usize].has_extras = false;
        }
        tickets
    }

    /// Take the extras of live block `block`, being freed: the caller records events on its
    /// streams, then finishes the free with [`free_waiting`](Self::free_waiting), or puts
    /// them back with [`restore_extras`](Self::restore_extras) if it cannot.
    pub fn take_extras(&mut self, block: u32) -> Extras {
        self.extras.remove(&block).unwrap_or_default()
    }

    /// Undo [`take_extras`](Self::take_extras): the block stays allocated, as it was.
    pub fn restore_extras(&mut self, block: u32, extras: Extras) {
        debug_assert!(self.blocks[block as usize].has_extras);
        self.extras.insert(block, extras);
    }

    // ---- pending frees ---------------------------------------------------------------------

    /// Whether a free waits for other streams' events.
    #[inline(always)]
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Frees waiting for other streams' events.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Free allocated block `block` (out of the live map, its extras taken), whose reuse waits
    /// for `tickets` and for events still to be recorded on `deferred` streams (frees during
    /// a capture): it becomes pending until
    /// [`finish_pending`](Self::finish_pending). With nothing to wait for it goes back to
    /// the cache at once.
    pub fn free_waiting(&mut self, block: u32, tickets: Vec<u64>, deferred: Vec<Stream>) {
        self.blocks[block as usize].has_extras = false;
        self.account_free(block);
        if tickets.is_empty() && deferred.is_empty() {
            self.release_to_cache(block);
            return;
        }
        let b = &mut self.blocks[block as usize];
        b.state = BlockState::Pending;
        let fig = &mut self.pending_figures[b.kind as usize];
        fig.blocks += 1;
        fig.bytes += b.size;
        self.pending.push(PendingFree {
            block,
            tickets,
            deferred,
        });
    }

    /// The pending frees: (block, the tickets it waits for).
    pub fn pending_tickets(&self) -> impl Iterator<Item = (u32, &[u64])> {
        self.pending.iter().map(|p| (p.block, p.tickets.as_slice()))
    }

    /// Record the events of frees made during a capture (none could be recorded then):
    /// `record` records one on a stream, `None` when it cannot (the caller waits instead).
    pub fn record_deferred(&mut self, mut record: impl FnMut(Stream) -> Option<u64>) {
        for p in self.pending.iter_mut().filter(|p| !p.deferred.is_empty()) {
            for s in std::mem::take(&mut p.deferred) {
                if let Some(t) = record(s) {
                    p.tickets.push(t);
                }
            }
        }
    }

    /// The events of pending free `block` have all completed: the block goes back to the
    /// cache. `None` if it is no longer pending.
    pub fn finish_pending(&mut self, block: u32) -> Option<FinishedFree> {
        let i = self.pending.iter().position(|p| p.block == block)?;
        let p = self.pending.swap_remove(i);
        let b = &self.blocks[block as usize];
        let (addr, requested) = (b.addr, b.requested);
        let fig = &mut self.pending_figures[b.kind as usize];
        fig.blocks -= 1;
        fig.bytes -= b.size;
        self.release_to_cache(block);
        Some(FinishedFree {
            tickets: p.tickets,
            addr,
            requested,
        })
    }

    // ---- fences ----------------------------------------------------------------------------

    /// The tick of the newest completed fence (0: none yet, unless a device-wide wait proved
    /// more).
    #[inline]
    pub fn safe_tick(&self) -> u64 {
        self.safe_tick
    }

    /// The safe tick, once something proved one.
    pub fn proven_safe_tick(&self) -> Option<u64> {
        (self.safe_tick > 0).then_some(self.safe_tick)
    }

    /// Without events (nothing runs behind the host), another pool took idle memory of this
    /// one (moved or released it).
    pub fn mark_robbed(&mut self) {
        self.robbed = true;
    }

    /// Whether another pool took this pool's idle memory since this pool last asked; the
    /// mark is cleared. A pool that was robbed creates what it lacks instead of taking
    /// another's idle memory in turn: two threads on two streams that free a block and ask
    /// for it again at once otherwise take each other's pages on every call, without end
    /// (16 threads on 16 streams of one allocator ran at 2-4x the time per call of 16
    /// allocators, BENCHMARKS.md, "Threads"). With events, other pools' memory moves only
    /// behind their fences, which such threads never record.
    pub fn take_robbed(&mut self) -> bool {
        std::mem::take(&mut self.robbed)
    }

    /// The device passed everything queued up to pool tick `tick` (a device-wide wait).
    pub fn raise_safe_tick(&mut self, tick: u64) {
        self.safe_tick = self.safe_tick.max(tick);
    }

    /// The newest fence in flight.
    pub fn newest_fence(&self) -> Option<&Fence> {
        self.fences.back()
    }

    /// The newest pool tick a fence covers: the newest one's in flight, else the safe tick.
    pub fn newest_covered(&self) -> u64 {
        self.fences.back().map_or(self.safe_tick, |f| f.tick)
    }

    /// A fence just recorded on the pool's stream (`ticket`), covering the pool's tick now.
    /// With [`MAX_FENCES`] in flight the newest is replaced: its ticket is returned for the
    /// caller to release, unless another thread may be asking it now (`asked`: it asks with
    /// the pool unlocked); then the ticket is kept until that thread is done
    /// ([`release_retired`](Self::release_retired)).
    pub fn add_fence(&mut self, ticket: u64, asked: bool) -> Option<u64> {
        let replaced = if self.fences.len() >= MAX_FENCES {
            self.fences.pop_back().map(|f| f.ticket)
        } else {
            None
        };
        self.fences.push_back(Fence {
            tick: self.tick,
            ticket,
            pending_at: 0,
        });
        match replaced {
            Some(t) if asked => {
                self.retired.push(t);
                None
            }
            replaced => replaced,
        }
    }

    /// The thread asking the fences is done: the tickets of fences replaced meanwhile go to
    /// `release`.
    pub fn release_retired(&mut self, release: impl FnMut(u64)) {
        self.retired.drain(..).for_each(release);
    }

    /// The fences worth asking for a safe tick of `want` (their tickets stay alive while the
    /// caller holds the pool's `fence_queries`, even if it unlocks the pool), or `None` when
    /// no answer can help:
    /// the safe tick already reaches `want`, no fence in flight covers it yet, or that fence
    /// (or an older one) said "not yet" less than `quiet` ticks ago (a fence that said "not
    /// yet" stands for every newer one).
    pub fn fences_to_ask(&self, want: u64, quiet: u64) -> Option<FenceProbe> {
        if self.safe_tick >= want {
            return None;
        }
        let first = self.fences.iter().position(|f| f.tick >= want)?;
        let asked = self
            .fences
            .iter()
            .take(first + 1)
            .map(|f| f.pending_at)
            .max();
        if asked.is_some_and(|at| at != 0 && self.tick < at + quiet) {
            return None;
        }
        Some(FenceProbe {
            fences: self.fences.iter().copied().collect(),
            first,
            tick: self.tick,
        })
    }

    /// The answers to `probe`: its fences up to `done` completed (they leave, their tickets
    /// go to `release`, and the safe tick reaches theirs), the one at `pending` has not (it
    /// is not asked again at the probe's tick). Fences are matched by tick and ticket: the
    /// pool was unlocked while they were asked, and another thread may have replaced the
    /// newest meanwhile (`add_fence`); a completed fence proves its tick all the same.
    pub fn apply_fence_answers(
        &mut self,
        probe: &FenceProbe,
        done: Option<usize>,
        pending: Option<usize>,
        mut release: impl FnMut(u64),
    ) {
        let same = |a: &Fence, b: &Fence| a.tick == b.tick && a.ticket == b.ticket;
        if let Some(p) = pending {
            let asked = &probe.fences[p];
            if let Some(f) = self.fences.iter_mut().find(|f| same(f, asked)) {
                f.pending_at = probe.tick;
            }
        }
        let Some(d) = done else { return };
        let completed = &probe.fences[..=d];
        while let Some(front) = self.fences.front() {
            if !completed.iter().any(|c| same(c, front)) {
                break;
            }
            let f = self.fences.pop_front().expect("a front fence");
            release(f.ticket);
        }
        for f in completed {
            self.safe_tick = self.safe_tick.max(f.tick);
        }
    }
}
