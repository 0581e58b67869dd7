//! A pool's expandable segments: chunks mapped into and out of their page tables
//! (`page_table.rs`), the runs a block still needs, idle chunks in free blocks, and *lent*
//! ranges.
//!
//! A chunk moved out of a free block is mapped at its new place at once; its old range stays
//! mapped (work queued before the block was freed may still use it) as a [`BlockState::Lent`]
//! block that nothing can allocate, until a fence on the pool's stream shows that work done.
//! Then the range is unmapped and becomes free, unmapped space.
//!
//! Invariants (checked by `check.rs` beside):
//! - a slot holds [`NO_CHUNK`], [`LENT`](super::LENT), or the index of the chunk mapped there, whose home
//!   it is; `mapped` counts the slots holding a chunk and `lent_slots` the `LENT` ones;
//! - every slot under a `Lent` block is `LENT`, every `LENT` slot is under one, and `lent`
//!   lists each `Lent` block once;
//! - per kind, `reserved_bytes == Σ mapped slots × page size` over the pool's expandable
//!   segments (lent slots are not reserved here: their chunk is counted where it lives now).

use super::page_table::{PageTable, NO_CHUNK};
use super::{Block, BlockState, PoolState, Segment, NIL};
use crate::chunks::ChunkTable;
use crate::stats::PoolKind;

/// A run of slots a block needs mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub seg_base: usize,
    pub first: usize,
    pub len: usize,
    /// Unmapped slots right after the run that lie wholly in free space: a chunk placed at the
    /// run's end may cover them too (they become idle, mapped memory).
    pub room: usize,
    /// The run's first slot also holds bytes before the block (a neighbour's).
    pub head_shared: bool,
    /// The run's last slot also holds bytes after the block.
    pub tail_shared: bool,
}

/// An old mapping of a chunk that moved: the `Lent` block `block` covers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LentRange {
    pub block: u32,
    pub seg_base: usize,
    pub slot: usize,
    pub pages: usize,
    pub chunk: u32,
    /// Pool tick of the last use of these bytes: the range can be unmapped once the pool's
    /// stream has passed it.
    pub tick: u64,
}

/// A chunk lying wholly in a free block, that could move.
#[derive(Debug, Clone, Copy)]
pub(super) struct Idle {
    chunk: u32,
    pub(super) pages: usize,
    block: u32,
    seg_base: usize,
    slot: usize,
}

impl PoolState {
    /// The old mappings of chunks that moved, waiting to be unmapped; the newest last.
    pub fn lent_ranges(&self) -> &[LentRange] {
        &self.lent
    }

    /// Register a reserved virtual range as an expandable segment: one free, unmapped block.
    pub fn add_vm_segment(&mut self, base: usize, size: u64, kind: PoolKind, page_size: u64) {
        let idx = self.new_block(Block {
            addr: base,
            size,
            kind,
            mapped_len: 0,
            vm: true,
            ..Block::vacant()
        });
        let table = PageTable::new(page_size, size.div_ceil(page_size) as usize);
        self.segments.push(Segment {
            base,
            size,
            head: idx,
            kind,
            vm: Some(Box::new(table)),
        });
        self.stats_of(kind).segment.increase(1);
        self.raise_combined_peaks([|s| &mut s.segment]);
        self.add_free(idx);
    }

    /// The expandable segment holding `addr`.
    pub fn vm_segment_at(&self, addr: usize) -> Option<usize> {
        self.segments
            .iter()
            .position(|s| s.vm.is_some() && s.base <= addr && addr < s.base + s.size as usize)
    }

    fn vm_table_at(&self, addr: usize) -> Option<(&Segment, &PageTable)> {
        let seg = &self.segments[self.vm_segment_at(addr)?];
        seg.vm.as_deref().map(|t| (seg, t))
    }

    fn table_mut(&mut self, seg_base: usize) -> (&mut PageTable, PoolKind) {
        let seg = self
            .segments
            .iter_mut()
            .find(|s| s.base == seg_base)
            .expect("an expandable segment still registered");
        let kind = seg.kind;
        (seg.vm.as_deref_mut().expect("an expandable segment"), kind)
    }

