//! A pool's segments: adding one (and carving its first block), claiming a given free range,
//! and finding and removing the whole free segments the allocator gives back.

use super::{Block, BlockState, PoolState, Segment, NIL};
use crate::size::pool_kind;
use crate::AllocatorConfig;

impl PoolState {
    /// Register a new segment and carve a block of `rounded` bytes from it.
    pub fn add_segment(
        &mut self,
        base: usize,
        seg_size: u64,
        rounded: u64,
        requested: u64,
        config: &AllocatorConfig,
    ) -> u32 {
        let kind = pool_kind(rounded);
        let idx = self.new_block(Block {
            addr: base,
            size: seg_size,
            kind,
            ..Block::vacant()
        });
        self.segments.push(Segment {
            base,
            size: seg_size,
            head: idx,
            kind,
            vm: None,
        });
        let s = self.stats_of(kind);
        s.segment.increase(1);
        s.reserved_bytes.increase(seg_size);
        self.raise_combined_peaks([|s| &mut s.segment, |s| &mut s.reserved_bytes]);
        self.carve(idx, rounded, requested, config);
        idx
    }

    /// Make the free bytes `[addr, addr + size)` one allocated block for `requested` bytes:
    /// the free block holding them is split around them. `Err` says why not (no segment
    /// there, not free, not whole).
    pub fn claim(&mut self, addr: usize, size: u64, requested: u64) -> Result<u32, String> {
        self.flush_recent();
        let seg = self
            .segments
            .iter()
            .find(|s| s.base <= addr && addr < s.base + s.size as usize)
            .ok_or_else(|| "no segment of the pool holds that address".to_string())?;
        let end = addr
            .checked_add(size as usize)
            .filter(|&e| e <= seg.base + seg.size as usize)
            .ok_or_else(|| "the range runs past the end of its segment".to_string())?;
        let mut cur = seg.head;
        while cur != NIL {
            let b = &self.blocks[cur as usize];
            if b.addr <= addr && addr < b.addr + b.size as usize {
                break;
            }
            cur = b.next;
        }
        let b = &self.blocks[cur as usize];
        if b.state != BlockState::Free {
            return Err(format!("those bytes are {:?}, not free", b.state).to_lowercase());
        }
        if end > b.addr + b.size as usize {
            return Err("the range spans more than one free block".into());
        }
        let (idx, _) = self.isolate(cur, addr, end);
        self.mark_allocated(idx, requested);
        Ok(idx)
    }

    /// Whole free segments, as (last_used, segment position). None for a private pool still
    /// in use: a captured graph replays into blocks it freed during capture, so their memory
    /// must stay until the pool is released (PyTorch frees only pools nothing uses).
    pub fn releasable(&self) -> Vec<(u64, usize)> {
        if !self.pool_id.is_none() && !self.released {
            return Vec::new();
        }
        self.segments
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                let b = &self.blocks[s.head as usize];
                s.vm.is_none() && b.state == BlockState::Free && b.next == NIL
            })
            .map(|(i, s)| (self.blocks[s.head as usize].last_used, i))
            .collect()
    }

    /// Remove the segment at `base` if it is whole, free and unused since pool tick `since`,
    /// and (expandable) no page of it is mapped or lent; the caller gives it back to the
    /// device.
    ///
    /// The page-table test is made here, under the pool lock, not only by callers that looked
    /// earlier: between a caller's look and this call another thread may take the free
    /// block, map chunks under it and free it again (issue 13, fuzz round 3: the segment was
    /// given back with a chunk still mapped in it, and the chunk's record kept naming it).
    pub fn remove_segment(&mut self, base: usize, since: u64) -> Option<Segment> {
        let pos = self.segments.iter().position(|s| s.base == base)?;
        let seg = &self.segments[pos];
        let b = &self.blocks[seg.head as usize];
        if b.state != BlockState::Free || b.next != NIL || b.size != seg.size || b.last_used > since
        {
            return None;
        }
        if seg
            .vm
            .as_ref()
            .is_some_and(|t| t.mapped > 0 || t.lent_slots > 0)
        {
            return None;
        }
        let (head, kind, memory) = (seg.head, seg.kind, seg.memory());
        self.remove_free(head);
        self.retire_block(head);
        let seg = self.segments.swap_remove(pos);
        let s = self.stats_of(kind);
        s.segment.decrease(1);
        s.reserved_bytes.decrease(memory);
        Some(seg)
    }

    /// Remove every whole cached segment (after the caller made sure their streams have
    /// passed); the caller gives them back to the device.
    pub fn take_releasable_segments(&mut self) -> Vec<Segment> {
        let bases: Vec<usize> = self
            .releasable()
            .into_iter()
            .map(|(_, i)| self.segments[i].base)
            .collect();
        bases
            .into_iter()
            .filter_map(|b| self.remove_segment(b, u64::MAX))
            .collect()
    }
}
