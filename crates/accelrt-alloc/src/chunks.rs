//! The physical chunks of expandable segments: one record per physical allocation the
//! allocator holds, where it is mapped, and the spare ones (created, mapped nowhere).
//!
//! Lives behind the allocator's `vm` mutex; page tables (per pool, in [`super::pagetable`])
//! name chunks by their index here.
//!
//! Invariants (checked by `check.rs`):
//! - a chunk is `Spare` iff it is on the spare list, and `Mapped` iff the page table of its
//!   home segment holds its index in exactly `pages` slots from `slot`;
//! - `lent` counts the old mappings of the chunk still waiting to be unmapped (the pools'
//!   lent ranges naming it); a chunk is released only when `lent == 0`;
//! - `spare_pages == Σ pages of spare chunks`.

use super::provider::ChunkHandle;

/// Where a chunk is mapped for use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Home {
    /// An unused record.
    Vacant,
    /// Created and mapped nowhere for use (old mappings may still wait to be unmapped).
    Spare,
    /// Mapped at `slot..slot + pages` of the expandable segment at `seg_base` of pool `pool`.
    Mapped {
        pool: u32,
        seg_base: usize,
        slot: u32,
    },
}

/// One physical allocation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Chunk {
    pub handle: ChunkHandle,
    /// Size in granules (pages).
    pub pages: u32,
    pub home: Home,
    /// Old mappings still waiting to be unmapped.
    pub lent: u32,
}

/// Every chunk the allocator holds.
#[derive(Debug, Default)]
pub(crate) struct ChunkTable {
    recs: Vec<Chunk>,
    vacant: Vec<u32>,
    spare: Vec<u32>,
    spare_pages: u64,
}

impl ChunkTable {
    /// Record a new chunk, homeless (the caller maps it or makes it spare).
    pub fn add(&mut self, handle: ChunkHandle, pages: u32) -> u32 {
        let rec = Chunk {
            handle,
            pages,
            home: Home::Spare,
            lent: 0,
        };
        match self.vacant.pop() {
            Some(id) => {
                self.recs[id as usize] = rec;
                id
            }
            None => {
                self.recs.push(rec);
                (self.recs.len() - 1) as u32
            }
        }
    }

    /// Forget chunk `id` (the caller released it).
    pub fn remove(&mut self, id: u32) -> Chunk {
        let rec = self.recs[id as usize];
        debug_assert!(
            !matches!(rec.home, Home::Vacant),
            "chunk {id} removed twice"
        );
        self.recs[id as usize].home = Home::Vacant;
        self.vacant.push(id);
        rec
    }

    pub fn get(&self, id: u32) -> &Chunk {
        &self.recs[id as usize]
    }

    pub fn get_mut(&mut self, id: u32) -> &mut Chunk {
        &mut self.recs[id as usize]
    }

    /// Put chunk `id` on the spare list.
    pub fn push_spare(&mut self, id: u32) {
        let rec = &mut self.recs[id as usize];
        rec.home = Home::Spare;
        self.spare_pages += rec.pages as u64;
        self.spare.push(id);
    }

    /// Take a spare chunk of at most `max` pages, the largest there is; with `exact`, only one
    /// of exactly `max` pages. Chunks whose old mapping still waits to be unmapped are left
    /// alone: work queued on the old range may still use them, and a new user on another
    /// stream would not be ordered after it.
    pub fn take_spare(&mut self, max: u32, exact: bool) -> Option<u32> {
        let mut best: Option<(usize, u32)> = None;
        for (i, &id) in self.spare.iter().enumerate() {
            let c = &self.recs[id as usize];
            let p = c.pages;
            if p > max || (exact && p != max) || c.lent > 0 {
                continue;
            }
            if best.is_none_or(|(_, bp)| p > bp) {
                best = Some((i, p));
                if p == max {
                    break;
                }
            }
        }
        let (i, pages) = best?;
        self.spare_pages -= pages as u64;
        Some(self.spare.swap_remove(i))
    }

    /// Take every spare chunk.
    pub fn take_all_spare(&mut self) -> Vec<u32> {
        self.spare_pages = 0;
        std::mem::take(&mut self.spare)
    }

    /// Pages of spare chunks.
    pub fn spare_pages(&self) -> u64 {
        self.spare_pages
    }

    /// Chunks on the spare list.
    pub fn spare_ids(&self) -> &[u32] {
        &self.spare
    }

    /// Every live chunk with its index.
    pub fn live(&self) -> impl Iterator<Item = (u32, &Chunk)> {
        self.recs
            .iter()
            .enumerate()
            .filter(|(_, c)| !matches!(c.home, Home::Vacant))
            .map(|(i, c)| (i as u32, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_chunks_are_taken_largest_fitting_first() {
        let mut t = ChunkTable::default();
        let ids: Vec<u32> = [4u32, 1, 16, 4]
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let id = t.add(ChunkHandle(i as u64), p);
                t.push_spare(id);
                id
            })
            .collect();
        assert_eq!(t.spare_pages(), 25);
        let four = t.take_spare(8, false).expect("a chunk of at most 8 pages");
        assert_eq!(t.get(four).pages, 4, "the largest that fits");
        assert_eq!(t.take_spare(3, true), None, "no spare of exactly 3 pages");
        assert_eq!(t.take_spare(16, true), Some(ids[2]));
        assert_eq!(t.spare_pages(), 5);
        let rest = t.take_all_spare();
        assert_eq!(rest.len(), 2);
        assert_eq!(t.spare_pages(), 0);
        let removed = t.remove(ids[1]);
        assert_eq!(removed.pages, 1);
        assert_eq!(
            t.add(ChunkHandle(9), 2),
            ids[1],
            "vacant records are reused"
        );
    }
}