    /// Re-check a block marked not-fully-mapped against the page table (the mark goes stale
    /// when a mapped block merges with an unmapped neighbour); true when it is mapped now.
    #[inline]
    pub fn refresh_mapped(&mut self, idx: u32) -> bool {
        let b = &self.blocks[idx as usize];
        let Some((seg, table)) = self.vm_table_at(b.addr) else {
            return false;
        };
        let p = table.page_size as usize;
        let first = (b.addr - seg.base) / p;
        let end = (b.addr - seg.base + b.size as usize).div_ceil(p);
        let mapped = table.all_mapped(first, end);
        if mapped {
            let b = &mut self.blocks[idx as usize];
            b.mapped_len = b.size;
        }
        mapped
    }

    /// The first run of slots under block `idx` that holds no chunk, or `None` when the block
    /// is fully mapped. A block carved from free space never covers a lent slot.
    ///
    /// The room after the block is counted up to `max_room` slots: no chunk is larger than
    /// the largest a chunk may be, so more room changes no placement, and the free block
    /// after the last one is the rest of the reserved range (millions of slots).
    pub fn first_unmapped_run(&self, idx: u32, max_room: usize) -> Option<Run> {
        let b = &self.blocks[idx as usize];
        let (seg, table) = self.vm_table_at(b.addr)?;
        let p = table.page_size as usize;
        let start = (b.addr - seg.base) / p;
        let end = (b.addr - seg.base + b.size as usize).div_ceil(p);
        let first = (start..end).find(|&s| table.get(s) == NO_CHUNK)?;
        let mut last = first + 1;
        while last < end && table.get(last) == NO_CHUNK {
            last += 1;
        }
        // Room past the block's end: unmapped slots wholly inside the free block that follows.
        let mut room = 0;
        if last == end && b.next != NIL {
            let n = &self.blocks[b.next as usize];
            if n.state == BlockState::Free {
                let limit = (n.addr + n.size as usize - seg.base) / p;
                let limit = limit.min(last + max_room);
                while last + room < limit && table.get(last + room) == NO_CHUNK {
                    room += 1;
                }
            }
        }
        let (lo, hi) = (b.addr - seg.base, b.addr - seg.base + b.size as usize);
        Some(Run {
            seg_base: seg.base,
            first,
            len: last - first,
            room,
            head_shared: first * p < lo,
            tail_shared: last == end && last * p > hi,
        })
    }

    /// Expandable segments' fit: among free blocks large enough for `rounded` bytes, the one
    /// whose first `rounded` bytes lack the fewest chunks (idle memory used in place needs no
    /// driver call and no new memory), the smallest on ties. `NIL` when no free block fits.
    pub fn take_backed(
        &mut self,
        rounded: u64,
        requested: u64,
        config: &crate::AllocatorConfig,
    ) -> u32 {
        self.flush_recent();
        let kind = crate::size::pool_kind(rounded);
        let mut candidates = Vec::new();
        self.free_index[kind as usize].at_least(&self.blocks, rounded, &mut candidates);
        let mut best: Option<(usize, u64, u32)> = None; // (missing slots, size, block)
        for idx in candidates {
            let b = &self.blocks[idx as usize];
            let missing = if b.mapped_len >= rounded {
                0
            } else {
                match self.vm_table_at(b.addr) {
                    Some((seg, t)) => {
                        let p = t.page_size as usize;
                        let first = (b.addr - seg.base) / p;
                        let end = (b.addr - seg.base + rounded as usize).div_ceil(p);
                        (end - first) - t.mapped_in(first, end).count()
                    }
                    None => 0,
                }
            };
            if best.is_none_or(|(m, sz, _)| (missing, b.size) < (m, sz)) {
                best = Some((missing, b.size, idx));
                if missing == 0 && b.size == rounded {
                    break;
                }
            }
        }
        let Some((_, _, idx)) = best else {
            return NIL;
        };
        self.take_block(idx, rounded, requested, config);
        idx
    }

