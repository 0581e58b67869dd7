//! Private memory pools (PyTorch's `MempoolId`, used by graph capture and `MemPool`).
//!
//! A private pool is a pool of its own, in the slots of the pool table past the stream pools.
//! While `begin_allocate_to_pool(id, filter)` is in force, allocations on streams the filter
//! accepts come from that pool; frees always return a block to the pool that owns it (the
//! page map says which), so memory a captured graph used stays reserved for its replays.
//! `release_pool` drops a use; at zero, the pool gives its cached segments back, and the
//! rest as their blocks are freed; an emptied pool's slot is reused.
//!
//! Private pools use plain segments, as PyTorch's do: a graph's addresses must stay valid for
//! replays, and there is nothing to gain from remapping memory that is reserved anyway.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use parking_lot::Mutex;

use super::RareFlags;
use super::{CachingAllocator, StreamPool, MAX_STREAM_POOLS};
use crate::error::{Error, Result};
use crate::graph::MempoolId;
use crate::pool::PoolState;
use crate::stream::Stream;

/// Private pools an allocator can hold at once.
pub const MAX_PRIVATE_POOLS: usize = 1024;

/// Which streams' allocations go to a private pool.
#[derive(Clone)]
pub enum StreamFilter {
    /// One stream (graph capture).
    Only(Stream),
    /// Every stream of the device.
    All,
    /// Streams the function accepts (PyTorch's `std::function<bool(cudaStream_t)>`).
    Custom(Arc<dyn Fn(Stream) -> bool + Send + Sync>),
}

impl StreamFilter {
    fn accepts(&self, stream: Stream) -> bool {
        match self {
            StreamFilter::Only(s) => *s == stream,
            StreamFilter::All => true,
            StreamFilter::Custom(f) => f(stream),
        }
    }
}

impl std::fmt::Debug for StreamFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamFilter::Only(s) => write!(f, "Only({s})"),
            StreamFilter::All => f.write_str("All"),
            StreamFilter::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

struct Entry {
    slot: usize,
    use_count: u32,
}

#[derive(Default)]
pub(super) struct PrivatePools {
    ids: HashMap<MempoolId, Entry>,
    routes: Vec<(MempoolId, usize, StreamFilter)>,
    free_slots: Vec<usize>,
    next_slot: usize,
    next_id: u64,
}

impl CachingAllocator {
    /// A fresh private pool id (PyTorch's `graph_pool_handle()`), not yet holding memory.
    pub fn new_pool_id(&self) -> MempoolId {
        let mut p = self.private.lock();
        p.next_id += 1;
        MempoolId(0, p.next_id)
    }

    /// Route allocations on streams `filter` accepts to private pool `id` (created on first
    /// use, with a use count of 1), until [`CachingAllocator::end_allocate_to_pool`].
    pub fn begin_allocate_to_pool(&self, id: MempoolId, filter: StreamFilter) -> Result<()> {
        self.gated("begin_allocate_to_pool", || {
            if id.is_none() {
                return Err(Error::InvalidArgument(
                    "pool id (0, 0) is not a pool: create one with new_pool_id()".into(),
                ));
            }
            if let StreamFilter::Only(s) = &filter {
                if s.device != self.device {
                    return Err(Error::InvalidArgument(format!(
                        "stream {s} is not on {}",
                        self.device
                    )));
                }
            }
            let mut p = self.private.lock();
            let slot = match p.ids.get(&id) {
                Some(e) if e.use_count == 0 => return Err(Self::released_pool(id)),
                Some(e) => e.slot,
                None => {
                    let slot = match p.free_slots.pop() {
                        Some(s) => s,
                        None if p.next_slot < MAX_PRIVATE_POOLS => {
                            p.next_slot += 1;
                            p.next_slot - 1
                        }
                        None => {
                            return Err(Error::InvalidArgument(format!(
                                "{MAX_PRIVATE_POOLS} private pools are in use on {}: release some with release_pool",
                                self.device
                            )))
                        }
                    };
                    p.ids.insert(id, Entry { slot, use_count: 1 });
                    slot
                }
            };
            let index = MAX_STREAM_POOLS + slot;
            let pool = self.pools[index].get_or_init(|| {
                let stream = Stream {
                    device: self.device,
                    index: index as u32,
                };
                Box::new(StreamPool {
                    stream,
                    private: true,
                    state: crate::pool_lock::PoolMutex::new(PoolState::new()),
                    pending_queries: Mutex::new(()),
                    fence_queries: Mutex::new(()),
                })
            });
            pool.state.lock().open_private(id);
            self.pools_in_use.fetch_max(index + 1, Relaxed);
            p.routes.push((id, index, filter));
            self.rare.set(RareFlags::ROUTES, !p.routes.is_empty());
            Ok(())
        })
    }

