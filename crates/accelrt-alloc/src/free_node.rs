//! The pool's blocks as nodes of the TLSF free lists: `tlsf` and `pool` meet here, so
//! neither imports the other's types (the pool holds a `Tlsf`; the index sees only
//! [`FreeNode`]).

use crate::pool::{self, Block};
use crate::tlsf::{self, FreeNode};

// The pool and the index end their lists with the same value.
const _: () = assert!(pool::NIL == tlsf::NIL);

impl FreeNode for Block {
    #[inline(always)]
    fn addr(&self) -> usize {
        self.addr
    }
    #[inline(always)]
    fn size(&self) -> u64 {
        self.size
    }
    #[inline(always)]
    fn free_prev(&self) -> u32 {
        self.free_prev
    }
    #[inline(always)]
    fn free_next(&self) -> u32 {
        self.free_next
    }
    #[inline(always)]
    fn class(&self) -> u16 {
        self.class
    }
    #[inline(always)]
    fn set_free_prev(&mut self, prev: u32) {
        self.free_prev = prev;
    }
    #[inline(always)]
    fn set_free_next(&mut self, next: u32) {
        self.free_next = next;
    }
    #[inline(always)]
    fn set_class(&mut self, class: u16) {
        self.class = class;
    }
}
