//! Which pool owns an address: a lock-free two-level radix over 2 MiB chunks.
//!
//! `raw_free(ptr)` is not told the stream, so it must find the pool from the address alone,
//! without a lock that all streams share. Segments are at least 2 MiB, so a 2 MiB chunk of
//! address space holds pieces of at most two segments: the tail of one and the head of the
//! next. Each chunk's entry packs both owners and the boundary between them into one
//! `AtomicU64`. Entries change only on the slow path (segment taken or given back), under a
//! writer mutex; readers do two acquire loads.
//!
//! Addresses at or above 2^48 (5-level page tables) fall back to a locked ordered map.

use std::collections::BTreeMap;

use sync::{AtomicPtr, AtomicU64, Mutex, Ordering, RwLock};

/// The synchronization the map uses: std atomics and parking_lot locks, or loom's under
/// `--cfg accelrt_loom` (the models at the end of this file), with parking_lot's API.
#[cfg(not(accelrt_loom))]
mod sync {
    pub use parking_lot::{Mutex, RwLock};
    pub use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
}

#[cfg(accelrt_loom)]
mod sync {
    pub use loom::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

    pub struct Mutex<T>(loom::sync::Mutex<T>);
    impl<T> Mutex<T> {
        pub fn new(v: T) -> Self {
            Mutex(loom::sync::Mutex::new(v))
        }
        pub fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.0.lock().expect("no panic while locked")
        }
    }

    pub struct RwLock<T>(loom::sync::RwLock<T>);
    impl<T> RwLock<T> {
        pub fn new(v: T) -> Self {
            RwLock(loom::sync::RwLock::new(v))
        }
        pub fn read(&self) -> loom::sync::RwLockReadGuard<'_, T> {
            self.0.read().expect("no panic while locked")
        }
        pub fn write(&self) -> loom::sync::RwLockWriteGuard<'_, T> {
            self.0.write().expect("no panic while locked")
        }
    }
}

const CHUNK_SHIFT: u32 = 21;
/// Address bits the radix covers (5-level page tables put addresses above: a locked map).
/// The loom models shrink it to 32 MiB (4 leaves of 4 chunks) so every interleaving can be
/// explored; the code is the same.
#[cfg(not(accelrt_loom))]
const ADDRESS_BITS: u32 = 48;
#[cfg(not(accelrt_loom))]
const LEAF_BITS: u32 = 14;
#[cfg(accelrt_loom)]
const ADDRESS_BITS: u32 = 25;
#[cfg(accelrt_loom)]
const LEAF_BITS: u32 = 2;
const ROOT_BITS: u32 = ADDRESS_BITS - CHUNK_SHIFT - LEAF_BITS;
const LEAF_LEN: usize = 1 << LEAF_BITS;
const ROOT_LEN: usize = 1 << ROOT_BITS;
const RADIX_LIMIT: usize = 1 << ADDRESS_BITS;
/// Offsets inside a chunk are kept in 512-byte units (12 bits).
const UNIT_SHIFT: u32 = 9;

struct Leaf([AtomicU64; LEAF_LEN]);

/// Entry layout: bits 0..16 low owner + 1, 16..32 high owner + 1 (0 = none), 32..44 the
/// boundary offset in 512-byte units. Addresses at or above the boundary belong to the high
/// owner, those below to the low owner.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct Entry {
    low: u32,
    high: u32,
    boundary: u32,
}

impl Entry {
    fn pack(self) -> u64 {
        self.low as u64 | (self.high as u64) << 16 | (self.boundary as u64) << 32
    }
    #[inline(always)]
    fn unpack(v: u64) -> Entry {
        Entry {
            low: (v & 0xffff) as u32,
            high: ((v >> 16) & 0xffff) as u32,
            boundary: ((v >> 32) & 0xfff) as u32,
        }
    }
}

pub struct PageMap {
    root: Box<[AtomicPtr<Leaf>]>,
    writer: Mutex<()>,
    /// Segments above the radix range: base -> (end, owner).
    high: RwLock<BTreeMap<usize, (usize, u32)>>,
}

impl PageMap {
    pub fn new() -> Self {
        PageMap {
            root: (0..ROOT_LEN)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
            writer: Mutex::new(()),
            high: RwLock::new(BTreeMap::new()),
        }
    }

