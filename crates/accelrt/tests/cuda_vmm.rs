//! The CUDA virtual-memory provider on a real GPU (what expandable segments run on): reserve,
//! create pages, map with one access call, unmap, remap elsewhere with the data intact; and
//! an allocator with `expandable_segments:true` over it.
#![cfg(feature = "cuda")]

mod cuda_common;

use std::sync::{Mutex, MutexGuard};

use accelrt::alloc::{AllocatorConfig, CachingAllocator, PageHandle};
use accelrt::{Backend, Device, DeviceType, Stream};
use cuda_common::{gpu, read_u32, write_u32};

/// The tests here share device 0's provider and read its byte count: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn virtual_memory_maps_pages_that_keep_their_data() {
    let _serial = serial();
    let Some(rt) = gpu("virtual_memory_maps_pages_that_keep_their_data") else {
        return;
    };
    let provider = rt.memory_provider(0).unwrap();
    let Some(vm) = provider.virtual_memory() else {
        panic!("the GPU supports virtual memory management, but the provider offers none");
    };
    let ps = vm.page_size();
    assert_eq!(ps, 2 << 20, "granularity");
    let before = provider.driver_allocated();
    let base = vm.reserve(8 * ps).unwrap();
    assert_eq!(base % ps, 0);
    let pages: Vec<PageHandle> = (0..4).map(|_| vm.create_page(ps).unwrap()).collect();
    assert_eq!(provider.driver_allocated(), before + 4 * ps as u64);
    // SAFETY: `base` is a fresh reservation of 8 pages; the 4 pages are new and unmapped.
    unsafe { vm.map(base, &pages, ps) }.unwrap();
    for (i, _) in pages.iter().enumerate() {
        write_u32(rt, 0, base + i * ps, &[100 + i as u32; 64]);
    }
    // Unmap, then map the pages in reverse order at the other half: data follows the page.
    // SAFETY: the 4 pages are mapped at `base` and nothing uses them (copies are synchronous).
    unsafe { vm.unmap(base, 4, ps) };
    let reversed: Vec<PageHandle> = pages.iter().rev().copied().collect();
    // SAFETY: the upper half of the reservation is unmapped; each page is mapped nowhere now.
    unsafe { vm.map(base + 4 * ps, &reversed, ps) }.unwrap();
    for i in 0..4 {
        let data = read_u32(rt, 0, base + (4 + i) * ps, 64);
        assert_eq!(data, vec![100 + (3 - i) as u32; 64], "page {i}");
    }
    // SAFETY: mapped above, unused; then each page is mapped nowhere; then nothing is mapped.
    unsafe {
        vm.unmap(base + 4 * ps, 4, ps);
        for p in pages {
            vm.destroy_page(p, ps);
        }
        vm.unreserve(base, 8 * ps);
    }
    assert_eq!(provider.driver_allocated(), before);
    let err = vm.reserve(ps + 1).unwrap_err();
    assert!(format!("{err:?}").contains("page size"), "{err:?}");
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
