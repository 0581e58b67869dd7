//! Checkpoints of private pools: what PyTorch's CUDA graph trees (`torch.compile(mode=
//! "reduce-overhead")`) do with `getCheckpointState` / `setCheckpointPoolState`.
//!
//! A graph tree records several CUDA graphs into one private pool. Before recording a new
//! branch it puts the pool back to the state it had at an earlier point: the blocks live then
//! must be allocated again at the same addresses (the recorded graphs read and write them),
//! and everything allocated since is given back to the pool.
//!
//! [`CachingAllocator::checkpoint_pool`] records the pool's segments and every block in them
//! (address, size, allocated or free). [`CachingAllocator::restore_pool`] first checks that
//! the checkpoint still fits the pool (same segments, blocks inside them and not overlapping,
//! nothing waiting for another stream or lent), then frees every block allocated now and
//! re-creates the checkpoint's allocated blocks at their addresses from the free space that
//! leaves: the segments' tiling is then the checkpoint's. A checkpoint that does not fit is an
//! error naming why, and nothing changes. Private pools use plain segments (fully backed), so
//! re-created blocks need no mapping.

use super::AllocatorEvent;
use super::CachingAllocator;
use crate::error::{Error, Result};
use crate::graph::MempoolId;
use crate::pool::BlockState;
use crate::MIN_BLOCK;

/// One block of a checkpointed segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointBlock {
    pub addr: usize,
    pub size: u64,
    /// Bytes the caller asked for; 0 for a free block.
    pub requested: u64,
    /// Allocated at the checkpoint (else free, or anything else not handed out).
    pub allocated: bool,
}

/// One segment of a checkpointed pool, with every block in it by address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointSegment {
    pub base: usize,
    pub size: u64,
    pub blocks: Vec<CheckpointBlock>,
}

/// A private pool's state at one moment (PyTorch's `PrivatePoolState`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCheckpoint {
    pub pool: MempoolId,
    pub segments: Vec<CheckpointSegment>,
}

impl PoolCheckpoint {
    /// The blocks allocated at the checkpoint, by address.
    pub fn allocated(&self) -> impl Iterator<Item = &CheckpointBlock> {
        self.segments
            .iter()
            .flat_map(|s| s.blocks.iter())
            .filter(|b| b.allocated)
    }
}

/// What [`CachingAllocator::restore_pool`] did (PyTorch's `CheckpointDelta`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Every block allocated before the call: freed (a block also in the checkpoint is then
    /// allocated again, at the same address).
    pub freed: Vec<usize>,
    /// The checkpoint's allocated blocks, allocated now: (address, size).
    pub allocated: Vec<(usize, u64)>,
}

impl CachingAllocator {
    /// Record private pool `id`: its segments (by address) and every block in them.
    pub fn checkpoint_pool(&self, id: MempoolId) -> Result<PoolCheckpoint> {
        let pool = self.private_pool(id)?;
        let mut st = pool.state.lock();
        st.flush_recent();
        let segments = st
            .segments()
            .iter()
            .map(|seg| {
                let blocks = st
                    .blocks_of(seg)
                    .map(|(_, b)| {
                        let allocated = b.state == BlockState::Allocated;
                        CheckpointBlock {
                            addr: b.addr,
                            size: b.size,
                            requested: if allocated { b.requested } else { 0 },
                            allocated,
                        }
                    })
                    .collect();
                CheckpointSegment {
                    base: seg.base,
                    size: seg.size,
                    blocks,
                }
            })
            .collect::<Vec<_>>();
        let mut segments = segments;
        segments.sort_unstable_by_key(|s| s.base);
        Ok(PoolCheckpoint { pool: id, segments })
    }

