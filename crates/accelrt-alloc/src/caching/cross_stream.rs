//! Cross-stream use (`record_stream`, `record_events`), frees that wait for other streams
//! (pending frees, their events asked with the pool unlocked), and cache control.

use super::*;

impl CachingAllocator {
    // ---- cross-stream use ------------------------------------------------------------------

    /// Free a block that other streams used or that has recorded events: it goes back to the
    /// cache only once events recorded now on those streams have completed.
    #[cold]
    pub(super) fn free_with_extras(&self, st: &mut PoolState, block: u32) -> Result<()> {
        let extras = st.take_extras(block);
        let mut recorded = Vec::with_capacity(extras.stream_uses.len());
        if self.events.is_some() && self.capturing() && !extras.stream_uses.is_empty() {
            // No event may be recorded during a capture: the block waits, its streams' events
            // are recorded once the capture is over (`process_pending`).
            st.free_waiting(block, extras.events, extras.stream_uses);
            return Ok(());
        }
        if let Some(events) = &self.events {
            for s in &extras.stream_uses {
                self.driver.event_record.fetch_add(1, Relaxed);
                match events.record(*s) {
                    Ok(t) => recorded.push(t),
                    Err(e) => {
                        // Leave the block allocated, with its extras, exactly as it was.
                        recorded.into_iter().for_each(|t| events.release(t));
                        st.restore_extras(block, extras);
                        return Err(e);
                    }
                }
            }
        }
        let mut tickets = extras.events;
        tickets.extend(recorded);
        st.free_waiting(block, tickets, Vec::new());
        Ok(())
    }

    /// Run `f` on the live block at `ptr` under its pool's lock.
    pub(super) fn with_live_block<R>(
        &self,
        ptr: usize,
        what: &'static str,
        f: impl FnOnce(&mut PoolState, u32, &StreamPool) -> R,
    ) -> Result<R> {
        let pool = self
            .pages
            .lookup(ptr)
            .and_then(|i| self.pools[i as usize].get());
        let Some(pool) = pool else {
            return Err(Error::InvalidPointer { ptr, context: what });
        };
        let mut st = pool.state.lock();
        let Some(block) = st.live_block(ptr) else {
            return Err(Error::InvalidPointer { ptr, context: what });
        };
        Ok(f(&mut st, block, pool))
    }

    pub(super) fn require_events(&self, what: &'static str) -> Result<&Arc<dyn StreamEvents>> {
        self.events
            .as_ref()
            .ok_or(Error::unsupported(self.device.kind, what))
    }

    /// Mark `ptr` as used by `stream` too: when freed, it is not reused until the work
    /// queued on `stream` up to the free has completed.
    pub fn record_stream(&self, ptr: usize, stream: Stream) -> Result<()> {
        self.require_events("record_stream on an allocator without an event source")?;
        if stream.device != self.device {
            return Err(self.bad_stream(stream));
        }
        self.with_live_block(ptr, "record_stream", |st, block, pool| {
            if pool.stream != stream {
                st.add_stream_use(block, stream);
            }
        })
    }

    /// Record an event on `stream` for each buffer (MPS `recordEvents`): the buffers are in
    /// use there until [`CachingAllocator::wait_for_events`], and a free waits for them.
    pub fn record_events(&self, ptrs: &[usize], stream: Stream) -> Result<()> {
        let events =
            self.require_events("record_events on an allocator without an event source")?;
        if stream.device != self.device {
            return Err(self.bad_stream(stream));
        }
        for &ptr in ptrs {
            self.with_live_block(ptr, "record_events", |_, _, _| ())?;
        }
        for &ptr in ptrs {
            self.driver.event_record.fetch_add(1, Relaxed);
            let ticket = events.record(stream)?;
            let attached = self.with_live_block(ptr, "record_events", |st, block, _| {
                st.add_event(block, ticket);
            });
            if attached.is_err() {
                events.release(ticket); // freed meanwhile by another thread
            }
            attached?;
        }
        Ok(())
    }

    /// Block until the events recorded for these buffers have completed (MPS
    /// `waitForEvents`), then give back cached segments whose waits are over.
    pub fn wait_for_events(&self, ptrs: &[usize]) -> Result<()> {
        self.gated("wait_for_events", || {
            let events =
                self.require_events("wait_for_events on an allocator without an event source")?;
            for &ptr in ptrs {
                let tickets = self.with_live_block(ptr, "wait_for_events", |st, block, _| {
                    st.take_events(block)
                })?;
                for t in tickets {
                    self.driver.synchronize.fetch_add(1, Relaxed);
                    let r = events.synchronize(t);
                    events.release(t);
                    r?;
                }
            }
            self.free_inactive_buffers()
        })
    }

