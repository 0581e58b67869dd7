//! The invariant checker of one pool: the equations of `mod.rs` and `vm.rs`, checked from
//! the blocks up. The allocator's checker (`check.rs`) runs it on every pool (after every
//! call with `debug_checks:true`) and checks what spans pools with the [`Tally`] it returns.

use std::collections::HashMap;

use super::{BlockState, PoolState, LENT, NIL, NO_CHUNK};
use crate::chunks::{ChunkTable, Home};
use crate::stats::PoolStats;

/// What the check of one pool counted, for the checks across pools.
#[derive(Debug, Default)]
pub struct Tally {
    /// Entries of the live map.
    pub live: usize,
    /// Allocated blocks the live map sends to themselves.
    pub live_seen: usize,
    /// Memory of the segments.
    pub reserved: u64,
    /// Address space of the segments.
    pub address: u64,
    pub segments: usize,
    /// Chunk -> (slots holding it at home, lent ranges naming it).
    pub chunks: HashMap<u32, (usize, u32)>,
}

impl PoolState {
    /// Check every invariant of this pool (pool `pool_idx` of its allocator); `Err`
    /// describes the first one broken. `chunks` are the allocator's chunks (expandable
    /// segments), `owner` says which pool the page map sends an address to. Adds what it
    /// counted to `tally`.
    pub fn check(
        &self,
        pool_idx: u32,
        chunks: &ChunkTable,
        owner: impl Fn(usize) -> Option<u32>,
        tally: &mut Tally,
    ) -> Result<(), String> {
        let mut expect = [PoolStats::default(); 2];
        let mut pending_blocks = 0usize;
        tally.live += self.live.len();
        for (k, index) in self.free_index.iter().enumerate() {
            for idx in index.all(&self.blocks)? {
                let b = &self.blocks[idx as usize];
                if b.state != BlockState::Free || b.kind as usize != k {
                    return Err(format!(
                        "pool {pool_idx}: block {idx} on free list {k} is {:?} of kind {:?}",
                        b.state, b.kind
                    ));
                }
            }
        }
        for seg in &self.segments {
            tally.segments += 1;
            tally.reserved += seg.memory();
            tally.address += seg.size;
            let e = &mut expect[seg.kind as usize];
            e.segment.current += 1;
            e.reserved_bytes.current += seg.memory();
            if let Some(t) = &seg.vm {
                let (mut mapped, mut lent) = (0u64, 0u64);
                for slot in 0..t.stored() {
                    match t.get(slot) {
                        NO_CHUNK => {}
                        LENT => lent += 1,
                        id => {
                            mapped += 1;
                            let c = chunks.get(id);
                            let Home::Mapped {
                                pool: hp,
                                seg_base,
                                slot: first,
                            } = c.home
                            else {
                                return Err(format!("pool {pool_idx}: slot {slot} of segment {:#x} holds chunk {id}, whose home is {:?}", seg.base, c.home));
                            };
                            let first = first as usize;
                            if hp != pool_idx
                                || seg_base != seg.base
                                || slot < first
                                || slot >= first + c.pages as usize
                            {
                                return Err(format!("pool {pool_idx}: slot {slot} of segment {:#x} holds chunk {id} homed at pool {hp} {seg_base:#x} slot {first} ({} pages)", seg.base, c.pages));
                            }
                            tally.chunks.entry(id).or_default().0 += 1;
                        }
                    }
                }
                if mapped != t.mapped || lent != t.lent_slots {
                    return Err(format!(
                        "pool {pool_idx}: segment {:#x} counts {} mapped and {} lent slots, has {mapped} and {lent}",
                        seg.base, t.mapped, t.lent_slots
                    ));
                }
            }
            let mut cur = seg.head;
            let mut addr = seg.base;
            let mut prev = NIL;
            let mut prev_free = false;
            while cur != NIL {
                let b = &self.blocks[cur as usize];
                if b.addr != addr {
                    return Err(format!("pool {pool_idx}: block {cur} at {:#x}, expected {addr:#x} (gap or overlap)", b.addr));
                }
                if b.prev != prev {
                    return Err(format!(
                        "pool {pool_idx}: block {cur} prev {} but follows {prev}",
                        b.prev
                    ));
                }
                if b.kind != seg.kind {
                    return Err(format!(
                        "pool {pool_idx}: block {cur} kind differs from its segment"
                    ));
                }
                if let Some(t) = &seg.vm {
                    let p = t.page_size as usize;
                    let in_use = matches!(b.state, BlockState::Allocated | BlockState::Pending);
                    let known = if in_use {
                        b.size
                    } else if b.state == BlockState::Lent {
                        0
                    } else {
                        b.mapped_len.min(b.size)
                    };
                    if known > 0 {
                        let first = (b.addr - seg.base) / p;
                        let last = (b.addr - seg.base + known as usize - 1) / p;
                        if (first..=last).any(|i| t.get(i) >= LENT) {
                            return Err(format!(
                                "pool {pool_idx}: block {cur} ({:?}, {known} bytes known mapped) has a slot without a chunk",
                                b.state
                            ));
                        }
                    }
                    if b.state == BlockState::Lent {
                        let (off, len) = (b.addr - seg.base, b.size as usize);
                        if off % p != 0 || len % p != 0 {
                            return Err(format!(
                                "pool {pool_idx}: lent block {cur} is not page-aligned"
                            ));
                        }
                        if (off / p..(off + len) / p).any(|i| t.get(i) != LENT) {
                            return Err(format!(
                                "pool {pool_idx}: lent block {cur} covers a slot that is not lent"
                            ));
                        }
                        if self.lent.iter().filter(|l| l.block == cur).count() != 1 {
                            return Err(format!("pool {pool_idx}: lent block {cur} is not listed once among lent ranges"));
                        }
                    } else {
                        let first = (b.addr - seg.base) / p;
                        let last = (b.addr - seg.base + b.size as usize - 1) / p;
                        if (first..=last).any(|i| t.get(i) == LENT) {
                            return Err(format!(
                                "pool {pool_idx}: {:?} block {cur} covers a lent slot",
                                b.state
                            ));
                        }
                    }
                } else if !b.is_mapped() || b.state == BlockState::Lent {
                    return Err(format!(
                        "pool {pool_idx}: block {cur} of a plain segment is marked unmapped or lent"
                    ));
                }
                if b.size == 0 || b.size % 512 != 0 {
                    return Err(format!("pool {pool_idx}: block {cur} has size {}", b.size));
                }
                match b.state {
                    BlockState::Free => {
                        if prev_free {
                            return Err(format!(
                                "pool {pool_idx}: free blocks {prev} and {cur} were not coalesced"
                            ));
                        }
                        if !self.free_index[b.kind as usize].contains(&self.blocks, cur) {
                            return Err(format!(
                                "pool {pool_idx}: free block {cur} is not on its free list"
                            ));
                        }
                        if b.is_split() && !b.vm {
                            e.inactive_split.current += 1;
                            e.inactive_split_bytes.current += b.size;
                        }
                    }
                    BlockState::Recent => {
                        if !self.recent.contains(&cur) && self.parked != cur {
                            return Err(format!(
                                "pool {pool_idx}: recent block {cur} is in no recent slot and not parked"
                            ));
                        }
                        if b.is_split() && !b.vm {
                            e.inactive_split.current += 1;
                            e.inactive_split_bytes.current += b.size;
                        }
                    }
                    BlockState::Allocated => {
                        e.allocation.current += 1;
                        e.allocated_bytes.current += b.size;
                        e.requested_bytes.current += b.requested;
                        e.active.current += 1;
                        e.active_bytes.current += b.size;
                        if b.requested > b.size {
                            return Err(format!(
                                "pool {pool_idx}: block {cur} requested {} > size {}",
                                b.requested, b.size
                            ));
                        }
                        match self.live.get(b.addr) {
                            Some(l) if l == cur => tally.live_seen += 1,
                            other => return Err(format!("pool {pool_idx}: allocated block {cur} at {:#x} has live entry {other:?}", b.addr)),
                        }
                        if owner(b.addr) != Some(pool_idx) {
                            return Err(format!(
                                "pool {pool_idx}: page map does not send {:#x} to its pool",
                                b.addr
                            ));
                        }
                    }
                    BlockState::Pending => {
                        pending_blocks += 1;
                        e.active.current += 1;
                        e.active_bytes.current += b.size;
                    }
                    BlockState::Lent => {}
                    BlockState::Vacant => {
                        return Err(format!(
                            "pool {pool_idx}: vacant block {cur} linked into a segment"
                        ))
                    }
                }
                prev_free = b.state == BlockState::Free;
                addr += b.size as usize;
                prev = cur;
                cur = b.next;
            }
            if addr != seg.base + seg.size as usize {
                return Err(format!(
                    "pool {pool_idx}: segment {:#x} tiles to {addr:#x}, not its end",
                    seg.base
                ));
            }
        }
        for &r in self
            .recent
            .iter()
            .chain([&self.parked])
            .filter(|&&r| r != NIL)
        {
            if self.blocks[r as usize].state != BlockState::Recent {
                return Err(format!(
                    "pool {pool_idx}: recent slot holds block {r} in state {:?}",
                    self.blocks[r as usize].state
                ));
            }
        }
        for l in &self.lent {
            tally.chunks.entry(l.chunk).or_default().1 += 1;
            if self.blocks[l.block as usize].state != BlockState::Lent {
                return Err(format!(
                    "pool {pool_idx}: lent range at slot {} names block {}, which is {:?}",
                    l.slot, l.block, self.blocks[l.block as usize].state
                ));
            }
        }
        if pending_blocks != self.pending.len() {
            return Err(format!(
                "pool {pool_idx}: {pending_blocks} pending blocks but {} pending entries",
                self.pending.len()
            ));
        }
        for (k, (want, have)) in expect.iter().zip(self.stats().iter()).enumerate() {
            for ((name, w), (_, h)) in want.named().iter().zip(have.named().iter()) {
                if w.current != h.current {
                    return Err(format!(
                        "pool {pool_idx} kind {k}: stat {name} is {} but the blocks say {}",
                        h.current, w.current
                    ));
                }
            }
        }
        for (name, both) in self.combined_stats().named() {
            if both.peak < both.current {
                return Err(format!(
                    "pool {pool_idx}: combined {name} peak {} is below its current {}",
                    both.peak, both.current
                ));
            }
        }
        Ok(())
    }
}
