//! Moves of idle chunks between blocks and pools (never waiting for the GPU), the lent
//! ranges they leave and their reclaim behind fences, and giving idle and spare chunks back.
//! The policy (when to move) is in `expandable.rs`.

use super::expandable::*;
use super::fences::Need;
use super::*;
use crate::pool::{PoolState, LENT, NO_CHUNK};

impl CachingAllocator {
    /// Move idle chunks to fill `want` slots (plus `room`): from the requesting pool first,
    /// then, as far as `reach` allows, from the others. Returns what was taken, lent at its
    /// old place.
    pub(super) fn move_idle(
        &self,
        vm: &mut VmState,
        pool_idx: u32,
        pool: &StreamPool,
        want: usize,
        room: usize,
        reach: Reach,
    ) -> Placement {
        let mut got: Placement = Vec::new();
        let mut remaining = want;
        // The requesting pool: free blocks are used by nothing but work queued on its own
        // stream, and later work on that stream runs after it.
        {
            let mut st = pool.state.lock();
            let (taken, left) = if gives(reach, &st) {
                st.lend_idle(&mut vm.chunks, u64::MAX, remaining, room)
            } else {
                (Vec::new(), remaining)
            };
            self.note_lent(&st, pool.stream.index, &taken);
            // The last use of the ranges just lent: one fence recorded after it covers them
            // all (and one already in flight may).
            let lent = st.lent_ranges();
            let last_use = lent[lent.len() - taken.len()..]
                .iter()
                .map(|l| l.tick)
                .max();
            got.extend(taken);
            remaining = left;
            drop(st);
            if let Some(tick) = last_use {
                // The old ranges are unmapped once a fence after their last use completes.
                self.cover(pool, tick);
            }
        }
        // Other pools: only memory freed before a fence recorded on their own stream (never
        // record on another pool's stream: it may be an external stream its owner destroyed).
        if remaining > 0 && reach != Reach::OwnPool {
            for (qi, q) in self.pools_with_index() {
                if qi as u32 == pool_idx || q.private || remaining == 0 {
                    continue;
                }
                let mut st = q.state.lock();
                if !gives(reach, &st) {
                    continue;
                }
                // (since, the fence to wait for on the device)
                let (since, wait) = if reach == Reach::All || self.events.is_none() {
                    (u64::MAX, None)
                } else if let Some(f) = st.newest_fence() {
                    (f.tick, Some(f.ticket))
                } else {
                    (st.safe_tick(), None)
                };
                let (since, wait) = if st.safe_tick() >= since {
                    (st.safe_tick(), None) // already passed: no wait
                } else {
                    (since, wait)
                };
                if since == 0 {
                    continue;
                }
                let (taken, left) = st.lend_idle(&mut vm.chunks, since, remaining, room);
                if taken.is_empty() {
                    continue;
                }
                if let Some(ticket) = wait {
                    // Order the requesting stream after that fence, on the device (the ticket
                    // stays alive: the pool's lock is held). Were the wait refused, the chunks
                    // stay spare until their old range is unmapped.
                    let events = self.events.as_ref().expect("a fence needs events");
                    self.driver.event_wait.fetch_add(1, Relaxed);
                    if events.wait(pool.stream, ticket).is_err() {
                        taken.iter().for_each(|&(id, _)| vm.chunks.push_spare(id));
                        continue;
                    }
                }
                if self.events.is_none() {
                    st.mark_robbed();
                }
                self.note_lent(&st, q.stream.index, &taken);
                got.extend(taken);
                remaining = left;
            }
        }
        if !got.is_empty() {
            self.counters.num_page_steals.fetch_add(1, Relaxed);
            let pages: usize = got.iter().map(|&(_, p)| p).sum();
            self.counters
                .num_pages_remapped
                .fetch_add(pages as u64, Relaxed);
        }
        got
    }

