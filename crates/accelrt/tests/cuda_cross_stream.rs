//! Cross-stream safety on a real GPU, verified by data: a kernel on stream B keeps writing a
//! block after the host freed it (with `record_stream(block, B)`); an allocation on stream A
//! must not get that block until B's work is done. A control run without `record_stream`
//! shows the same check catches the corruption, so the test can fail.
#![cfg(feature = "cuda")]

mod cuda_common;

use std::time::Duration;

use accelrt::alloc::CachingAllocator;
use accelrt::backend::cuda::CudaDriver;
use accelrt::runtime::Runtime;
use accelrt::{Backend, Stream, StreamPriority};
use cuda_common::{gpu, read_u64};

/// The pattern B's late writer leaves behind.
const LATE_PATTERN: u32 = 0xBADB_10CC;
/// How long B's writer waits on the device before writing: far longer than the host needs to
/// free the block, allocate again and launch A's fill.
const LATE_DELAY: Duration = Duration::from_micros(300);

fn pattern(trial: usize) -> u32 {
    0x1000_0000 | trial as u32
}

struct Outcome {
    /// Trials whose block on A held anything but A's pattern.
    corrupted_trials: usize,
    /// Words that differed, over all trials.
    corrupted_words: u64,
    /// Trials where A's allocation got the very block B was still writing.
    same_block: usize,
}

/// `trials` rounds of: allocate X on A; (record_stream(X, B)); B waits for A, then a late
/// writer fills X after `LATE_DELAY`; free X; allocate Y on A and fill it with the trial's
/// pattern; A waits for B, then counts the words of Y that are not the pattern.
fn run_trials(
    rt: &'static Runtime<CudaDriver>,
    alloc: &CachingAllocator,
    (a, b): (Stream, Stream),
    bytes: usize,
    trials: usize,
    record_stream: bool,
) -> Outcome {
    let words = bytes / 4;
    let counters = alloc.raw_alloc(trials * 8, a).unwrap();
    // SAFETY: `counters` is ours, `trials` 8-byte words, used on stream A only.
    rt.with_stream(a, |d, s| unsafe {
        d.memset_u32(s, counters, trials * 2, 0)
    })
    .unwrap();
    let mut same_block = 0;
    for t in 0..trials {
        let x = alloc.raw_alloc(bytes, a).unwrap();
        if record_stream {
            alloc.record_stream(x, b).unwrap();
        }
        // B uses a block allocated on A: it waits for A's work so far (the user's duty).
        let on_a = rt.event(0, false).unwrap();
        on_a.record(a).unwrap();
        on_a.wait(b).unwrap();
        // SAFETY: X is live until the free below; with record_stream the allocator keeps it
        // from reuse until B's writer is done, and without it the control run expects (and
        // measures) exactly the corruption this causes: device memory only, never host.
        rt.with_stream(b, |d, s| unsafe {
            d.spin_then_fill(s, x, words, LATE_PATTERN, LATE_DELAY)
        })
        .unwrap();
        alloc.raw_free(x).unwrap();

        let y = alloc.raw_alloc(bytes, a).unwrap();
        if y == x {
            same_block += 1;
        }
        // SAFETY: Y is ours, used on A until freed below; the counter word is ours.
        rt.with_stream(a, |d, s| unsafe { d.fill_u32(s, y, words, pattern(t)) })
            .unwrap();
        let on_b = rt.event(0, false).unwrap();
        on_b.record(b).unwrap();
        on_b.wait(a).unwrap();
        // SAFETY: as above.
        rt.with_stream(a, |d, s| unsafe {
            d.count_mismatches(s, y, words, pattern(t), counters + 8 * t)
        })
        .unwrap();
        alloc.raw_free(y).unwrap();
    }
    rt.stream_synchronize(a).unwrap();
    rt.stream_synchronize(b).unwrap();
    let counts = read_u64(rt, 0, counters, trials);
    alloc.raw_free(counters).unwrap();
    Outcome {
        corrupted_trials: counts.iter().filter(|&&c| c > 0).count(),
        corrupted_words: counts.iter().sum(),
        same_block,
    }
}

#[test]
fn record_stream_keeps_a_block_from_reuse_until_the_other_stream_is_done() {
    let Some(rt) = gpu("record_stream_keeps_a_block_from_reuse_until_the_other_stream_is_done")
    else {
        return;
    };
    let alloc = rt.allocator(0).unwrap();
    let a = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let b = rt.new_stream(0, StreamPriority::Normal).unwrap();

    // Small pool (64 KiB blocks) and large pool (4 MiB blocks), thousands of trials each.
    for (bytes, trials) in [(64 << 10, 2000), (4 << 20, 2000)] {
        let safe = run_trials(rt, &alloc, (a, b), bytes, trials, true);
        eprintln!(
            "record_stream, {bytes} B blocks: {trials} trials, {} corrupted, block reused \
             immediately in {} trials",
            safe.corrupted_trials, safe.same_block
        );
        assert_eq!(
            (safe.corrupted_trials, safe.corrupted_words),
            (0, 0),
            "{bytes} B: a block still written by stream B was handed to stream A"
        );
    }

    // Control: without record_stream the allocator may (and does) hand X straight back,
    // and the same check sees B's late writes.
    let control = run_trials(rt, &alloc, (a, b), 64 << 10, 200, false);
    eprintln!(
        "control without record_stream: 200 trials, {} corrupted, block reused immediately in {}",
        control.corrupted_trials, control.same_block
    );
    assert!(control.same_block > 0, "the control never reused the block");
    assert!(
        control.corrupted_trials > 0,
        "the check saw no corruption even without record_stream: it cannot detect any"
    );
    alloc.empty_cache().unwrap();
}
