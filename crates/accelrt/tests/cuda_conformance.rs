//! The conformance suite (`accelrt-conformance`) on the CUDA backend: the same checks the
//! host and the out-of-tree `fault` backend pass. Skipped without a GPU (a failure with
//! `ACCELRT_REQUIRE_GPU=1`).
#![cfg(feature = "cuda")]

mod cuda_common;

use accelrt::Backend;

accelrt_conformance::conformance_tests!(
    cuda_common::gpu("the conformance suite").map(|rt| rt as &dyn Backend)
);
