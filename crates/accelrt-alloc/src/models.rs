//! Loom models of the pool lock protocol (`RUSTFLAGS="--cfg accelrt_loom" cargo test -p
//! accelrt-alloc --lib loom`; `.ci/run` runs them). The page map is modelled on its real code in
//! `pagemap.rs`; the pool's locking is plain `Mutex` use spread over `caching.rs` and
//! `caching/expandable.rs`, so its protocol is modelled here, step for step:
//!
//! - an allocation that maps pages (`alloc_slow_vm` / `finish_unmapped`): under the pool lock,
//!   take a block off the free list and mark it allocated, and hold it out of the live map
//!   (`hold_in_flight`); unlock; map; on success lock and publish it in the live map
//!   (`publish_mapped`), on failure lock and put it back on the free list (`unwind_unmapped`);
//! - a free (`raw_free`): under the pool lock, remove the address from the live map; only a
//!   block found there goes back to the free list.
//!
//! The property: a block is never on the free list twice, and never on it while a caller
//! holds it. `HOLD = false` is the protocol before the fix of issue 13 item 4 (the block was
//! live while in flight): loom finds the interleaving that breaks it.

use loom::sync::{Arc, Mutex};

#[derive(Default)]
struct Pool {
    free: Vec<u32>,
    live: Vec<u32>,
    /// What happened, in lock order.
    log: Vec<&'static str>,
}

/// One allocation that maps pages, racing a stale free of the same address; `mapping_fails`
/// chooses the outcome of the map step.
fn protocol(hold: bool, mapping_fails: bool) {
    loom::model(move || {
        let block = 7u32;
        let pool = Arc::new(Mutex::new(Pool {
            free: vec![block],
            ..Pool::default()
        }));
        let allocating = {
            let pool = pool.clone();
            loom::thread::spawn(move || {
                let b = {
                    let mut p = pool.lock().unwrap();
                    let b = p.free.pop().expect("a free block");
                    if !hold {
                        p.live.push(b); // carved: live at once (before the fix)
                    }
                    b
                };
                // ... the pool lock is released while pages are mapped ...
                let mut p = pool.lock().unwrap();
                if mapping_fails {
                    if !hold {
                        p.live.retain(|&x| x != b); // the result was not looked at
                    }
                    p.free.push(b);
                    None
                } else {
                    if hold {
                        p.live.push(b);
                    }
                    p.log.push("handed out");
                    Some(b)
                }
            })
        };
        let stale_free = {
            let pool = pool.clone();
            loom::thread::spawn(move || {
                let mut p = pool.lock().unwrap();
                if let Some(i) = p.live.iter().position(|&x| x == block) {
                    p.live.remove(i);
                    p.free.push(block);
                    p.log.push("freed");
                }
            })
        };
        let handed_out = allocating.join().unwrap();
        stale_free.join().unwrap();
        let p = pool.lock().unwrap();
        let on_free_list = p.free.iter().filter(|&&x| x == block).count();
        assert!(on_free_list <= 1, "block {block} is on the free list twice");
        if p.log.contains(&"freed") {
            // A free may only take a block its caller got: the stale free of a buggy caller
            // after the block was handed out again is its own use-after-free, not ours.
            assert_eq!(
                p.log,
                ["handed out", "freed"],
                "block {block} was freed before it was handed out"
            );
        } else if handed_out.is_some() {
            assert_eq!(
                on_free_list, 0,
                "block {block} is handed out and free at once"
            );
        }
    });
}

#[test]
fn loom_an_in_flight_block_is_never_freed_by_a_stale_free() {
    protocol(true, false);
    protocol(true, true);
}

#[test]
#[should_panic(expected = "on the free list twice")]
fn loom_finds_the_double_release_without_the_hold() {
    protocol(false, true);
}

#[test]
#[should_panic(expected = "before it was handed out")]
fn loom_finds_the_double_hand_out_without_the_hold() {
    protocol(false, false);
}