    /// Release idle chunks (of the requesting pool first) whose work has passed, holding at
    /// least `bytes`; other pools' too unless `reach` is the requesting pool's only. Never
    /// waits: only memory behind a completed fence goes.
    pub(super) fn release_idle_bytes(
        &self,
        vm: &mut VmState,
        pool_idx: u32,
        pool: &StreamPool,
        bytes: u64,
        reach: Reach,
    ) {
        let page = self.page_bytes();
        let mut left = bytes.div_ceil(page) as usize;
        let order = std::iter::once((pool_idx as usize, pool)).chain(
            self.pools_with_index()
                .filter(|&(i, p)| reach != Reach::OwnPool && i as u32 != pool_idx && !p.private),
        );
        let mut freed = false;
        // The newest last use of the requester's idle chunks too recent to go.
        let mut too_recent: Option<u64> = None;
        for (qi, q) in order {
            if left == 0 {
                break;
            }
            // Ask the pool's fences only if an answer could free something: idle chunks last
            // used after what completed fences already proved.
            let (safe, ages) = {
                let mut st = q.state.lock();
                if !gives(reach, &st) {
                    continue;
                }
                let safe = st.safe_tick();
                (safe, st.idle_ages_after(&vm.chunks, safe))
            };
            let since = match ages {
                Some((oldest, newest)) => {
                    let since = self.safe_tick(q, oldest, Need::Now);
                    if qi as u32 == pool_idx && since.is_none_or(|s| s < newest) {
                        too_recent = Some(newest);
                    }
                    since
                }
                None => (safe > 0).then_some(safe),
            };
            let Some(since) = since else {
                continue;
            };
            let taken = {
                let mut st = q.state.lock();
                let taken = st.take_idle_pages(&vm.chunks, since, left);
                if !taken.is_empty() && self.events.is_none() && qi as u32 != pool_idx {
                    st.mark_robbed();
                }
                taken
            };
            if taken.is_empty() {
                continue;
            }
            let mut ranges: Vec<(usize, usize)> = Vec::new();
            let mut sorted: Vec<(usize, usize)> = taken.iter().map(|&(a, n, _)| (a, n)).collect();
            sorted.sort_unstable();
            for (addr, len) in sorted {
                match ranges.last_mut() {
                    Some((a, n)) if *a + *n == addr => *n += len,
                    _ => ranges.push((addr, len)),
                }
            }
            self.unmap_noted(&ranges, q.stream.index);
            for (_, len, id) in taken {
                left = left.saturating_sub(len / page as usize);
                self.release_chunk(vm, id);
            }
            freed = true;
        }
        if freed {
            self.counters.num_page_steals.fetch_add(1, Relaxed);
        }
        if let (true, Some(tick)) = (left > 0, too_recent) {
            // Idle memory too recent to give back: have a fence cover it for next time.
            self.cover(pool, tick);
        }
    }

    /// History for chunks that just left their place: their memory is no longer reserved
    /// there (it is counted where it is mapped next).
    pub(super) fn note_lent(&self, st: &PoolState, stream: u32, taken: &[(u32, usize)]) {
        if !self.history.enabled() || taken.is_empty() {
            return;
        }
        let page = self.page_bytes();
        let lent = st.lent_ranges();
        for l in &lent[lent.len() - taken.len()..] {
            let addr = (l.seg_base as u64) + l.slot as u64 * page;
            self.history.record(
                TraceAction::SegmentUnmap,
                addr,
                l.pages as u64 * page,
                stream,
            );
        }
    }

    /// Unmap lent ranges whose work has passed: every pool's, by its completed fences (a new
    /// fence is recorded only for `requester`, whose stream is alive). Never waits.
    pub(super) fn reclaim_lent(&self, vm: &mut VmState, requester: Option<u32>) {
        for (pi, pool) in self.pools_with_index() {
            let is_requester = requester == Some(pi as u32);
            if pool.private {
                continue;
            }
            let ages = {
                let st = pool.state.lock();
                let ticks = st.lent_ranges().iter().map(|l| l.tick);
                ticks.clone().min().zip(ticks.max())
            };
            let Some((oldest_lent, newest_lent)) = ages else {
                continue;
            };
            if is_requester {
                // A new fence only on the requester's stream (alive), and only if no fence in
                // flight covers the lent ranges yet.
                self.cover(pool, newest_lent);
            }
            // Lent ranges hold no memory of their own: no hurry to ask (`Need::Later`).
            let Some(safe) = self.safe_tick(pool, oldest_lent, Need::Later) else {
                continue;
            };
            let (ranges, chunk_ids) = pool.state.lock().reclaim_lent(safe);
            self.unmap_ranges(&ranges);
            for id in chunk_ids {
                vm.chunks.get_mut(id).lent -= 1;
            }
        }
    }

    /// Unmap idle memory given back to the device, and say so in the history.
    fn unmap_noted(&self, ranges: &[(usize, usize)], stream: u32) {
        self.unmap_ranges(ranges);
        if self.history.enabled() {
            for &(addr, len) in ranges {
                self.history
                    .record(TraceAction::SegmentUnmap, addr as u64, len as u64, stream);
            }
        }
    }

    pub(super) fn unmap_ranges(&self, ranges: &[(usize, usize)]) {
        for &(addr, len) in ranges {
            // SAFETY: each range is a run of whole chunk mappings that were lent or idle, no
            // longer in any page table as a home, and the work that used it has completed (a
            // completed fence, or a device-wide synchronize); `vm` is held, so nothing maps
            // there meanwhile.
            self.timed_vm_call(|| unsafe { self.vm().unmap(addr, len) });
            self.driver.unmap.fetch_add(1, Relaxed);
        }
    }

    /// Wait until the device has finished everything queued so far, and let every pool know
    /// (its safe tick becomes its tick from before the wait).
    pub(super) fn fence_all_pools(&self) -> Result<()> {
        let Some(events) = &self.events else {
            return Ok(());
        };
        if self.capturing() {
            return Err(Error::InvalidArgument(format!(
                "cannot wait for {} while a graph capture routes allocations to a private pool \
                 (a device-wide wait would invalidate the capture)",
                self.device
            )));
        }
        let ticks: Vec<(usize, u64)> = self
            .pools_with_index()
            .map(|(i, p)| (i, p.state.lock().tick()))
            .collect();
        self.driver.synchronize.fetch_add(1, Relaxed);
        events.synchronize_device(self.device.index)?;
        for (i, tick) in ticks {
            let pool = self.pool_at(i as u32);
            pool.state.lock().raise_safe_tick(tick);
        }
        Ok(())
    }

