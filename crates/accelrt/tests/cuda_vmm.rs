//! The CUDA virtual-memory provider on a real GPU (what expandable segments run on): reserve,
//! create chunks of several sizes, map them with one access call, map one chunk at a second
//! place while the first stays mapped (the same bytes through both), unmap several mappings
//! in one call; and an allocator with `expandable_segments:true` over it.
#![cfg(feature = "cuda")]

mod cuda_common;

use std::sync::{Mutex, MutexGuard};

use accelrt::alloc::{AllocatorConfig, CachingAllocator, ChunkHandle};
use accelrt::{Backend, Device, DeviceType, Stream};
use cuda_common::{gpu, read_u32, write_u32};

/// The tests here share device 0's provider and read its byte count: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn chunks_map_whole_and_alias_across_ranges() {
    let _serial = serial();
    let Some(rt) = gpu("chunks_map_whole_and_alias_across_ranges") else {
        return;
    };
    let provider = rt.memory_provider(0).unwrap();
    let Some(vm) = provider.virtual_memory() else {
        panic!("the GPU supports virtual memory management, but the provider offers none");
    };
    let g = vm.granularity();
    assert_eq!(g, 2 << 20, "granularity");
    let before = provider.driver_allocated();
    let base = vm.reserve(16 * g).unwrap();
    assert_eq!(base % g, 0);
    // A one-granule chunk and a three-granule chunk, mapped one after the other.
    let small: ChunkHandle = vm.create(g).unwrap();
    let big: ChunkHandle = vm.create(3 * g).unwrap();
    assert_eq!(provider.driver_allocated(), before + 4 * g as u64);
    // SAFETY: `base` is a fresh reservation of 16 granules; both chunks are new and unmapped.
    unsafe { vm.map(base, &[(small, g), (big, 3 * g)]) }.unwrap();
    write_u32(rt, 0, base, &[7; 64]);
    for i in 1..4 {
        write_u32(rt, 0, base + i * g, &[100 + i as u32; 64]);
    }
    // The big chunk mapped a second time, higher up, while its first mapping stays.
    // SAFETY: granules 8..11 of the reservation are unmapped; the chunk is live.
    unsafe { vm.map(base + 8 * g, &[(big, 3 * g)]) }.unwrap();
    for i in 0..3 {
        let data = read_u32(rt, 0, base + (8 + i) * g, 64);
        assert_eq!(
            data,
            vec![101 + i as u32; 64],
            "granule {i} through the second range"
        );
    }
    write_u32(rt, 0, base + 9 * g, &[55; 64]);
    assert_eq!(
        read_u32(rt, 0, base + 2 * g, 64),
        vec![55; 64],
        "one chunk, one memory"
    );
    // SAFETY: both ranges are covered by whole mappings of ours and unused (copies are
    // synchronous); one call unmaps the two mappings of the first range.
    unsafe {
        vm.unmap(base, 4 * g);
        vm.unmap(base + 8 * g, 3 * g);
        vm.release(small, g);
        vm.release(big, 3 * g);
        vm.unreserve(base, 16 * g);
    }
    assert_eq!(provider.driver_allocated(), before);
    let err = vm.reserve(g + 1).unwrap_err();
    assert!(format!("{err:?}").contains("granularity"), "{err:?}");
}

#[test]
fn expandable_segments_allocate_real_memory() {
    let _serial = serial();
    let Some(rt) = gpu("expandable_segments_allocate_real_memory") else {
        return;
    };
    let device = Device {
        kind: DeviceType::Cuda,
        index: 0,
    };
    let s = Stream { device, index: 0 };
    let config = AllocatorConfig {
        expandable_segments: true,
        ..AllocatorConfig::default()
    };
    let alloc =
        CachingAllocator::new(device, rt.memory_provider(0).unwrap(), None, config).unwrap();
    let mut held = Vec::new();
    for (i, size) in [512usize, 1 << 20, 3 << 20, 30 << 20, 100 << 20]
        .into_iter()
        .enumerate()
    {
        let p = alloc.raw_alloc(size, s).unwrap();
        write_u32(rt, 0, p, &[i as u32 + 1; 32]);
        held.push((p, i));
    }
    for &(p, i) in &held {
        assert_eq!(read_u32(rt, 0, p, 32), vec![i as u32 + 1; 32]);
    }
    for (p, _) in held {
        alloc.raw_free(p).unwrap();
    }
    alloc.empty_cache().unwrap();
    assert_eq!(alloc.reserved_bytes(), 0);
}