    /// Record that `chunks` (index, pages) now live one after another from slot `first` of
    /// the expandable segment at `seg_base`.
    pub fn install(&mut self, seg_base: usize, first: usize, chunks: &[(u32, usize)]) {
        let (table, kind) = self.table_mut(seg_base);
        let mut slot = first;
        for &(chunk, pages) in chunks {
            for s in slot..slot + pages {
                table.set(s, chunk);
            }
            slot += pages;
        }
        let bytes = (slot - first) as u64 * table.page_size;
        self.stats_of(kind).reserved_bytes.increase(bytes);
        self.raise_combined_peaks([|s| &mut s.reserved_bytes]);
    }

    /// Chunks lying wholly inside free blocks last used at or before pool tick `since`,
    /// largest first, and among chunks of a size the coldest first: in the largest free
    /// block, at its highest address. Blocks are carved from the start of the smallest free
    /// block that fits, so that is the memory the next allocations look at last; taking it
    /// leaves the memory they will take in place. Real runs on the H200 (BENCHMARKS.md,
    /// "coldest chunk first"): ResNet-50 over 80 steps 1.016x allocated against 1.020 with
    /// 7x fewer driver calls in the steady state, GPT-2 inference 1.042 against 1.063, GPT-2
    /// training over 40 steps 1.013 against 1.018; Llama 1.029 against 1.027. Only free
    /// blocks of at least a page can hold one, and the free index lists exactly those, so
    /// this costs little even with many blocks.
    pub(super) fn idle_chunks(&self, chunks: &ChunkTable, since: u64) -> Vec<Idle> {
        let mut out = Vec::new();
        let Some(page_size) = self
            .segments
            .iter()
            .find_map(|s| s.vm.as_ref().map(|t| t.page_size))
        else {
            return out;
        };
        let mut big = Vec::new();
        for index in &self.free_index {
            index.at_least(&self.blocks, page_size, &mut big);
        }
        for block in big {
            let b = &self.blocks[block as usize];
            if b.last_used > since {
                continue;
            }
            let Some((seg, table)) = self.vm_table_at(b.addr) else {
                continue;
            };
            let p = table.page_size as usize;
            let start = (b.addr - seg.base).div_ceil(p);
            let end = (b.addr - seg.base + b.size as usize) / p;
            let mut slots = table.mapped_in(start, end).peekable();
            while let Some(slot) = slots.next() {
                let id = table.get(slot);
                let c = chunks.get(id);
                let home = matches!(c.home, crate::chunks::Home::Mapped { slot: s, .. } if s as usize == slot);
                let pages = c.pages as usize;
                if home && slot + pages <= end {
                    out.push(Idle {
                        chunk: id,
                        pages,
                        block,
                        seg_base: seg.base,
                        slot,
                    });
                    while slots.peek().is_some_and(|&s| s < slot + pages) {
                        slots.next();
                    }
                }
            }
        }
        out.sort_unstable_by_key(|i| {
            let block_size = self.blocks[i.block as usize].size;
            std::cmp::Reverse((i.pages, block_size, i.seg_base + i.slot))
        });
        out
    }

    /// The oldest and newest last use among idle chunks that could be given back (no old
    /// mapping waiting) and were freed after pool tick `after`: what the pool's fences must
    /// pass before they can go. `None` when there are none.
    pub fn idle_ages_after(&mut self, chunks: &ChunkTable, after: u64) -> Option<(u64, u64)> {
        self.flush_recent();
        let ages = self
            .idle_chunks(chunks, u64::MAX)
            .into_iter()
            .filter(|c| chunks.get(c.chunk).lent == 0)
            .map(|c| self.blocks[c.block as usize].last_used)
            .filter(|&t| t > after);
        ages.fold(None, |acc, t| match acc {
            None => Some((t, t)),
            Some((lo, hi)) => Some((lo.min(t), hi.max(t))),
        })
    }

