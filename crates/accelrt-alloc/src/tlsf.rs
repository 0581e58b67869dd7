//! Two-level segregated fit index of free blocks: O(1) insert, remove and search.
//!
//! Sizes are counted in 512-byte units `u`. Units below `SL_COUNT` each have their own class
//! (exact fit); above, each power of two is divided into `SL_COUNT` classes, so a class spans
//! at most 1/32 of its size. A class holds a doubly linked list threaded through the blocks
//! (`free_prev` / `free_next`, kept in the records themselves: [`FreeNode`], which the pool's
//! blocks implement); two bitmaps say which classes are non-empty.
//!
//! Search returns the best fit (smallest block, then lowest address, as PyTorch's ordered
//! sets do) from the request's own class or the first non-empty larger class.

/// "No block": the end of a list, an empty class. The pool uses the same value
/// (`pool::NIL`; checked where its blocks implement [`FreeNode`]).
pub const NIL: u32 = u32::MAX;

/// A record the index threads its lists through: the block's address and size (read), its
/// list links and class (kept by the index). Records are named by their index in a slice.
pub trait FreeNode {
    fn addr(&self) -> usize;
    fn size(&self) -> u64;
    fn free_prev(&self) -> u32;
    fn free_next(&self) -> u32;
    fn class(&self) -> u16;
    fn set_free_prev(&mut self, prev: u32);
    fn set_free_next(&mut self, next: u32);
    fn set_class(&mut self, class: u16);
}

const SL_BITS: u32 = 5;
const SL_COUNT: usize = 1 << SL_BITS;
/// First-level classes: a power of two so that masked indexing needs no bounds check.
const FL_COUNT: usize = 64;
const CLASSES: usize = FL_COUNT * SL_COUNT;
/// At most this many blocks of one class are examined for the best fit, which bounds a
/// search when a class holds very many blocks.
const SCAN_LIMIT: usize = 64;

pub struct Tlsf {
    fl_bitmap: u64,
    sl_bitmap: [u32; FL_COUNT],
    heads: Box<[u32; CLASSES]>,
}

#[inline(always)]
fn flat(fl: usize, sl: usize) -> usize {
    (fl * SL_COUNT + sl) & (CLASSES - 1)
}

#[inline(always)]
fn class_of(size: u64) -> (usize, usize) {
    let u = size >> 9;
    debug_assert!(u > 0);
    let f = 63 - u.leading_zeros();
    if f < SL_BITS {
        (0, u as usize)
    } else {
        let fl = (f - SL_BITS + 1) as usize;
        let sl = ((u >> (f - SL_BITS)) as usize) ^ SL_COUNT;
        (fl, sl)
    }
}

impl Default for Tlsf {
    fn default() -> Self {
        Tlsf {
            fl_bitmap: 0,
            sl_bitmap: [0; FL_COUNT],
            heads: Box::new([NIL; CLASSES]),
        }
    }
}

impl Tlsf {
    #[inline]
    pub fn insert<B: FreeNode>(&mut self, blocks: &mut [B], idx: u32) {
        let (fl, sl) = class_of(blocks[idx as usize].size());
        let class = flat(fl, sl);
        let head = self.heads[class];
        debug_assert!(
            head != idx
                && blocks[idx as usize].free_prev() == NIL
                && blocks[idx as usize].free_next() == NIL,
            "block {idx} is already on a free list: inserting it again would make a cycle"
        );
        {
            let b = &mut blocks[idx as usize];
            b.set_free_prev(NIL);
            b.set_free_next(head);
            b.set_class(class as u16);
        }
        if head != NIL {
            blocks[head as usize].set_free_prev(idx);
        }
        self.heads[class] = idx;
        self.fl_bitmap |= 1 << fl;
        self.sl_bitmap[fl & (FL_COUNT - 1)] |= 1 << sl;
    }

    #[inline]
    pub fn remove<B: FreeNode>(&mut self, blocks: &mut [B], idx: u32) {
        let (prev, next, class) = {
            let b = &blocks[idx as usize];
            (b.free_prev(), b.free_next(), b.class() as usize)
        };
        if next != NIL {
            blocks[next as usize].set_free_prev(prev);
        }
        if prev != NIL {
            blocks[prev as usize].set_free_next(next);
        } else {
            let class = class & (CLASSES - 1);
            debug_assert_eq!(self.heads[class], idx, "free-list head out of sync");
            self.heads[class] = next;
            if next == NIL {
                let (fl, sl) = (class / SL_COUNT, class % SL_COUNT);
                self.sl_bitmap[fl] &= !(1 << sl);
                if self.sl_bitmap[fl] == 0 {
                    self.fl_bitmap &= !(1 << fl);
                }
            }
        }
        let b = &mut blocks[idx as usize];
        b.set_free_prev(NIL);
        b.set_free_next(NIL);
    }