    /// The owner (pool index, below 65535) of `addr`, if a segment was registered there.
    #[inline(always)]
    pub fn lookup(&self, addr: usize) -> Option<u32> {
        if addr >= RADIX_LIMIT {
            return self.lookup_high(addr);
        }
        let chunk = addr >> CHUNK_SHIFT;
        let leaf = self.root[chunk >> LEAF_BITS].load(Ordering::Acquire);
        if leaf.is_null() {
            return None;
        }
        // SAFETY: leaves are created once, never freed before the map is dropped, and only
        // published after full initialisation (release store paired with the acquire load).
        let e = Entry::unpack(unsafe { &*leaf }.0[chunk & (LEAF_LEN - 1)].load(Ordering::Acquire));
        let offset = ((addr & ((1 << CHUNK_SHIFT) - 1)) >> UNIT_SHIFT) as u32;
        let owner = if offset >= e.boundary { e.high } else { e.low };
        owner.checked_sub(1)
    }

    #[cold]
    fn lookup_high(&self, addr: usize) -> Option<u32> {
        let map = self.high.read();
        map.range(..=addr)
            .next_back()
            .and_then(|(_, &(end, owner))| (addr < end).then_some(owner))
    }

    fn leaf(&self, chunk: usize) -> &Leaf {
        let slot = &self.root[chunk >> LEAF_BITS];
        let mut leaf = slot.load(Ordering::Acquire);
        if leaf.is_null() {
            let fresh: Box<Leaf> = Box::new(Leaf(std::array::from_fn(|_| AtomicU64::new(0))));
            leaf = Box::into_raw(fresh);
            // Writers are serialised by `writer`, so a plain release store publishes it.
            slot.store(leaf, Ordering::Release);
        }
        // SAFETY: non-null leaves stay allocated until `Drop`, which needs `&mut self`.
        unsafe { &*leaf }
    }

    fn update(&self, chunk: usize, f: impl FnOnce(&mut Entry)) {
        let cell = &self.leaf(chunk).0[chunk & (LEAF_LEN - 1)];
        let mut e = Entry::unpack(cell.load(Ordering::Relaxed));
        f(&mut e);
        cell.store(e.pack(), Ordering::Release);
    }

    /// Record that `[base, base + size)` belongs to `owner`. `size >= 2 MiB`, 512-aligned.
    pub fn insert(&self, base: usize, size: usize, owner: u32) {
        self.set(base, size, Some(owner));
    }

    /// Forget the segment `[base, base + size)`.
    pub fn remove(&self, base: usize, size: usize) {
        self.set(base, size, None);
    }

    fn set(&self, base: usize, size: usize, owner: Option<u32>) {
        debug_assert!(owner.is_none_or(|o| o < 0xffff));
        let _w = self.writer.lock();
        let end = base + size;
        if end > RADIX_LIMIT {
            let mut map = self.high.write();
            match owner {
                Some(o) => map.insert(base, (end, o)),
                None => map.remove(&base),
            };
            return;
        }
        let tag = owner.map_or(0, |o| o + 1);
        let first = base >> CHUNK_SHIFT;
        let last = (end - 1) >> CHUNK_SHIFT;
        let mask = (1usize << CHUNK_SHIFT) - 1;
        for chunk in first..=last {
            let starts_here = chunk == first && base & mask != 0;
            let ends_here = chunk == last && end & mask != 0;
            self.update(chunk, |e| {
                if starts_here {
                    // The segment holds the top of this chunk, from `base` on.
                    e.boundary = ((base & mask) >> UNIT_SHIFT) as u32;
                    e.high = tag;
                } else if ends_here {
                    // The segment holds the bottom of this chunk, up to `end`.
                    e.low = tag;
                    if e.high == 0 || owner.is_some() && e.boundary == 0 {
                        e.boundary = ((end & mask) >> UNIT_SHIFT) as u32;
                    }
                } else {
                    *e = Entry {
                        low: 0,
                        high: tag,
                        boundary: 0,
                    };
                }
            });
        }
    }
}

impl Drop for PageMap {
    fn drop(&mut self) {
        for slot in self.root.iter() {
            let leaf = slot.load(Ordering::Acquire);
            if !leaf.is_null() {
                // SAFETY: the leaf came from `Box::into_raw` in `leaf()` and is dropped once,
                // here, with no reader left (`&mut self`).
                drop(unsafe { Box::from_raw(leaf) });
            }
        }
    }
}

#[cfg(all(test, not(accelrt_loom)))]
mod tests {
    use super::*;
    const MIB: usize = 1 << 20;