    /// Put private pool `checkpoint.pool` back to `checkpoint`: free every block allocated now
    /// and allocate the checkpoint's allocated blocks again at their addresses, as `raw_alloc`
    /// would have (statistics, history, callbacks). Frees that wait for other streams
    /// (`record_stream`) are waited for first. If the checkpoint does not fit the pool (a
    /// segment gone or changed, blocks outside their segment or overlapping, memory lent
    /// away), nothing changes and the error says which.
    pub fn restore_pool(&self, checkpoint: &PoolCheckpoint) -> Result<RestoreReport> {
        self.gated("restore_pool", || {
            let id = checkpoint.pool;
            let pool = self.private_pool(id)?;
            let why = |m: String| {
                Error::InvalidArgument(format!(
                    "cannot put private pool ({}, {}) on {} back to its checkpoint: {m}",
                    id.0, id.1, self.device
                ))
            };
            check_shape(checkpoint).map_err(why)?;
            {
                // Validate before freeing anything.
                let st = pool.state.lock();
                for cs in &checkpoint.segments {
                    if !st
                        .segments()
                        .iter()
                        .any(|s| s.base == cs.base && s.size == cs.size)
                    {
                        return Err(why(format!(
                            "its segment at {:#x} ({} bytes) is no longer in the pool (was the pool \
                             emptied or released since the checkpoint?)",
                            cs.base, cs.size
                        )));
                    }
                }
            }
            // Blocks used on other streams go through the ordinary free (their events), and the
            // pool then waits for them: a restore hands their memory out again at once.
            let with_extras: Vec<usize> = {
                let st = pool.state.lock();
                st.live_blocks()
                    .filter(|&(_, b)| st.block(b).has_extras)
                    .map(|(p, _)| p)
                    .collect()
            };
            let mut freed = with_extras.clone();
            for p in with_extras {
                self.raw_free(p)?;
            }
            self.sync_pending(pool)?;

            let mut st = pool.state.lock();
            self.process_pending(pool, &mut st);
            if st.has_pending() {
                return Err(why(format!(
                    "{} block(s) still wait for other streams' events",
                    st.pending_count()
                )));
            }
            if !st.lent_ranges().is_empty() {
                return Err(why("part of the pool is lent to another mapping".into()));
            }
            // Every block allocated now goes back to the pool.
            let mut live: Vec<(usize, u32)> = st.live_blocks().collect();
            live.sort_unstable();
            let mut sizes = Vec::with_capacity(live.len());
            for &(ptr, block) in &live {
                st.take_live(ptr);
                if self.history.enabled() {
                    self.note_free(&mut st, block, pool.stream.index);
                }
                sizes.push((ptr, st.block(block).size));
                st.free_to_cache(block);
                freed.push(ptr);
            }
            st.flush_recent();
            // Every allocated block of the checkpoint, at its address.
            let mut allocated = Vec::new();
            for b in checkpoint.allocated() {
                let block = st.claim(b.addr, b.size, b.requested).map_err(|m| {
                    // The checks above leave every byte of the segments free: this is a bug.
                    why(format!(
                        "re-creating {:#x} ({} bytes) failed after freeing the pool: {m}",
                        b.addr, b.size
                    ))
                })?;
                if self.history.enabled() {
                    self.note_alloc(&mut st, block, pool.stream.index);
                }
                allocated.push((b.addr, b.size));
            }
            drop(st);
            if self.callbacks_on() {
                sizes
                    .iter()
                    .for_each(|&(p, s)| self.fire(p, s, AllocatorEvent::Freed));
                allocated
                    .iter()
                    .for_each(|&(p, s)| self.fire(p, s, AllocatorEvent::Allocated));
            }
            freed.sort_unstable();
            Ok(RestoreReport { freed, allocated })
        })
    }

    /// The pool of private pool `id`.
    fn private_pool(&self, id: MempoolId) -> Result<&super::StreamPool> {
        let index = self.private_pool_index(id).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "no private pool ({}, {}) on {}: it was never begun or was released (take \
                 checkpoints of a pool while it is in use)",
                id.0, id.1, self.device
            ))
        })?;
        Ok(self.pools[index]
            .get()
            .expect("a registered private pool exists"))
    }
}