    /// The class index a free block of `size` bytes goes in.
    #[inline(always)]
    pub fn class_index(size: u64) -> u16 {
        let (fl, sl) = class_of(size);
        flat(fl, sl) as u16
    }

    /// Put block `new` in `old`'s place on its free list (same class: `new`'s size maps to
    /// `old`'s class). O(1), no bitmap change: splitting a few MiB off a large free block, or
    /// merging a block into one, usually leaves it in the same class.
    #[inline]
    pub fn replace<B: FreeNode>(&mut self, blocks: &mut [B], old: u32, new: u32) {
        let (prev, next, class) = {
            let o = &blocks[old as usize];
            (o.free_prev(), o.free_next(), o.class())
        };
        debug_assert_eq!(
            Self::class_index(blocks[new as usize].size()),
            class,
            "replace across classes"
        );
        {
            let n = &mut blocks[new as usize];
            n.set_free_prev(prev);
            n.set_free_next(next);
            n.set_class(class);
        }
        if prev != NIL {
            blocks[prev as usize].set_free_next(new);
        } else {
            self.heads[class as usize & (CLASSES - 1)] = new;
        }
        if next != NIL {
            blocks[next as usize].set_free_prev(new);
        }
        let o = &mut blocks[old as usize];
        o.set_free_prev(NIL);
        o.set_free_next(NIL);
    }

    /// The best-fitting free block of at least `size` bytes that `fits` accepts (smallest,
    /// then lowest address), or `NIL`. Does not remove it.
    ///
    /// Classes are ordered by size, so the best fit is in the request's own class or, failing
    /// that, in the first non-empty larger class: only those one or two lists are scanned.
    #[inline]
    pub fn find<B: FreeNode>(&self, blocks: &[B], size: u64, fits: impl Fn(&B) -> bool) -> u32 {
        let (fl, sl) = class_of(size);
        let best = Self::best_in(blocks, self.heads[flat(fl, sl)], size, &fits);
        if best != NIL {
            return best;
        }
        let mut sl_map = if sl + 1 < SL_COUNT {
            self.sl_bitmap[fl] & (!0u32 << (sl + 1))
        } else {
            0
        };
        let mut fl = fl;
        loop {
            if sl_map == 0 {
                let fl_map = self.fl_bitmap & (!0u64).checked_shl(fl as u32 + 1).unwrap_or(0);
                if fl_map == 0 {
                    return NIL;
                }
                fl = fl_map.trailing_zeros() as usize;
                sl_map = self.sl_bitmap[fl & (FL_COUNT - 1)];
            }
            let sl = sl_map.trailing_zeros() as usize;
            let best = Self::best_in(blocks, self.heads[flat(fl, sl)], size, &fits);
            if best != NIL {
                return best;
            }
            sl_map &= sl_map - 1;
        }
    }

    #[inline]
    fn best_in<B: FreeNode>(blocks: &[B], head: u32, size: u64, fits: &impl Fn(&B) -> bool) -> u32 {
        let mut best = NIL;
        let mut best_key = (u64::MAX, usize::MAX);
        let mut cur = head;
        let mut seen = 0;
        while cur != NIL && seen < SCAN_LIMIT {
            let b = &blocks[cur as usize];
            if b.size() >= size && (b.size(), b.addr()) < best_key && fits(b) {
                best = cur;
                best_key = (b.size(), b.addr());
            }
            cur = b.free_next();
            seen += 1;
        }
        best
    }

    /// Every free block of at least `min_size` bytes, in increasing class order (walks only
    /// the classes that can hold one, found through the bitmaps).
    ///
    /// # Panics
    /// When the lists hold more entries than there are blocks: a cycle, which means a block
    /// was put on a free list twice and would be handed out twice. The walk is bounded so
    /// that this is a panic naming the fault, not an endless loop filling `out`.
    pub fn at_least<B: FreeNode>(&self, blocks: &[B], min_size: u64, out: &mut Vec<u32>) {
        let mut budget = blocks.len();
        let (fl0, sl0) = class_of(min_size.max(512));
        let mut fl_map = self.fl_bitmap & (!0u64).checked_shl(fl0 as u32).unwrap_or(0);
        while fl_map != 0 {
            let fl = fl_map.trailing_zeros() as usize;
            fl_map &= fl_map - 1;
            let mut sl_map = self.sl_bitmap[fl & (FL_COUNT - 1)];
            if fl == fl0 {
                sl_map &= !0u32 << sl0;
            }
            while sl_map != 0 {
                let sl = sl_map.trailing_zeros() as usize;
                sl_map &= sl_map - 1;
                let mut cur = self.heads[flat(fl, sl)];
                while cur != NIL {
                    assert!(
                        budget > 0,
                        "free lists of {} blocks contain a cycle (a block freed twice)",
                        blocks.len()
                    );
                    budget -= 1;
                    let b = &blocks[cur as usize];
                    if b.size() >= min_size {
                        out.push(cur);
                    }
                    cur = b.free_next();
                }
            }
        }
    }