    /// Bytes of free blocks lying on slots that hold a chunk which is not wholly idle (also
    /// under a live or lent block): memory that only requests fitting those holes can use.
    pub fn stranded_bytes(&self, chunks: &ChunkTable) -> u64 {
        let whole: u64 = self
            .idle_chunks(chunks, u64::MAX)
            .iter()
            .map(|c| c.pages as u64)
            .sum();
        let mut mapped_free = 0u64;
        let mut big = Vec::new();
        for index in &self.free_index {
            index.at_least(&self.blocks, 0, &mut big);
        }
        let mut page_size = 0u64;
        for idx in big {
            let b = &self.blocks[idx as usize];
            let Some((seg, t)) = self.vm_table_at(b.addr) else {
                continue;
            };
            let p = t.page_size as usize;
            page_size = t.page_size;
            let (lo, hi) = (b.addr - seg.base, b.addr - seg.base + b.size as usize);
            for s in t.mapped_in(lo / p, hi.div_ceil(p)) {
                let a = (s * p).max(lo);
                let z = ((s + 1) * p).min(hi);
                mapped_free += (z - a) as u64;
            }
        }
        mapped_free.saturating_sub(whole * page_size)
    }

    /// Choose idle chunks of this pool (freed at or before tick `since`) to fill `len` slots,
    /// the last of which may run `room` slots past them, and lend them: their ranges become
    /// `Lent` blocks, their chunks homeless (the caller maps them at their new place).
    /// Returns (chunk, pages) in placement order, covering at most `len + room` slots, and
    /// the pages still missing.
    pub fn lend_idle(
        &mut self,
        chunks: &mut ChunkTable,
        since: u64,
        len: usize,
        room: usize,
    ) -> (Vec<(u32, usize)>, usize) {
        self.flush_recent();
        let mut idle = self.idle_chunks(chunks, since);
        let mut picked = Vec::new();
        let mut remaining = len;
        while remaining > 0 {
            // The largest chunk that fits what is left; else the smallest that fits with the
            // room past the run (its surplus stays idle at the new place).
            let pos = idle
                .iter()
                .position(|c| c.pages <= remaining)
                .or_else(|| idle.iter().rposition(|c| c.pages <= remaining + room));
            let Some(pos) = pos else { break };
            let c = idle.remove(pos);
            let Some(after) = self.lend(chunks, c) else {
                continue;
            };
            // The block was split around the chunk: candidates above it now lie in the piece
            // after it.
            for other in idle
                .iter_mut()
                .filter(|o| o.block == c.block && o.slot > c.slot)
            {
                match after {
                    Some(a) => other.block = a,
                    None => other.block = NIL,
                }
            }
            picked.push((c.chunk, c.pages));
            remaining = remaining.saturating_sub(c.pages);
        }
        (picked, remaining)
    }

    /// Make the idle chunk `c` (in free block `c.block`) a lent range. `None` if the block is
    /// no longer free or no longer holds it; else the free piece left after the chunk, if
    /// any. The chunk's home is left for the caller to set.
    fn lend(&mut self, chunks: &mut ChunkTable, c: Idle) -> Option<Option<u32>> {
        let p = self.table_mut(c.seg_base).0.page_size as usize;
        let (lo, hi) = (c.seg_base + c.slot * p, c.seg_base + (c.slot + c.pages) * p);
        let b = self.blocks.get(c.block as usize)?;
        if b.state != BlockState::Free || lo < b.addr || hi > b.addr + b.size as usize {
            return None;
        }
        let tick = b.last_used;
        let (lent, after) = self.isolate(c.block, lo, hi);
        self.blocks[lent as usize].state = BlockState::Lent;
        let (table, kind) = self.table_mut(c.seg_base);
        for s in c.slot..c.slot + c.pages {
            table.lend(s);
        }
        self.stats_of(kind)
            .reserved_bytes
            .decrease((c.pages * p) as u64);
        chunks.get_mut(c.chunk).lent += 1;
        self.lent.push(LentRange {
            block: lent,
            seg_base: c.seg_base,
            slot: c.slot,
            pages: c.pages,
            chunk: c.chunk,
            tick,
        });
        Some(after)
    }

