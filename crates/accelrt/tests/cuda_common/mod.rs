//! Shared by the `cuda_*` GPU tests: find the GPU (or skip with the reason, or fail when
//! `ACCELRT_REQUIRE_GPU=1`), and move data between the host and device memory.
#![allow(dead_code)]

use accelrt::backend::cuda::CudaDriver;
use accelrt::runtime::Runtime;
use accelrt::Backend;

/// Set to 1 on the GPU machine: a missing GPU is then a failure, not a skip.
pub const REQUIRE_GPU_ENV: &str = "ACCELRT_REQUIRE_GPU";

/// The process-wide CUDA runtime, or `None` (after printing why) when no GPU is usable.
/// Panics when `ACCELRT_REQUIRE_GPU=1` and there is none.
pub fn gpu(test: &str) -> Option<&'static Runtime<CudaDriver>> {
    let rt = accelrt::registry::cuda();
    match rt.unavailable_reason() {
        None => Some(rt),
        Some(reason) => {
            if std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v.trim() == "1") {
                panic!("{REQUIRE_GPU_ENV}=1 but the cuda backend is unavailable: {reason}");
            }
            eprintln!("skipping {test}: the cuda backend is unavailable: {reason}");
            None
        }
    }
}

/// Read `count` 32-bit words of device memory.
pub fn read_u32(rt: &Runtime<CudaDriver>, device: u32, ptr: usize, count: usize) -> Vec<u32> {
    let mut bytes = vec![0u8; count * 4];
    // SAFETY: callers pass device memory they allocated with at least `count` words, after
    // synchronizing the work that writes it.
    unsafe { rt.driver().unwrap().copy_to_host(device, &mut bytes, ptr) }.unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Read `count` 64-bit words of device memory.
pub fn read_u64(rt: &Runtime<CudaDriver>, device: u32, ptr: usize, count: usize) -> Vec<u64> {
    let mut bytes = vec![0u8; count * 8];
    // SAFETY: as in `read_u32`.
    unsafe { rt.driver().unwrap().copy_to_host(device, &mut bytes, ptr) }.unwrap();
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

/// Write 32-bit words to device memory.
pub fn write_u32(rt: &Runtime<CudaDriver>, device: u32, ptr: usize, words: &[u32]) {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    // SAFETY: callers pass device memory they allocated with room for `words`, unused by
    // work in flight.
    unsafe { rt.driver().unwrap().copy_to_device(device, ptr, &bytes) }.unwrap();
}
