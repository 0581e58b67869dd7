use super::*;

/// A block's age is when its bytes were last in use: a free block split, or two merged,
/// must never look older than the bytes it holds, or steals and releases could take
/// memory that queued work still uses.
#[test]
fn ages_survive_splits_and_merges() {
    let config = AllocatorConfig::default();
    let mut st = PoolState::new();
    let seg = st.add_segment(0x10_0000, 20 << 20, 4 << 20, 100, &config); // tick 1
    st.account_free(seg);
    st.release_to_cache(seg); // freed at tick 2
    let a = st.take_cached(2 << 20, 10, &config); // splits the free block
    assert_ne!(a, NIL);
    let rest = st.blocks[a as usize].next;
    assert_eq!(st.blocks[rest as usize].state, BlockState::Free);
    assert_eq!(
        st.blocks[rest as usize].last_used, 2,
        "the remainder keeps the block's age"
    );
    st.account_free(a);
    st.release_to_cache(a);
}

/// A whole free expandable segment is not removed while a page of it is mapped: another
/// thread may have mapped and freed a block there after the caller looked (the
/// `cabi_threads` finding of fuzz round 3).
#[test]
fn a_segment_with_a_mapped_page_is_not_removed() {
    let config = AllocatorConfig::default();
    let page = 2u64 << 20;
    let mut st = PoolState::new();
    st.add_vm_segment(0x4000_0000, 4 * page, PoolKind::Large, page);
    let base = st.segments[0].base;
    let b = st.take_backed(page, page, &config);
    assert_ne!(b, NIL);
    st.install(base, 0, &[(7, 1)]);
    st.account_free(b);
    st.release_to_cache(b);
    st.flush_recent();
    let head = st.segments[0].head;
    assert_eq!(
        st.blocks[head as usize].next, NIL,
        "one whole free block again"
    );
    assert!(
        st.remove_segment(base, u64::MAX).is_none(),
        "removed with chunk 7 still mapped at slot 0"
    );
    assert_eq!(st.segments.len(), 1);
}

/// An older recently-freed block absorbing a newer free neighbour takes the newer age.
#[test]
fn merging_takes_the_younger_age() {
    let config = AllocatorConfig::default();
    let mut st = PoolState::new();
    let b1 = st.add_segment(0x20_0000, 2 << 20, 4096, 4096, &config);
    let b2 = st.take_cached(8192, 8192, &config);
    let b3 = st.take_cached(8192, 8192, &config);
    for b in [b1, b2, b3] {
        st.account_free(b);
        st.release_to_cache(b); // b3 takes b2's recent slot: b2 is coalesced (alone)
    }
    let newest = st.tick;
    st.flush_recent(); // b1 (oldest) absorbs b2 and the rest
    let head = st.segments[0].head;
    assert_eq!(st.blocks[head as usize].next, NIL, "one free block again");
    assert_eq!(
        st.blocks[head as usize].last_used, newest,
        "as young as the last free"
    );
}

/// Fences are asked with the pool unlocked, so the answers go to the fences still there: the
/// newest replaced meanwhile (`add_fence` with `MAX_FENCES` in flight) keeps its ticket
/// until the asking thread is done, and its completion still proves its tick.
#[test]
fn fence_answers_go_to_the_fences_still_there() {
    use super::waits::MAX_FENCES;
    let mut st = PoolState::new();
    for i in 1..=MAX_FENCES as u64 {
        st.tick = 10 * i;
        assert_eq!(st.add_fence(100 + i, false), None);
    }
    let newest = 100 + MAX_FENCES as u64;
    let probe = st.fences_to_ask(25, 1).expect("fences cover tick 25");
    assert_eq!(probe.fences[probe.first].tick, 30);
    // While it asks, another thread replaces the newest fence.
    st.tick = 1000;
    assert_eq!(
        st.add_fence(500, true),
        None,
        "the replaced ticket is kept: it may be asked now"
    );
    // Every fence asked completed.
    let mut released = Vec::new();
    st.apply_fence_answers(&probe, Some(MAX_FENCES - 1), None, |t| released.push(t));
    assert_eq!(released, (101..newest).collect::<Vec<_>>());
    assert_eq!(st.safe_tick(), 10 * MAX_FENCES as u64);
    assert_eq!(
        st.fences.iter().map(|f| f.ticket).collect::<Vec<_>>(),
        [500],
        "the new fence stays"
    );
    st.release_retired(|t| released.push(t));
    assert_eq!(released.last(), Some(&newest));
    // A "not yet" marks the fence asked, not one that replaced it.
    let probe = st
        .fences_to_ask(1000, 1)
        .expect("the new fence covers tick 1000");
    st.apply_fence_answers(&probe, None, Some(0), |_| panic!("nothing completed"));
    assert_eq!(st.fences[0].pending_at, 1000);
    assert!(
        st.fences_to_ask(1000, 1).is_none(),
        "not asked again at the same tick"
    );
}

