//! What a stream pool's free memory is made of, for the breakdown of reserved memory at its
//! peak (`PeakBreakdown`): why each free byte could not serve the request that raised it.

use super::{BlockState, PoolState};
use crate::chunks::ChunkTable;

/// A stream pool's free memory by kind, in bytes (the meanings are `PeakBreakdown`'s).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FreeMemory {
    pub in_shared_pages: u64,
    pub in_used_chunks: u64,
    pub idle_chunks: u64,
    pub in_segments: u64,
    /// Bytes of blocks another thread carved and is still mapping (held in flight) that no
    /// chunk backs yet: counted as allocated by the statistics, not yet reserved.
    pub unbacked_in_flight: u64,
}

impl PoolState {
    /// Walks every block once (O(blocks)): for the peak breakdown only, never on a fast path.
    pub fn free_memory(&self, chunks: &ChunkTable) -> FreeMemory {
        let mut out = FreeMemory::default();
        let mut whole_free_pages = 0u64;
        let mut page_size = 0u64;
        for seg in &self.segments {
            let table = seg.vm.as_deref();
            for (idx, b) in self.blocks_of(seg) {
                if b.state == BlockState::Allocated && self.live.get(b.addr) != Some(idx) {
                    if let Some(t) = table {
                        let p = t.page_size as usize;
                        let (lo, hi) = (b.addr - seg.base, b.addr - seg.base + b.size as usize);
                        let backed: usize = t
                            .mapped_in(lo / p, hi.div_ceil(p))
                            .map(|slot| ((slot + 1) * p).min(hi) - (slot * p).max(lo))
                            .sum();
                        out.unbacked_in_flight += b.size - backed as u64;
                    }
                    continue;
                }
                if !matches!(b.state, BlockState::Free | BlockState::Recent) {
                    continue;
                }
                let Some(t) = table else {
                    out.in_segments += b.size;
                    continue;
                };
                let p = t.page_size as usize;
                page_size = t.page_size;
                let (lo, hi) = (b.addr - seg.base, b.addr - seg.base + b.size as usize);
                for slot in t.mapped_in(lo / p, hi.div_ceil(p)) {
                    let covered = ((slot + 1) * p).min(hi) - (slot * p).max(lo);
                    if covered < p {
                        out.in_shared_pages += covered as u64;
                    } else {
                        whole_free_pages += 1;
                    }
                }
            }
        }
        let idle_pages: u64 = self
            .idle_chunks(chunks, u64::MAX)
            .iter()
            .map(|c| c.pages as u64)
            .sum();
        out.idle_chunks = idle_pages * page_size;
        out.in_used_chunks = whole_free_pages.saturating_sub(idle_pages) * page_size;
        out
    }
}