    // ---- pending frees ---------------------------------------------------------------------

    /// Finish frees whose events have all completed. The events are asked with the pool's
    /// lock released (`st` is unlocked meanwhile and locked again on return, so the caller
    /// must look at the pool afresh): a driver query takes microseconds, and allocations and
    /// frees of the pool on other threads go on meanwhile. One thread at a time asks for a
    /// pool (`StreamPool::pending_queries`), so a ticket is never released by one thread
    /// while another asks it.
    #[cold]
    pub(super) fn process_pending(&self, pool: &StreamPool, st: &mut PoolGuard<'_, PoolState>) {
        let Some(events) = &self.events else { return };
        if !st.has_pending() || self.capturing() {
            return; // no event queries during a capture: the frees wait for its end
        }
        let stream = pool.stream.index;
        PoolGuard::unlocked(st, || {
            let _asking = pool.pending_queries.lock();
            let asked: Vec<(u32, Vec<u64>)> = {
                let mut st = pool.state.lock();
                self.record_deferred(&mut st, &**events);
                st.pending_tickets()
                    .map(|(block, tickets)| (block, tickets.to_vec()))
                    .collect()
            };
            // A failed query means the stream is broken: waiting would never end, so the
            // block is treated as done with.
            let done: Vec<u32> = asked
                .into_iter()
                .filter(|(_, tickets)| {
                    tickets.iter().all(|&t| {
                        self.driver.event_query.fetch_add(1, Relaxed);
                        events.query(t).unwrap_or(true)
                    })
                })
                .map(|(block, _)| block)
                .collect();
            if done.is_empty() {
                return;
            }
            let mut st = pool.state.lock();
            for block in done {
                // Still pending: only this thread finishes this pool's pending frees now.
                let Some(f) = st.finish_pending(block) else {
                    continue;
                };
                f.tickets.iter().for_each(|&t| events.release(t));
                if self.history.enabled() {
                    self.history.record(
                        TraceAction::FreeCompleted,
                        f.addr as u64,
                        f.requested,
                        stream,
                    );
                }
            }
        });
    }

    /// Record the events of frees made during a capture (none could be recorded then).
    fn record_deferred(&self, st: &mut PoolState, events: &dyn StreamEvents) {
        st.record_deferred(|s| {
            self.driver.event_record.fetch_add(1, Relaxed);
            match events.record(s) {
                Ok(t) => Some(t),
                // A stream that cannot record (destroyed since): wait for the whole device
                // instead (rare), so the block is not reused under its work.
                Err(_) => {
                    self.driver.synchronize.fetch_add(1, Relaxed);
                    let _ = events.synchronize_device(self.device.index);
                    None
                }
            }
        });
    }

    /// Wait for every pending free of one pool, without holding its lock while waiting.
    pub(super) fn sync_pending(&self, pool: &StreamPool) -> Result<()> {
        let Some(events) = &self.events else {
            return Ok(());
        };
        let tickets: Vec<u64> = pool
            .state
            .lock()
            .pending_tickets()
            .flat_map(|(_, tickets)| tickets.iter().copied())
            .collect();
        for t in tickets {
            self.driver.synchronize.fetch_add(1, Relaxed);
            events.synchronize(t)?;
        }
        Ok(())
    }

    // ---- cache control ---------------------------------------------------------------------

    /// Give every cached whole segment back to the device, after waiting for pending
    /// cross-stream frees. Split segments with live blocks stay.
    pub fn empty_cache(&self) -> Result<()> {
        self.gated("empty_cache", || {
            if self.rare.has(RareFlags::DEFERRED) {
                return Err(self.take_deferred());
            }
            self.release_cached(true)
        })
    }

    /// Finish the frees whose streams have passed (MPS's `freeInactiveBuffers`): blocks
    /// freed while other streams still used them (`record_stream`, `record_events`) go back
    /// to the cache once those streams' events have completed. Waits for nothing and gives
    /// nothing back to the device (that is [`CachingAllocator::empty_cache`]).
    pub fn free_inactive_buffers(&self) -> Result<()> {
        self.gated("free_inactive_buffers", || {
            if self.rare.has(RareFlags::DEFERRED) {
                return Err(self.take_deferred());
            }
            for pool in self.initialized_pools() {
                let mut st = pool.state.lock();
                if st.has_pending() {
                    self.process_pending(pool, &mut st);
                }
            }
            Ok(())
        })
    }
}
