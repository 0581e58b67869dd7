//! Out of memory on a real GPU: a small memory fraction gives the allocator's clear report,
//! the device's own limit too, and the allocator keeps working after each.
#![cfg(feature = "cuda")]

mod cuda_common;

use accelrt::alloc::{AllocatorConfig, CachingAllocator, ProviderError};
use accelrt::AllocError;
use accelrt::{Backend, Device, DeviceType, Stream};
use cuda_common::{gpu, read_u32, write_u32};

const DEVICE: Device = Device {
    kind: DeviceType::Cuda,
    index: 0,
};

fn stream() -> Stream {
    Stream {
        device: DEVICE,
        index: 0,
    }
}

#[test]
fn a_small_memory_fraction_gives_a_clear_oom_and_the_allocator_keeps_working() {
    let Some(rt) = gpu("a_small_memory_fraction_gives_a_clear_oom_and_the_allocator_keeps_working")
    else {
        return;
    };
    let provider = rt.memory_provider(0).unwrap();
    let (_, total) = provider.memory_info();
    let alloc = CachingAllocator::new(DEVICE, provider, None, AllocatorConfig::default()).unwrap();
    alloc.set_memory_fraction(0.01).unwrap();
    let limit = (total as f64 * 0.01) as usize;

    let kept = alloc.raw_alloc(limit / 4, stream()).unwrap();
    write_u32(rt, 0, kept, &[1, 2, 3, 4]);
    let err = alloc.raw_alloc(limit, stream()).unwrap_err();
    let AllocError::OutOfMemory(report) = &err else {
        panic!("expected an out-of-memory, got {err}");
    };
    let text = err.to_string();
    eprintln!("{text}");
    assert_eq!(report.requested, limit as u64);
    assert_eq!(report.device, "cuda:0");
    assert_eq!(report.device_total, total);
    assert!(text.contains("per_process_memory_fraction"), "{text}");
    assert!(text.contains("Raise per_process_memory_fraction"), "{text}");

    // Still working: the earlier block is intact, smaller requests succeed.
    assert_eq!(read_u32(rt, 0, kept, 4), [1, 2, 3, 4]);
    let more = alloc.raw_alloc(limit / 4, stream()).unwrap();
    write_u32(rt, 0, more, &[9; 16]);
    assert_eq!(read_u32(rt, 0, more, 16), [9; 16]);
    alloc.raw_free(more).unwrap();
    alloc.raw_free(kept).unwrap();
    assert_eq!(alloc.stats().counters.num_ooms, 1);
    alloc.empty_cache().unwrap();
    assert_eq!(alloc.reserved_bytes(), 0);
}

#[test]
fn the_device_limit_gives_a_clear_oom_and_the_allocator_keeps_working() {
    let Some(rt) = gpu("the_device_limit_gives_a_clear_oom_and_the_allocator_keeps_working") else {
        return;
    };
    let provider = rt.memory_provider(0).unwrap();
    let (_, total) = provider.memory_info();
    // More than the GPU has (and below the default high watermark of 1.7x): cuMemAlloc says
    // CUDA_ERROR_OUT_OF_MEMORY, which must reach the allocator as an out-of-memory.
    let too_much = (total + total / 2) as usize;
    assert_eq!(provider.allocate(too_much), Err(ProviderError::OutOfMemory));

    let alloc = CachingAllocator::new(DEVICE, provider, None, AllocatorConfig::default()).unwrap();
    let small = alloc.raw_alloc(1 << 20, stream()).unwrap();
    let err = alloc.raw_alloc(too_much, stream()).unwrap_err();
    assert!(err.is_out_of_memory(), "{err}");
    let text = err.to_string();
    eprintln!("{text}");
    assert!(text.contains("out of memory on cuda:0"), "{text}");
    let again = alloc.raw_alloc(64 << 20, stream()).unwrap();
    write_u32(rt, 0, again, &[5; 8]);
    assert_eq!(read_u32(rt, 0, again, 8), [5; 8]);
    alloc.raw_free(again).unwrap();
    alloc.raw_free(small).unwrap();
    alloc.empty_cache().unwrap();
    assert_eq!(alloc.reserved_bytes(), 0);
}