    #[test]
    fn aligned_and_unaligned_segments_share_chunks_correctly() {
        let m = PageMap::new();
        let a = 64 * MIB + 512 * 3; // unaligned start
        m.insert(a, 2 * MIB, 1);
        let b = a + 2 * MIB; // starts where `a` ends, mid-chunk
        m.insert(b, 4 * MIB, 2);
        let c = 128 * MIB; // aligned
        m.insert(c, 20 * MIB, 3);
        // (address, owner)
        let table = [
            (a, Some(1)),
            (a + 2 * MIB - 512, Some(1)),
            (b, Some(2)),
            (b + 4 * MIB - 512, Some(2)),
            (a - 512, None),
            (c, Some(3)),
            (c + 20 * MIB - 512, Some(3)),
            (c + 20 * MIB, None),
            (1 << 50, None),
        ];
        for (addr, want) in table {
            assert_eq!(m.lookup(addr), want, "address {addr:#x}");
        }
        m.remove(a, 2 * MIB);
        assert_eq!(m.lookup(a), None);
        assert_eq!(
            m.lookup(b),
            Some(2),
            "the neighbour sharing a chunk is kept"
        );
        m.insert(1 << 50, 4 * MIB, 7);
        assert_eq!(m.lookup((1 << 50) + MIB), Some(7));
        m.remove(1 << 50, 4 * MIB);
        assert_eq!(m.lookup((1 << 50) + MIB), None);
    }
}

/// Every interleaving of readers and writers, under loom: `RUSTFLAGS="--cfg accelrt_loom"
/// cargo test -p accelrt-alloc --lib loom` (`.ci/run` runs it). The map is the real code above,
/// with a 32 MiB radix.
#[cfg(all(test, accelrt_loom))]
mod loom_models {
    use super::*;
    use loom::sync::Arc;
    const MIB: usize = 1 << 20;

    /// A reader racing the writer that creates a leaf sees nothing or the new owner: the
    /// leaf's entries are initialised before the pointer to it is published.
    #[test]
    fn loom_a_reader_never_sees_a_leaf_before_it_is_initialised() {
        loom::model(|| {
            let m = Arc::new(PageMap::new());
            let writer = {
                let m = m.clone();
                loom::thread::spawn(move || m.insert(8 * MIB, 4 * MIB, 1))
            };
            let reader = {
                let m = m.clone();
                loom::thread::spawn(move || {
                    let seen = m.lookup(8 * MIB + 512);
                    assert!(matches!(seen, None | Some(1)), "{seen:?}");
                })
            };
            writer.join().unwrap();
            reader.join().unwrap();
            assert_eq!(m.lookup(8 * MIB + 512), Some(1));
        });
    }

    /// Two segments share a chunk (the tail of X, the head of Y). While Y comes and goes, a
    /// lookup of X's tail always finds X, and one of Y's head finds Y or nothing.
    #[test]
    fn loom_a_neighbour_coming_and_going_never_hides_a_segment() {
        loom::model(|| {
            let x = 2 * MIB + 512 * 3; // ends mid-chunk, at 4 MiB + 1536
            let m = Arc::new(PageMap::new());
            m.insert(x, 2 * MIB, 1);
            let y = x + 2 * MIB;
            let writer = {
                let m = m.clone();
                loom::thread::spawn(move || {
                    m.insert(y, 4 * MIB, 2);
                    m.remove(y, 4 * MIB);
                })
            };
            let reader = {
                let m = m.clone();
                loom::thread::spawn(move || {
                    for _ in 0..2 {
                        assert_eq!(m.lookup(x + 2 * MIB - 512), Some(1), "X's tail");
                        let head = m.lookup(y);
                        assert!(matches!(head, None | Some(2)), "Y's head: {head:?}");
                    }
                })
            };
            writer.join().unwrap();
            reader.join().unwrap();
            assert_eq!(m.lookup(y), None);
            assert_eq!(m.lookup(x), Some(1));
        });
    }

    /// An address given back by one pool and taken by another: a racing lookup sees the old
    /// owner, nothing, or the new owner (then `raw_free` checks that pool's live map).
    #[test]
    fn loom_an_address_changing_owner_is_seen_as_old_none_or_new() {
        loom::model(|| {
            let m = Arc::new(PageMap::new());
            m.insert(16 * MIB, 2 * MIB, 1);
            let writer = {
                let m = m.clone();
                loom::thread::spawn(move || {
                    m.remove(16 * MIB, 2 * MIB);
                    m.insert(16 * MIB, 2 * MIB, 2);
                })
            };
            let reader = {
                let m = m.clone();
                loom::thread::spawn(move || {
                    let a = m.lookup(16 * MIB + MIB);
                    let b = m.lookup(16 * MIB + MIB);
                    assert!(matches!(a, None | Some(1) | Some(2)), "{a:?}");
                    // Once the new owner is seen, the old one never comes back.
                    assert!(!(a == Some(2) && b == Some(1)), "{a:?} then {b:?}");
                })
            };
            writer.join().unwrap();
            reader.join().unwrap();
        });
    }
}