/// A checkpoint's own consistency: segments that do not overlap, each tiled exactly by its
/// blocks (512-byte multiples, in address order); allocated blocks not asking for more than
/// they hold.
fn check_shape(cp: &PoolCheckpoint) -> std::result::Result<(), String> {
    let mut segs: Vec<(usize, u64)> = cp.segments.iter().map(|s| (s.base, s.size)).collect();
    segs.sort_unstable();
    for w in segs.windows(2) {
        if (w[0].0 as u128) + (w[0].1 as u128) > w[1].0 as u128 {
            return Err(format!(
                "its segments at {:#x} and {:#x} overlap",
                w[0].0, w[1].0
            ));
        }
    }
    for s in &cp.segments {
        let mut at = s.base as u128;
        for b in &s.blocks {
            if b.addr as u128 != at {
                return Err(format!(
                    "its segment at {:#x} is not tiled by its blocks (a block at {:#x}, expected \
                     {:#x})",
                    s.base, b.addr, at
                ));
            }
            if b.size == 0 || b.size % MIN_BLOCK != 0 || b.addr % MIN_BLOCK as usize != 0 {
                return Err(format!(
                    "its block at {:#x} ({} bytes) is not a whole number of 512-byte units",
                    b.addr, b.size
                ));
            }
            if b.requested > b.size {
                return Err(format!(
                    "its block at {:#x} asks for {} bytes but holds {}",
                    b.addr, b.requested, b.size
                ));
            }
            at += b.size as u128;
        }
        if at != s.base as u128 + s.size as u128 {
            return Err(format!(
                "the blocks of its segment at {:#x} cover {} of its {} bytes",
                s.base,
                at - s.base as u128,
                s.size
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{AllocatorConfig, Device, DeviceType, HostMemory, Stream, StreamFilter};

    const DEV: Device = Device {
        kind: DeviceType::Host,
        index: 0,
    };
    const S: Stream = Stream {
        device: DEV,
        index: 1,
    };

    fn allocator() -> CachingAllocator {
        let config = AllocatorConfig {
            debug_checks: true,
            ..AllocatorConfig::default()
        };
        CachingAllocator::new(DEV, Arc::new(HostMemory::new(256 << 20)), None, config).unwrap()
    }

    /// Allocate `sizes` in a new private pool (routing on, as during a capture).
    fn pool_with(a: &CachingAllocator, sizes: &[usize]) -> (MempoolId, Vec<usize>) {
        let id = a.new_pool_id();
        a.begin_allocate_to_pool(id, StreamFilter::Only(S)).unwrap();
        let ptrs = sizes.iter().map(|&n| a.raw_alloc(n, S).unwrap()).collect();
        (id, ptrs)
    }

    fn live(cp: &PoolCheckpoint) -> Vec<(usize, u64)> {
        cp.allocated().map(|b| (b.addr, b.size)).collect()
    }

    #[test]
    fn a_restore_recreates_the_checkpoints_blocks_at_their_addresses() {
        let a = allocator();
        let (id, p) = pool_with(&a, &[1000, 3000, 5000, 700]);
        a.raw_free(p[1]).unwrap();
        let cp = a.checkpoint_pool(id).unwrap();
        assert_eq!(live(&cp).len(), 3);
        let allocated_then = a.allocated_bytes();

        // After the checkpoint: a block dies, new ones are carved (one into the hole).
        a.raw_free(p[0]).unwrap();
        let extra = [a.raw_alloc(2000, S).unwrap(), a.raw_alloc(9000, S).unwrap()];
        assert_ne!(a.checkpoint_pool(id).unwrap(), cp);

        let report = a.restore_pool(&cp).unwrap();
        let mut before = vec![p[2], p[3], extra[0], extra[1]];
        before.sort_unstable();
        assert_eq!(
            report.freed, before,
            "every block allocated before is reported freed"
        );
        assert_eq!(report.allocated, live(&cp));
        assert_eq!(
            a.checkpoint_pool(id).unwrap(),
            cp,
            "the segments are tiled exactly as at the checkpoint"
        );
        assert_eq!(a.allocated_bytes(), allocated_then);
        // The re-created blocks are ordinary allocations: they free, and the pool still works.
        for (ptr, _) in report.allocated {
            a.raw_free(ptr).unwrap();
        }
        assert_eq!(a.checkpoint_pool(id).unwrap().allocated().count(), 0);
        let again = a.raw_alloc(4096, S).unwrap();
        a.raw_free(again).unwrap();
        a.end_allocate_to_pool(id).unwrap();
    }

    #[test]
    fn a_restore_with_nothing_changed_keeps_everything_and_a_second_one_too() {
        let a = allocator();
        let (id, _) = pool_with(&a, &[512, 512, 4 << 20]);
        let cp = a.checkpoint_pool(id).unwrap();
        for _ in 0..2 {
            let r = a.restore_pool(&cp).unwrap();
            assert_eq!(r.freed.len(), 3);
            assert_eq!(a.checkpoint_pool(id).unwrap(), cp);
        }
    }

    #[test]
    fn a_checkpoint_that_does_not_fit_changes_nothing() {
        let a = allocator();
        let (id, p) = pool_with(&a, &[1024, 2048]);
        let cp = a.checkpoint_pool(id).unwrap();
        a.raw_free(p[1]).unwrap();
        let now = a.checkpoint_pool(id).unwrap();
        let seg = cp.segments[0].clone();
        let bad = |f: &dyn Fn(&mut PoolCheckpoint)| {
            let mut c = cp.clone();
            f(&mut c);
            c
        };
        let cases: Vec<(PoolCheckpoint, &str)> = vec![
            (
                bad(&|c| {
                    c.segments[0].base += 1 << 30;
                    c.segments[0]
                        .blocks
                        .iter_mut()
                        .for_each(|b| b.addr += 1 << 30);
                }),
                "no longer in the pool",
            ),
            (bad(&|c| c.segments[0].blocks[0].size += 512), "not tiled"),
            (
                bad(&|c| c.segments[0].blocks[0].requested = u64::MAX),
                "asks for",
            ),
            (bad(&|c| c.segments[0].blocks[0].size = 100), "512-byte"),
            (bad(&|c| c.segments[0].blocks.truncate(1)), "cover"),
            (bad(&|c| c.segments.push(seg.clone())), "overlap"),
            (
                bad(&|c| {
                    c.segments[0].base = usize::MAX - 100;
                    c.segments[0].blocks[0].addr = usize::MAX - 100;
                }),
                "512-byte",
            ),
            (
                PoolCheckpoint {
                    pool: MempoolId(0, 999),
                    segments: Vec::new(),
                },
                "no private pool",
            ),
        ];
        for (c, words) in cases {
            let e = a.restore_pool(&c).unwrap_err().to_string();
            assert!(e.contains(words), "{words:?} not in {e}");
            assert_eq!(a.checkpoint_pool(id).unwrap(), now, "changed by {e}");
        }
    }

    #[test]
    fn checkpoints_of_unknown_pools_are_refused() {
        let a = allocator();
        let e = a.checkpoint_pool(MempoolId(0, 7)).unwrap_err().to_string();
        assert!(e.contains("no private pool (0, 7)"), "{e}");
    }
}
