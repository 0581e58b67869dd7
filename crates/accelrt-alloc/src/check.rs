//! The invariant checker: usable from tests, and after every call with `debug_checks:true`.
//! Each pool checks its own invariants (`pool/check.rs`); here what spans pools: the live
//! map against the allocated blocks, chunks against the page tables that hold them, the
//! reserved counter and the segment index against the segments.
//!
//! An operation can span several locks (a new address range enters the segment index, then
//! its pool), so a checker running beside it could see it half done. With `debug_checks`,
//! calls and the checker exclude each other through the allocator's check gate: every
//! public call that changes the allocator's structure runs holding the gate shared (taken
//! before any pool lock), and the check after it holds the gate alone (`caching/gate.rs`).
//! Without `debug_checks` nothing takes the gate, and the fast paths never look at it.

use std::sync::atomic::Ordering::Relaxed;

use super::caching::CachingAllocator;
use super::chunks::Home;
use super::pool::Tally;

impl CachingAllocator {
    /// Check every structural invariant; `Err` describes the first one broken.
    ///
    /// With `debug_checks`, this may run at any moment: it waits for calls in flight on
    /// other threads to finish, and holds off new ones while it runs. Without it, calls do
    /// not wait for the checker, so it is meant for quiescent moments (a call in flight on
    /// another thread can be seen half done).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.holding_gate_alone(|| self.check_now())
    }

    pub(crate) fn check_now(&self) -> Result<(), String> {
        let mut tally = Tally::default();
        // Lock order: the vm state before any pool.
        let vm = self.vm_state.lock();
        for (pool_idx, pool) in self.pool_states() {
            let st = pool.state.lock();
            st.check(
                pool_idx,
                &vm.chunks,
                |addr| self.pages.lookup(addr),
                &mut tally,
            )?;
        }
        let Tally {
            live: live_total,
            live_seen,
            reserved: reserved_total,
            address: address_total,
            segments: segment_total,
            chunks: chunk_seen,
        } = tally;
        if live_seen != live_total {
            return Err(format!(
                "{live_total} live pointers but {live_seen} allocated blocks"
            ));
        }
        let mut spare_pages = 0u64;
        for (id, c) in vm.chunks.live() {
            let (slots, lent) = chunk_seen.get(&id).copied().unwrap_or_default();
            let home_slots = match c.home {
                Home::Mapped { .. } => c.pages as usize,
                Home::Spare => {
                    if !vm.chunks.spare_ids().contains(&id) {
                        return Err(format!("chunk {id} is spare but not on the spare list"));
                    }
                    spare_pages += c.pages as u64;
                    0
                }
                Home::Vacant => unreachable!("live() skips vacant records"),
            };
            if slots != home_slots || lent != c.lent {
                return Err(format!(
                    "chunk {id} ({} pages, {:?}) is held by {slots} slots and {lent} lent ranges, expected {home_slots} and {}",
                    c.pages, c.home, c.lent
                ));
            }
        }
        if spare_pages != vm.chunks.spare_pages() {
            return Err(format!(
                "spare list counts {} pages, its chunks hold {spare_pages}",
                vm.chunks.spare_pages()
            ));
        }
        let spare = spare_pages * self.vm_page;
        drop(vm);
        let reserved = self.reserved.load(Relaxed);
        if reserved != reserved_total + spare {
            return Err(format!("reserved counter {reserved} != memory of segments {reserved_total} + spare pages {spare}"));
        }
        let index = self.segment_index.read();
        if index.len() != segment_total || index.values().sum::<u64>() != address_total {
            return Err(format!(
                "segment index has {} entries, pools have {segment_total}",
                index.len()
            ));
        }
        Ok(())
    }
}
