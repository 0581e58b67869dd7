//! Memory moves on a real GPU, verified by data: a kernel queued on stream A keeps writing a
//! block after the host freed it; the next, larger allocation on A takes that block's
//! physical memory (mapped at once at its new place, without waiting for the GPU). Stream
//! order must put the late writer before the new block's fill, and the old range must stay
//! mapped until the writer is done (an unmapped range under a running kernel is an illegal
//! address: the stream reports it and the test fails).
#![cfg(feature = "cuda")]

mod cuda_common;

use std::time::Duration;

use accelrt::{Backend, StreamPriority};
use cuda_common::{gpu, read_u64};

const LATE_PATTERN: u32 = 0xBADB_10CC;
/// How long A's late writer waits on the device before writing: longer than the host needs
/// to free the block, allocate the next one and queue its fill.
const LATE_DELAY: Duration = Duration::from_micros(40);

fn pattern(trial: usize) -> u32 {
    0x2000_0000 | trial as u32
}

#[test]
fn moved_memory_keeps_queued_work_in_stream_order() {
    let Some(rt) = gpu("moved_memory_keeps_queued_work_in_stream_order") else {
        return;
    };
    let alloc = rt.allocator(0).unwrap();
    assert!(
        alloc.is_expandable(),
        "the GPU supports virtual memory: expandable segments are on"
    );
    // Every trial should move: the moves' time budget (a share of the time passing, which
    // this back-to-back loop would use up) is not what is tested here.
    alloc.set_clock(accelrt::alloc::Clock::Off);
    let a = rt.new_stream(0, StreamPriority::Normal).unwrap();
    // 10,000 by default; fewer under compute-sanitizer, which slows every kernel down.
    let trials: usize = std::env::var("ACCELRT_MOVES_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let counters = alloc.raw_alloc(trials * 8, a).unwrap();
    // SAFETY: `counters` is ours, `trials` 8-byte words, used on stream A only.
    rt.with_stream(a, |d, s| unsafe {
        d.memset_u32(s, counters, trials * 2, 0)
    })
    .unwrap();
    let moves_before = alloc.stats().counters.num_page_steals;
    for t in 0..trials {
        // X sits between two live blocks, so the larger Y cannot extend X's free range in place
        // (the allocator's first choice, which moves nothing): Y's memory must come from X's
        // idle chunks, which move under Y while X's late writer is still queued on their old
        // addresses. Sizes grow within windows of 32 trials, so no older free range fits Y;
        // between windows everything goes back to the device.
        if t % 32 == 0 {
            rt.stream_synchronize(a).unwrap();
            alloc.empty_cache().unwrap();
        }
        alloc.reset_peak_stats();
        let x_bytes = (8 + (t % 32) * 2) << 20;
        let before = alloc.raw_alloc(x_bytes, a).unwrap();
        let x = alloc.raw_alloc(x_bytes, a).unwrap();
        let after = alloc.raw_alloc(x_bytes, a).unwrap();
        // SAFETY: X is live until the free below; the writer runs on A, before anything A
        // runs after it, so it never overlaps a later user of X's memory.
        rt.with_stream(a, |d, s| unsafe {
            d.spin_then_fill(s, x, x_bytes / 4, LATE_PATTERN, LATE_DELAY)
        })
        .unwrap();
        alloc.raw_free(x).unwrap();
        // Small cached pairs: ordinary traffic (and the move budget is per allocation).
        for _ in 0..16 {
            let p = alloc.raw_alloc(4096, a).unwrap();
            alloc.raw_free(p).unwrap();
        }
        let y_bytes = x_bytes + (2 << 20);
        let y = alloc.raw_alloc(y_bytes, a).unwrap();
        let words = y_bytes / 4;
        // SAFETY: Y is ours, used on A until freed below; the counter word is ours.
        rt.with_stream(a, |d, s| unsafe {
            d.fill_u32(s, y, words, pattern(t))?;
            d.count_mismatches(s, y, words, pattern(t), counters + 8 * t)
        })
        .unwrap();
        alloc.raw_free(y).unwrap();
        alloc.raw_free(before).unwrap();
        alloc.raw_free(after).unwrap();
    }
    rt.stream_synchronize(a).unwrap();
    let counts = read_u64(rt, 0, counters, trials);
    alloc.raw_free(counters).unwrap();
    let moves = alloc.stats().counters.num_page_steals - moves_before;
    let corrupted = counts.iter().filter(|&&c| c > 0).count();
    eprintln!(
        "moves under a late writer: {trials} trials, {moves} moves, {corrupted} corrupted, \
         driver calls {:?}",
        alloc.stats().driver_calls
    );
    assert_eq!(
        corrupted, 0,
        "a new block saw bytes of work queued before it"
    );
    assert!(
        moves as usize >= trials / 2,
        "memory moved in most trials ({moves} of {trials}): the test exercises moves"
    );
    alloc.empty_cache().unwrap();
}
