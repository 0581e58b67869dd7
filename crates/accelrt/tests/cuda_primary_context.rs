//! `has_primary_context` on CUDA asks the driver: a context another runtime (PyTorch, here a
//! second accelrt runtime) retained counts, and a released one does not. Its own binary with
//! one test, so nothing else in the process holds the context.
#![cfg(feature = "cuda")]

mod cuda_common;

use accelrt::backend::cuda::CudaDriver;
use accelrt::runtime::Runtime;
use accelrt::Backend;

#[test]
fn primary_context_state_is_the_drivers() {
    if cuda_common::gpu("primary_context_state_is_the_drivers").is_none() {
        return;
    }
    let observer: Runtime<CudaDriver> = Runtime::new();
    observer.init().unwrap();
    assert!(
        !observer.has_primary_context(0),
        "nothing in this process retained cuda:0's context yet"
    );
    let other: Runtime<CudaDriver> = Runtime::new();
    other.default_stream(0).unwrap(); // retains the primary context
    assert!(other.has_primary_context(0));
    assert!(
        observer.has_primary_context(0),
        "a context someone else created is active for the driver"
    );
    assert!(!observer.has_primary_context(observer.device_count()));
    drop(other); // releases its reference: the context is destroyed
    assert!(!observer.has_primary_context(0), "released");
}