    /// Whether `idx` is reachable from its class head (for the invariant checker).
    pub fn contains<B: FreeNode>(&self, blocks: &[B], idx: u32) -> bool {
        let (fl, sl) = class_of(blocks[idx as usize].size());
        let mut cur = self.heads[flat(fl, sl)];
        let mut steps = 0usize;
        while cur != NIL {
            if cur == idx {
                return true;
            }
            cur = blocks[cur as usize].free_next();
            steps += 1;
            if steps > blocks.len() {
                return false; // a cycle: reported by the checker as missing
            }
        }
        false
    }

    /// Every block on every list, with a cycle guard (for the invariant checker).
    pub fn all<B: FreeNode>(&self, blocks: &[B]) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        for fl in 0..FL_COUNT {
            for sl in 0..SL_COUNT {
                let head = self.heads[flat(fl, sl)];
                let bit = self.sl_bitmap[fl] & (1 << sl) != 0;
                if bit != (head != NIL) {
                    return Err(format!(
                        "class ({fl},{sl}): bitmap says {bit}, head is {head}"
                    ));
                }
                let mut cur = head;
                let mut prev = NIL;
                while cur != NIL {
                    let b = &blocks[cur as usize];
                    if class_of(b.size()) != (fl, sl) || b.class() as usize != flat(fl, sl) {
                        return Err(format!(
                            "block {cur} of size {} sits in class ({fl},{sl})",
                            b.size()
                        ));
                    }
                    if b.free_prev() != prev {
                        return Err(format!(
                            "block {cur}: free_prev {} but reached from {prev}",
                            b.free_prev()
                        ));
                    }
                    out.push(cur);
                    if out.len() > blocks.len() {
                        return Err("free lists contain a cycle".into());
                    }
                    prev = cur;
                    cur = b.free_next();
                }
            }
            if (self.fl_bitmap & (1 << fl) != 0) != (self.sl_bitmap[fl] != 0) {
                return Err(format!("first-level bitmap out of sync at {fl}"));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A free block as the index sees it (the pool's `Block` has more fields, none of which
    /// the index reads).
    #[derive(Debug, Clone)]
    struct Node {
        addr: usize,
        size: u64,
        free_prev: u32,
        free_next: u32,
        class: u16,
    }

    impl FreeNode for Node {
        fn addr(&self) -> usize {
            self.addr
        }
        fn size(&self) -> u64 {
            self.size
        }
        fn free_prev(&self) -> u32 {
            self.free_prev
        }
        fn free_next(&self) -> u32 {
            self.free_next
        }
        fn class(&self) -> u16 {
            self.class
        }
        fn set_free_prev(&mut self, prev: u32) {
            self.free_prev = prev;
        }
        fn set_free_next(&mut self, next: u32) {
            self.free_next = next;
        }
        fn set_class(&mut self, class: u16) {
            self.class = class;
        }
    }

    fn free_block(addr: usize, size: u64) -> Node {
        Node {
            addr,
            size,
            free_prev: NIL,
            free_next: NIL,
            class: 0,
        }
    }

    /// A block on a free list twice makes a cycle: the checker's walk reports it, and the
    /// idle-page scan (`at_least`, reached from `empty_cache`) stops with a panic naming it
    /// instead of filling memory forever (issue 13 item 4).
    #[test]
    fn a_cycle_on_a_free_list_is_reported_not_walked_forever() {
        let mut blocks = vec![free_block(0, 4096), free_block(4096, 4096)];
        let mut t = Tlsf::default();
        t.insert(&mut blocks, 0);
        t.insert(&mut blocks, 1); // the list is 1 -> 0
        let mut out = Vec::new();
        t.at_least(&blocks, 512, &mut out);
        assert_eq!(out, [1, 0]);
        assert_eq!(t.all(&blocks), Ok(vec![1, 0]));

        blocks[0].free_next = 1; // 1 -> 0 -> 1 -> ...
        let err = t.all(&blocks).unwrap_err();
        assert!(
            err.contains("cycle") || err.contains("free_prev"),
            "the checker names the fault: {err}"
        );
        let walked = std::panic::catch_unwind(|| {
            let mut out = Vec::new();
            t.at_least(&blocks, 512, &mut out);
            out.len()
        });
        let message = *walked
            .expect_err("a cycle is a panic, not an endless walk")
            .downcast::<String>()
            .unwrap();
        assert!(message.contains("cycle"), "{message}");
    }

    #[test]
    fn classes_are_monotonic_and_bounded() {
        let mut last = (0, 0);
        let mut size = 512u64;
        while size < (1u64 << 48) {
            let c = class_of(size);
            assert!(c >= last, "class of {size} went backwards");
            assert!(c.0 < FL_COUNT && c.1 < SL_COUNT);
            last = c;
            size += size / 7 + 512;
        }
    }
}