    /// Cut `[lo, hi)` out of free block `idx` (which holds it): the pieces before and after
    /// go back to the free index; returns the middle piece (off every list) and the piece
    /// after it, if any. In expandable segments the pieces after `lo` are marked not known to
    /// be mapped (the caller changes what backs them).
    pub(super) fn isolate(&mut self, idx: u32, lo: usize, hi: usize) -> (u32, Option<u32>) {
        self.remove_free(idx);
        let (addr, size) = {
            let b = &self.blocks[idx as usize];
            (b.addr, b.size as usize)
        };
        let middle = if lo > addr {
            let rest = self.split_off(idx, (lo - addr) as u64);
            self.add_free(idx);
            rest
        } else {
            idx
        };
        let vm = self.blocks[middle as usize].vm;
        let after = (hi < addr + size).then(|| {
            let after = self.split_off(middle, (hi - lo) as u64);
            if vm {
                self.blocks[after as usize].mapped_len = 0;
            }
            self.add_free(after);
            after
        });
        if vm {
            self.blocks[middle as usize].mapped_len = 0;
        }
        (middle, after)
    }

    /// Unmapped-and-free again: lent ranges whose last use is at or before `safe`. Returns
    /// the address ranges to unmap (adjacent ones joined) and the chunks whose old mapping
    /// they were.
    pub fn reclaim_lent(&mut self, safe: u64) -> (Vec<(usize, usize)>, Vec<u32>) {
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        let mut chunk_ids = Vec::new();
        let mut i = 0;
        let mut done = Vec::new();
        while i < self.lent.len() {
            if self.lent[i].tick <= safe {
                done.push(self.lent.swap_remove(i));
            } else {
                i += 1;
            }
        }
        done.sort_unstable_by_key(|l| (l.seg_base, l.slot));
        for l in done {
            let (table, _) = self.table_mut(l.seg_base);
            let p = table.page_size as usize;
            for s in l.slot..l.slot + l.pages {
                table.unlend(s);
            }
            let (addr, len) = (l.seg_base + l.slot * p, l.pages * p);
            match ranges.last_mut() {
                Some((a, n)) if *a + *n == addr => *n += len,
                _ => ranges.push((addr, len)),
            }
            chunk_ids.push(l.chunk);
            let b = &mut self.blocks[l.block as usize];
            debug_assert_eq!(b.state, BlockState::Lent);
            b.mapped_len = 0;
            self.coalesce(l.block);
        }
        (ranges, chunk_ids)
    }

    /// Take every idle chunk of this pool out of its free block for release: the slots become
    /// unmapped. Only for callers that made sure no queued work uses the pool's free blocks
    /// (a synchronized stream). Returns (address, length, chunk) per chunk.
    pub fn take_idle_for_release(&mut self, chunks: &ChunkTable) -> Vec<(usize, usize, u32)> {
        self.flush_recent();
        let idle = self.idle_chunks(chunks, u64::MAX);
        idle.into_iter().map(|c| self.unhome(c)).collect()
    }

    /// Take idle chunks freed at or before tick `since` holding at least `pages` pages (fewest
    /// chunks: the smallest single one that suffices, else the largest first) out of their
    /// free blocks for release. Chunks with an old mapping still waiting are skipped.
    pub fn take_idle_pages(
        &mut self,
        chunks: &ChunkTable,
        since: u64,
        pages: usize,
    ) -> Vec<(usize, usize, u32)> {
        self.flush_recent();
        let mut idle = self.idle_chunks(chunks, since);
        idle.retain(|c| chunks.get(c.chunk).lent == 0);
        let mut picked = Vec::new();
        if let Some(one) = idle.iter().rposition(|c| c.pages >= pages) {
            picked.push(idle[one]);
        } else {
            let mut got = 0;
            for c in idle {
                if got >= pages {
                    break;
                }
                got += c.pages;
                picked.push(c);
            }
        }
        picked.into_iter().map(|c| self.unhome(c)).collect()
    }

    /// Clear idle chunk `c` out of the page table (its free block becomes unmapped there).
    fn unhome(&mut self, c: Idle) -> (usize, usize, u32) {
        let (table, kind) = self.table_mut(c.seg_base);
        let p = table.page_size as usize;
        for s in c.slot..c.slot + c.pages {
            table.clear(s);
        }
        self.stats_of(kind)
            .reserved_bytes
            .decrease((c.pages * p) as u64);
        let lo = c.seg_base + c.slot * p;
        let b = &mut self.blocks[c.block as usize];
        b.mapped_len = b.mapped_len.min((lo - b.addr) as u64);
        (lo, c.pages * p, c.chunk)
    }
}