    /// Whether a graph capture may be underway: allocations are routed to a private pool
    /// (PyTorch routes from the start of a capture, and inside `use_mem_pool`, its
    /// `captures_underway`). While one is, the allocator neither waits for the device nor
    /// queries or records events: on CUDA such a call from any thread invalidates a capture
    /// in the default (global) mode, and every later call on the stream fails with
    /// "operation not permitted when stream is capturing". Pending frees wait, cached memory
    /// is not released before an out-of-memory error, as in PyTorch.
    #[inline]
    pub(crate) fn capturing(&self) -> bool {
        self.rare.has(RareFlags::ROUTES)
    }

    /// Stop routing allocations to private pool `id`.
    pub fn end_allocate_to_pool(&self, id: MempoolId) -> Result<()> {
        let mut p = self.private.lock();
        if !p.ids.contains_key(&id) {
            return Err(Self::unknown_pool(id));
        }
        p.routes.retain(|(r, _, _)| *r != id);
        self.rare.set(RareFlags::ROUTES, !p.routes.is_empty());
        Ok(())
    }

    /// Add a use of private pool `id` (a second graph sharing it, a `MemPool` object).
    pub fn retain_pool(&self, id: MempoolId) -> Result<()> {
        let mut p = self.private.lock();
        let e = p.ids.get_mut(&id).ok_or_else(|| Self::unknown_pool(id))?;
        if e.use_count == 0 {
            return Err(Self::released_pool(id));
        }
        e.use_count = e.use_count.checked_add(1).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "private pool ({}, {}) already has {} uses: release some first",
                id.0,
                id.1,
                u32::MAX
            ))
        })?;
        Ok(())
    }

    /// Drop a use of private pool `id`. At zero, its cached memory goes back to the device
    /// now and the rest as its blocks are freed.
    pub fn release_pool(&self, id: MempoolId) -> Result<()> {
        self.gated("release_pool", || {
            let index = {
                let mut p = self.private.lock();
                let e = p.ids.get_mut(&id).ok_or_else(|| Self::unknown_pool(id))?;
                // A released pool still draining (blocks outlived its last use) has no use left
                // to drop: a second release is an error, not an underflow (issue 13 item 5).
                if e.use_count == 0 {
                    return Err(Self::released_pool(id));
                }
                e.use_count -= 1;
                if e.use_count > 0 {
                    return Ok(());
                }
                p.routes.retain(|(r, _, _)| *r != id);
                self.rare.set(RareFlags::ROUTES, !p.routes.is_empty());
                MAX_STREAM_POOLS + p.ids[&id].slot
            };
            let pool = self.pools[index]
                .get()
                .expect("a registered private pool exists");
            pool.state.lock().mark_released();
            self.drain_released_pool(pool);
            Ok(())
        })
    }

    /// Make the free range `[ptr, ptr + size)` of private pool `id` one allocated block again,
    /// as if `raw_alloc` had returned `ptr` for `requested` bytes: statistics, history and the
    /// live map as for an allocation. PyTorch's CUDA graph trees put a pool back to a
    /// checkpoint this way (`setCheckpointPoolState`). The range must lie in one free block of
    /// the pool; anything else is an error naming why, and changes nothing.
    pub fn claim_block(&self, id: MempoolId, ptr: usize, size: u64, requested: u64) -> Result<()> {
        self.gated("claim_block", || {
            let why = |m: &str| {
                Error::InvalidArgument(format!(
                    "cannot claim {ptr:#x} ({size} bytes) in private pool {id:?} on {}: {m}",
                    self.device
                ))
            };
            if size == 0 || size % crate::MIN_BLOCK != 0 || ptr % crate::MIN_BLOCK as usize != 0 {
                return Err(why(
                    "blocks are whole multiples of 512 bytes at 512-byte boundaries",
                ));
            }
            if requested > size {
                return Err(why("more bytes requested than the block holds"));
            }
            let index = {
                let p = self.private.lock();
                MAX_STREAM_POOLS + p.ids.get(&id).ok_or_else(|| Self::unknown_pool(id))?.slot
            };
            let pool = self.pools[index]
                .get()
                .expect("a registered private pool exists");
            let mut st = pool.state.lock();
            let block = st.claim(ptr, size, requested).map_err(|m| why(&m))?;
            if self.history.enabled() {
                self.note_alloc(&mut st, block, pool.stream.index);
            }
            drop(st);
            Ok(())
        })
    }

    /// The pool slot of private pool `id`, or `None` if there is no such pool.
    pub(super) fn private_pool_index(&self, id: MempoolId) -> Option<usize> {
        self.private
            .lock()
            .ids
            .get(&id)
            .map(|e| MAX_STREAM_POOLS + e.slot)
    }

    /// Uses of private pool `id`, or `None` if there is no such pool.
    pub fn pool_use_count(&self, id: MempoolId) -> Option<u32> {
        self.private.lock().ids.get(&id).map(|e| e.use_count)
    }

    fn released_pool(id: MempoolId) -> Error {
        Error::InvalidArgument(format!(
            "private pool ({}, {}) was already released (its use count is 0; its memory goes \
             back as its remaining blocks are freed): release a pool once per use, and use a \
             new pool id for new work",
            id.0, id.1
        ))
    }

    fn unknown_pool(id: MempoolId) -> Error {
        Error::InvalidArgument(format!(
            "no private pool ({}, {}): it was never begun or was released",
            id.0, id.1
        ))
    }

    /// The private pool routing `stream`'s allocations, if any.
    #[cold]
    pub(super) fn routed_pool(&self, stream: Stream) -> Option<(u32, &StreamPool)> {
        let p = self.private.lock();
        let index = p
            .routes
            .iter()
            .rev()
            .find(|(_, _, f)| f.accepts(stream))
            .map(|&(_, i, _)| i)?;
        Some((
            index as u32,
            self.pools[index].get().expect("a routed pool exists"),
        ))
    }

    /// Give a released pool's whole cached segments back; recycle its slot once empty.
    pub(super) fn drain_released_pool(&self, pool: &StreamPool) {
        if self.capturing() {
            // Draining waits for the pool's streams, which a capture forbids: the next free
            // of one of its blocks, or `empty_cache`, after the capture gives the memory back.
            return;
        }
        // Blocks of a private pool may have been used on any stream: wait for the device's
        // streams that allocated from it, as recorded.
        let users: Vec<Stream> = pool.state.lock().users().to_vec();
        if let Some(events) = &self.events {
            for s in users {
                if let Ok(t) = events.record(s) {
                    let _ = events.synchronize(t);
                    events.release(t);
                }
            }
        }
        let (freed, empty, id) = {
            let mut st = pool.state.lock();
            st.flush_recent();
            let freed = st.take_releasable_segments();
            (freed, st.segments().is_empty(), st.pool_id())
        };
        freed
            .into_iter()
            .for_each(|s| self.give_back(s, pool.stream.index));
        if empty {
            let mut p = self.private.lock();
            if p.ids.get(&id).is_some_and(|e| e.use_count == 0) {
                let slot = p.ids.remove(&id).expect("checked above").slot;
                p.free_slots.push(slot);
                pool.state.lock().close_private();
            }
        }
    }
}
