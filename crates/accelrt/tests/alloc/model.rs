//! Model-based property test: random operation sequences across streams, checked against a
//! simple model of live allocations. Host memory is real, so every live buffer carries a
//! fill pattern that must survive until its free: overlapping blocks would corrupt it.

use std::sync::Arc;

use accelrt::alloc::{AllocatorConfig, CachingAllocator};
use accelrt::backend::host::HostMemory;
use proptest::prelude::*;

use crate::common::{host_stream, HOST0 as DEV};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Alloc { size: usize, stream: u32 },
    Free { pick: usize },
    EmptyCache,
    FreeInactive,
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![
        4 => 1usize..=64 * KIB,
        3 => 64 * KIB..=2 * MIB,
        2 => 2 * MIB..=24 * MIB,
        1 => 24 * MIB..=96 * MIB,
    ];
    prop_oneof![
        10 => (size, 0u32..3).prop_map(|(size, stream)| Op::Alloc { size, stream }),
        8 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => Just(Op::EmptyCache),
        1 => Just(Op::FreeInactive),
    ]
}

const CONFIGS: [&str; 14] = [
    "",
    "chunk_div:off",
    "halving_div:1",
    "chunk_mb:4",
    "expandable_page_mb:8",
    "max_split_size_mb:16",
    "expandable_segments:false",
    "expandable_segments:false,release_at_peak:false",
    "expandable_segments:false,max_split_size_mb:16",
    "release_at_peak:false",
    "roundup_power2_divisions:4",
    "low_watermark_ratio:0.5",
    "per_process_memory_fraction:0.6,garbage_collection_threshold:0.5",
    "expandable_segments:false,low_watermark_ratio:0.5",
];

struct Live {
    ptr: usize,
    size: usize,
    tag: u8,
}

/// The bytes checked in each buffer: all of a small one, the ends of a large one.
fn probe_ranges(l: &Live) -> [(usize, usize); 2] {
    let n = l.size.min(4 * KIB);
    [(l.ptr, n), (l.ptr + l.size - n, n)]
}

fn fill(l: &Live) {
    for (p, n) in probe_ranges(l) {
        // SAFETY: [p, p + n) lies inside a live host-memory buffer owned by this test.
        unsafe { std::ptr::write_bytes(p as *mut u8, l.tag, n) };
    }
}

fn intact(l: &Live) -> bool {
    probe_ranges(l).iter().all(|&(p, n)| {
        // SAFETY: as in `fill`; the buffer is still live.
        let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, n) };
        bytes.iter().all(|&b| b == l.tag)
    })
}

fn run(conf: &str, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut config = AllocatorConfig::parse(conf).unwrap();
    config.debug_checks = true; // check every invariant after every call
    let a = CachingAllocator::new(
        DEV,
        Arc::new(HostMemory::new(256 * MIB as u64)),
        None,
        config,
    )
    .unwrap();
    let mut live: Vec<Live> = Vec::new();
    let mut tag = 0u8;
    for op in ops {
        match *op {
            Op::Alloc { size, stream } => match a.raw_alloc(size, host_stream(stream)) {
                Ok(ptr) => {
                    for l in &live {
                        prop_assert!(
                            ptr + size <= l.ptr || l.ptr + l.size <= ptr,
                            "{ptr:#x}+{size} overlaps {:#x}+{}",
                            l.ptr,
                            l.size
                        );
                    }
                    tag = tag.wrapping_add(1).max(1);
                    let l = Live { ptr, size, tag };
                    fill(&l);
                    live.push(l);
                }
                Err(e) => {
                    prop_assert!(e.is_out_of_memory(), "unexpected error {e}");
                    let s = a.stats();
                    prop_assert!(s.counters.num_ooms > 0);
                }
            },
            Op::Free { pick } if !live.is_empty() => {
                let l = live.swap_remove(pick % live.len());
                prop_assert!(intact(&l), "buffer {:#x} was overwritten while live", l.ptr);
                a.raw_free(l.ptr).unwrap();
                prop_assert!(a.raw_free(l.ptr).is_err(), "double free accepted");
            }
            Op::Free { .. } => {}
            Op::EmptyCache => a.empty_cache().unwrap(),
            Op::FreeInactive => a.free_inactive_buffers().unwrap(),
        }
        let s = a.stats().all();
        prop_assert_eq!(s.allocation.current, live.len() as u64);
        prop_assert_eq!(
            s.requested_bytes.current,
            live.iter().map(|l| l.size as u64).sum::<u64>()
        );
        prop_assert!(a.reserved_bytes() <= 256 * MIB as u64);
    }
    for l in live.drain(..) {
        prop_assert!(intact(&l));
        a.raw_free(l.ptr).unwrap();
    }
    a.empty_cache().unwrap();
    prop_assert_eq!(
        a.reserved_bytes(),
        0,
        "everything goes back once all is free"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_match_the_model(conf in 0..CONFIGS.len(), ops in prop::collection::vec(op(), 1..160)) {
        run(CONFIGS[conf], &ops)?;
    }
}