    /// Give every idle chunk of `pool` back to the device, and whole free ranges too. The
    /// caller has waited for the device (`fence_all_pools`).
    pub(super) fn release_idle_pages(&self, pool: &StreamPool, pool_idx: u32) {
        let mut vm = self.vm_state.lock();
        self.reclaim_lent(&mut vm, Some(pool_idx));
        let taken = pool.state.lock().take_idle_for_release(&vm.chunks);
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        for &(addr, len, _) in &taken {
            match ranges.last_mut() {
                Some((a, n)) if *a + *n == addr => *n += len,
                _ => ranges.push((addr, len)),
            }
        }
        ranges.sort_unstable();
        self.unmap_noted(&ranges, pool.stream.index);
        for (_, _, id) in taken {
            if vm.chunks.get(id).lent == 0 {
                self.release_chunk(&mut vm, id);
            } else {
                vm.chunks.push_spare(id);
            }
        }
        let empty: Vec<usize> = {
            let st = pool.state.lock();
            st.segments()
                .iter()
                .filter(|s| {
                    s.vm.as_ref()
                        .is_some_and(|t| t.mapped == 0 && t.lent_slots == 0)
                })
                .map(|s| s.base)
                .collect()
        };
        drop(vm);
        for base in empty {
            let seg = pool.state.lock().remove_segment(base, u64::MAX);
            if let Some(seg) = seg {
                self.give_back(seg, pool.stream.index);
            }
        }
    }

    /// Release every spare chunk without an old mapping left.
    pub(super) fn release_spare_pages(&self) {
        let mut vm = self.vm_state.lock();
        for id in vm.chunks.take_all_spare() {
            if vm.chunks.get(id).lent == 0 {
                self.release_chunk(&mut vm, id);
            } else {
                vm.chunks.push_spare(id);
            }
        }
    }

    /// The unmapped and lent ranges of an expandable segment, for snapshots (lent ranges hold
    /// no memory of their own).
    pub(super) fn unmapped_ranges(st: &PoolState, seg_pos: usize) -> Vec<(u64, u64)> {
        let seg = &st.segments()[seg_pos];
        let Some(table) = &seg.vm else {
            return Vec::new();
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        let p = table.page_size;
        let mut push = |addr: u64, len: u64| match out.last_mut() {
            Some((a, n)) if *a + *n == addr => *n += len,
            _ => out.push((addr, len)),
        };
        for slot in 0..table.stored() {
            let s = table.get(slot);
            if s == NO_CHUNK || s == LENT {
                push(seg.base as u64 + slot as u64 * p, p);
            }
        }
        let (stored, len) = (table.stored() as u64, table.len() as u64);
        if stored < len {
            push(seg.base as u64 + stored * p, (len - stored) * p);
        }
        out
    }

    /// Unmap every range and release every chunk, as the allocator is dropped (its streams
    /// were synchronized). Address ranges are given back by the caller.
    pub(super) fn drop_vm(&self, segments: &[crate::pool::Segment]) {
        let mut vm = self.vm_state.lock();
        let page = self.page_bytes() as usize;
        for seg in segments {
            let Some(table) = &seg.vm else { continue };
            let mut ranges: Vec<(usize, usize)> = Vec::new();
            for slot in 0..table.stored() {
                if table.get(slot) == NO_CHUNK {
                    continue;
                }
                let addr = seg.base + slot * page;
                match ranges.last_mut() {
                    Some((a, n)) if *a + *n == addr => *n += page,
                    _ => ranges.push((addr, page)),
                }
            }
            // SAFETY: the allocator is being dropped: no block of it can be used any more (a
            // `Buffer` borrows the allocator), and its streams were synchronized; each range
            // is covered by whole mappings (homes and lent ranges).
            ranges
                .iter()
                .for_each(|&(a, n)| unsafe { self.vm().unmap(a, n) });
        }
        let ids: Vec<u32> = vm.chunks.live().map(|(id, _)| id).collect();
        for id in ids {
            vm.chunks.get_mut(id).lent = 0;
            self.release_chunk(&mut vm, id);
        }
        for seg in segments.iter().filter(|s| s.vm.is_some()) {
            // SAFETY: every mapping of the range was unmapped above; it came from `reserve`.
            unsafe { self.vm().unreserve(seg.base, seg.size as usize) };
        }
    }
}

/// Whether a pool (its state `st`) gives idle memory to a move or a release reaching `reach`:
/// only once its first cycle is over, unless the device is full (`Reach::All`). Before that,
/// what a pool frees is about to be taken back where it lies (`PoolState::recycling`).
fn gives(reach: Reach, st: &PoolState) -> bool {
    reach == Reach::All || st.recycling()
}
