//! Opening the driver library and the symbols the probe checks.

use cudarc::driver::sys;

/// Whether a CUDA driver library (`libcuda.so`) can be opened. Must be true before any
/// other function here is called: cudarc panics when the library is missing.
pub(crate) fn library_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the driver library under its usual names
    // and closes it again; it touches no memory of ours.
    unsafe { sys::is_culib_present() }
}

/// The names in `symbols` that the driver library does not export (cudarc would panic on
/// the first call of a missing one). Only call after [`library_present`] returned true.
pub(crate) fn missing_symbols(symbols: &[&'static str]) -> Vec<&'static str> {
    // SAFETY: library_present() was true, so culib() opens the library instead of panicking.
    let lib = unsafe { sys::culib() };
    symbols
        .iter()
        .copied()
        .filter(|name| {
            // SAFETY: we only test that the symbol exists; the pointer is never called or
            // dereferenced through this (wrong but unused) function type.
            unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err()
        })
        .collect()
}

/// The driver calls sharing memory between processes needs, as a reason when one is missing
/// (a driver older than CUDA 10.2).
pub(crate) fn ipc_symbols_missing() -> Option<String> {
    let missing = missing_symbols(&[
        "cuMemExportToShareableHandle",
        "cuMemImportFromShareableHandle",
    ]);
    (!missing.is_empty()).then(|| {
        format!(
            "the CUDA driver does not export {} (CUDA 10.2 or newer is needed to share \
             memory between processes)",
            missing.join(", ")
        )
    })
}

/// Every driver symbol this backend calls (checked once at probe time, so a driver that
/// lacks one makes the backend unavailable instead of panicking later).
pub(crate) const SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDeviceCanAccessPeer",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuCtxGetStreamPriorityRange",
    "cuCtxEnablePeerAccess",
    "cuStreamCreateWithPriority",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamQuery",
    "cuStreamWaitEvent",
    "cuStreamGetCtx",
    "cuStreamIsCapturing",
    "cuStreamBeginCapture_v2",
    "cuStreamEndCapture",
    "cuLaunchHostFunc",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventElapsedTime_v2",
    "cuEventDestroy_v2",
    "cuGraphInstantiateWithFlags",
    "cuGraphLaunch",
    "cuGraphExecDestroy",
    "cuGraphDestroy",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemGetInfo_v2",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuMemsetD32Async",
    "cuMemGetAllocationGranularity",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemMap",
    "cuMemSetAccess",
    "cuMemUnmap",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuPointerGetAttribute",
    "cuGetErrorString",
];

/// The driver symbols the wrappers above call (checked at probe time with [`SYMBOLS`]).
pub(crate) const HOOKS_SYMBOLS: &[&str] = &[
    "cuDevicePrimaryCtxGetState",
    "cuMemcpyHtoDAsync_v2",
    "cuGraphGetNodes",
    "cuMemcpyAsync",
];

/// The driver symbols the PTX kernels of tests and benchmarks call (`sys/module.rs`; checked
/// at probe time with [`SYMBOLS`] when the `test-kernels` feature is on).
pub(crate) const KERNEL_SYMBOLS: &[&str] = &[
    "cuModuleLoadDataEx",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuLaunchKernel",
];