/// A large free followed by a request of the same size takes the parked block back without
/// a merge and a split only where coalescing first would have placed it the same: over
/// random churn of large blocks (fixed seeds), a pool that parks hands out the same
/// addresses as one flushed before every request, and both end with the same free blocks.
/// (Free lists are scanned only so far, `tlsf::SCAN_LIMIT`, and the two pools order them
/// differently: the churn keeps them short, as they are in real pools.)
#[test]
fn parking_a_large_block_places_as_coalescing_does() {
    use crate::splitmix::SplitMix64;
    const MIB: u64 = 1 << 20;
    fn free_blocks(st: &mut PoolState) -> Vec<(usize, u64, u64)> {
        st.flush_recent();
        let mut out = Vec::new();
        for seg in &st.segments {
            let mut cur = seg.head;
            while cur != NIL {
                let b = &st.blocks[cur as usize];
                if b.state == BlockState::Free {
                    out.push((b.addr, b.size, b.last_used));
                }
                cur = b.next;
            }
        }
        out
    }
    for (seed, max_split_size) in [(1, None), (2, None), (3, Some(24 * MIB)), (4, None)] {
        let config = AllocatorConfig {
            max_split_size,
            ..AllocatorConfig::default()
        };
        let [mut parks, mut flushes] = [PoolState::new(), PoolState::new()];
        let mut rng = SplitMix64(seed);
        let mut live: Vec<(u32, u32, u64)> = Vec::new();
        let (mut reused, mut again, mut next_base) = (0, 0, 0x1000_0000usize);
        for step in 0..20_000 {
            if !live.is_empty() && (live.len() > 100 || rng.below(2) == 0) {
                let (a, b, size) = live.swap_remove(rng.below(live.len() as u64) as usize);
                parks.account_free(a);
                parks.release_to_cache(a);
                flushes.account_free(b);
                flushes.release_to_cache(b);
                if rng.below(2) == 0 {
                    // The commonest large pattern: the same size again at once.
                    let was = parks.parked;
                    flushes.flush_recent();
                    let (a, b) = (
                        parks.take_cached(size, size, &config),
                        flushes.take_cached(size, size, &config),
                    );
                    assert_eq!(a == NIL, b == NIL, "seed {seed} step {step}");
                    if a == NIL {
                        continue; // (too large a block left for `max_split_size`)
                    }
                    assert_eq!(
                        parks.blocks[a as usize].addr, flushes.blocks[b as usize].addr,
                        "seed {seed} step {step}"
                    );
                    reused += usize::from(a == was);
                    // And again at once, a few times: the pool answers from its memo of the
                    // last block taken back while the free index stands still.
                    let (mut a, mut b) = (a, b);
                    for _ in 0..rng.below(4) {
                        parks.account_free(a);
                        parks.release_to_cache(a);
                        flushes.account_free(b);
                        flushes.release_to_cache(b);
                        flushes.flush_recent();
                        let was = parks.parked;
                        (a, b) = (
                            parks.take_cached(size, size, &config),
                            flushes.take_cached(size, size, &config),
                        );
                        assert_eq!(
                            parks.blocks[a as usize].addr, flushes.blocks[b as usize].addr,
                            "seed {seed} step {step}, again"
                        );
                        again += usize::from(a == was);
                    }
                    live.push((a, b, size));
                }
                continue;
            }
            let size = (1 + rng.below(16)) * 2 * MIB;
            flushes.flush_recent();
            let (mut a, mut b) = (
                parks.take_cached(size, size, &config),
                flushes.take_cached(size, size, &config),
            );
            assert_eq!(a == NIL, b == NIL, "seed {seed} step {step}");
            if a == NIL {
                let seg = (size * 2).max(40 * MIB);
                parks.flush_recent();
                a = parks.add_segment(next_base, seg, size, size, &config);
                b = flushes.add_segment(next_base, seg, size, size, &config);
                next_base += seg as usize;
            }
            assert_eq!(
                parks.blocks[a as usize].addr, flushes.blocks[b as usize].addr,
                "seed {seed} step {step}"
            );
            live.push((a, b, size));
        }
        assert!(
            reused > 1000 && again > 1000,
            "seed {seed}: only {reused} parked blocks taken back, {again} again at once"
        );
        assert_eq!(
            free_blocks(&mut parks),
            free_blocks(&mut flushes),
            "seed {seed}"
        );
        for st in [&parks, &flushes] {
            st.check(0, &Default::default(), |_| Some(0), &mut Tally::default())
                .unwrap();
        }
    }
}
