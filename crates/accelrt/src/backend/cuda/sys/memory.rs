//! Device memory, virtual memory, pinned host memory, copies.

use std::ffi::{c_int, c_uint, c_void};

use cudarc::driver::sys;

use super::{check, CuResult};
use super::{CUdeviceptr, CUmemGenericAllocationHandle, CUresult, CUstream};

// ---- device memory ---------------------------------------------------------------------

/// `size` bytes of device memory in the current context.
pub(crate) fn mem_alloc(size: usize) -> CuResult<CUdeviceptr> {
    let mut p: CUdeviceptr = 0;
    // SAFETY: writes one address into a local; the caller owns the allocation.
    check(unsafe { sys::cuMemAlloc_v2(&mut p, size) }, "cuMemAlloc")?;
    Ok(p)
}

/// # Safety
/// `p` must come from [`mem_alloc`], not yet freed, and be used by nothing afterwards.
pub(crate) unsafe fn mem_free(p: CUdeviceptr) -> CuResult<()> {
    // SAFETY: the caller owns the allocation and gives it up.
    check(unsafe { sys::cuMemFree_v2(p) }, "cuMemFree")
}

/// (free, total) bytes of the current context's device.
pub(crate) fn mem_get_info() -> CuResult<(usize, usize)> {
    let (mut free, mut total) = (0usize, 0usize);
    check(
        // SAFETY: writes two sizes into locals.
        unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) },
        "cuMemGetInfo",
    )?;
    Ok((free, total))
}

/// Synchronous copy from host memory to device memory.
///
/// # Safety
/// `dst .. dst + src.len()` must be device (or pinned) memory we own and nothing else uses.
pub(crate) unsafe fn memcpy_htod(dst: CUdeviceptr, src: &[u8]) -> CuResult<()> {
    // SAFETY: `src` is a valid host slice; the caller guarantees the destination range.
    check(
        unsafe { sys::cuMemcpyHtoD_v2(dst, src.as_ptr().cast(), src.len()) },
        "cuMemcpyHtoD",
    )
}

/// Synchronous copy from device memory to host memory.
///
/// # Safety
/// `src .. src + dst.len()` must be readable device (or pinned) memory.
pub(crate) unsafe fn memcpy_dtoh(dst: &mut [u8], src: CUdeviceptr) -> CuResult<()> {
    // SAFETY: `dst` is a valid, exclusively borrowed host slice; the caller guarantees the
    // source range.
    check(
        unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, dst.len()) },
        "cuMemcpyDtoH",
    )
}

/// Set `count` 32-bit words from `dst` to `value`, in stream order on `s`.
///
/// # Safety
/// `dst .. dst + 4 * count` must be device memory we own; `s` live or null.
pub(crate) unsafe fn memset_d32_async(
    dst: CUdeviceptr,
    value: u32,
    count: usize,
    s: CUstream,
) -> CuResult<()> {
    // SAFETY: forwarded from the caller's guarantees.
    check(
        unsafe { sys::cuMemsetD32Async(dst, value, count, s) },
        "cuMemsetD32Async",
    )
}

// ---- virtual memory --------------------------------------------------------------------

fn device_location(ordinal: c_int) -> sys::CUmemLocation {
    sys::CUmemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
        id: ordinal,
    }
}

fn pinned_device_prop(ordinal: c_int) -> sys::CUmemAllocationProp {
    // SAFETY: CUmemAllocationProp is a plain C struct (integers, a pointer, a byte array) for
    // which all-zero bytes are valid: no handle types, no flags, a null win32 pointer.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
    prop.location = device_location(ordinal);
    prop
}

/// The size and alignment of physical pages on device `ordinal` (2 MiB on current GPUs).
pub(crate) fn mem_granularity(ordinal: c_int) -> CuResult<usize> {
    let prop = pinned_device_prop(ordinal);
    let mut g = 0usize;
    check(
        // SAFETY: `prop` is a valid, initialised struct; writes one size into a local.
        unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut g,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        },
        "cuMemGetAllocationGranularity",
    )?;
    Ok(g)
}

/// Reserve `size` bytes of device address space aligned to `align`.
pub(crate) fn mem_address_reserve(size: usize, align: usize) -> CuResult<CUdeviceptr> {
    let mut p: CUdeviceptr = 0;
    check(
        // SAFETY: writes one address into a local; the caller owns the reservation.
        unsafe { sys::cuMemAddressReserve(&mut p, size, align, 0, 0) },
        "cuMemAddressReserve",
    )?;
    Ok(p)
}

/// # Safety
/// `(p, size)` must be one reservation we own with nothing mapped in it.
pub(crate) unsafe fn mem_address_free(p: CUdeviceptr, size: usize) -> CuResult<()> {
    // SAFETY: the caller owns the reservation and gives it up.
    check(
        unsafe { sys::cuMemAddressFree(p, size) },
        "cuMemAddressFree",
    )
}

/// One physical allocation of `size` bytes (a multiple of the granularity) on device
/// `ordinal`.
pub(crate) fn mem_create(size: usize, ordinal: c_int) -> CuResult<CUmemGenericAllocationHandle> {
    let prop = pinned_device_prop(ordinal);
    let mut h: CUmemGenericAllocationHandle = 0;
    check(
        // SAFETY: `prop` is valid; writes one handle into a local (owned by the caller).
        unsafe { sys::cuMemCreate(&mut h, size, &prop, 0) },
        "cuMemCreate",
    )?;
    Ok(h)
}

/// One physical allocation like [`mem_create`], created exportable as a POSIX file
/// descriptor (`CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`), so another process can map it.
pub(crate) fn mem_create_shareable(
    size: usize,
    ordinal: c_int,
) -> CuResult<CUmemGenericAllocationHandle> {
    let mut prop = pinned_device_prop(ordinal);
    prop.requestedHandleTypes =
        sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    let mut h: CUmemGenericAllocationHandle = 0;
    check(
        // SAFETY: `prop` is valid; writes one handle into a local (owned by the caller).
        unsafe { sys::cuMemCreate(&mut h, size, &prop, 0) },
        "cuMemCreate (shareable)",
    )?;
    Ok(h)
}

/// Export `h` (created shareable, see [`mem_create_shareable`]) as a POSIX file descriptor,
/// owned by the caller. Call only when [`ipc_symbols_missing`](super::ipc_symbols_missing) returned `None`.
pub(crate) fn mem_export_fd(h: CUmemGenericAllocationHandle) -> CuResult<c_int> {
    let mut fd: c_int = -1;
    check(
        // SAFETY: for a POSIX descriptor the driver writes one int to the pointer, which
        // points to a local; `h` is a live handle of ours; flags must be 0.
        unsafe {
            sys::cuMemExportToShareableHandle(
                (&mut fd as *mut c_int).cast::<c_void>(),
                h,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        },
        "cuMemExportToShareableHandle",
    )?;
    Ok(fd)
}

/// Import the allocation another process exported as descriptor `fd` (valid here; the
/// caller still owns it and closes it). The handle is the caller's, given back with
/// [`mem_release`]. Call only when [`ipc_symbols_missing`](super::ipc_symbols_missing) returned `None`.
pub(crate) fn mem_import_fd(fd: c_int) -> CuResult<CUmemGenericAllocationHandle> {
    let mut h: CUmemGenericAllocationHandle = 0;
    check(
        // SAFETY: for a POSIX descriptor the driver takes the descriptor's value in the
        // pointer argument (it is not dereferenced); writes one handle into a local.
        unsafe {
            sys::cuMemImportFromShareableHandle(
                &mut h,
                fd as isize as *mut c_void,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            )
        },
        "cuMemImportFromShareableHandle",
    )?;
    Ok(h)
}

/// # Safety
/// `h` must be owned by the caller and mapped nowhere.
pub(crate) unsafe fn mem_release(h: CUmemGenericAllocationHandle) -> CuResult<()> {
    // SAFETY: the caller owns `h` and gives it up.
    check(unsafe { sys::cuMemRelease(h) }, "cuMemRelease")
}

/// Map all `size` bytes of `h` at `p`.
///
/// # Safety
/// `p .. p + size` must lie in a reservation we own and be unmapped; `h` must be live.
pub(crate) unsafe fn mem_map(
    p: CUdeviceptr,
    size: usize,
    h: CUmemGenericAllocationHandle,
) -> CuResult<()> {
    // SAFETY: forwarded from the caller's guarantees; offset and flags must be 0.
    check(unsafe { sys::cuMemMap(p, size, 0, h, 0) }, "cuMemMap")
}

/// Make `p .. p + size` readable and writable from each device in `ordinals`, in one call.
///
/// # Safety
/// The whole range must be mapped, by mappings we own.
pub(crate) unsafe fn mem_set_access(
    p: CUdeviceptr,
    size: usize,
    ordinals: &[c_int],
) -> CuResult<()> {
    let descs: Vec<sys::CUmemAccessDesc> = ordinals
        .iter()
        .map(|&o| sys::CUmemAccessDesc {
            location: device_location(o),
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        })
        .collect();
    // SAFETY: `descs` is a valid array of `descs.len()` descriptors; the caller guarantees
    // the range.
    check(
        unsafe { sys::cuMemSetAccess(p, size, descs.as_ptr(), descs.len()) },
        "cuMemSetAccess",
    )
}

/// # Safety
/// `p .. p + size` must cover whole mappings we own, unused by any work in flight.
pub(crate) unsafe fn mem_unmap(p: CUdeviceptr, size: usize) -> CuResult<()> {
    // SAFETY: forwarded from the caller's guarantees.
    check(unsafe { sys::cuMemUnmap(p, size) }, "cuMemUnmap")
}

// ---- pinned host memory ----------------------------------------------------------------

/// `size` bytes of page-locked host memory, usable from every context (`PORTABLE`).
pub(crate) fn mem_host_alloc(size: usize) -> CuResult<*mut c_void> {
    let mut p: *mut c_void = std::ptr::null_mut();
    check(
        // SAFETY: writes one pointer into a local; the caller owns the allocation.
        unsafe { sys::cuMemHostAlloc(&mut p, size, sys::CU_MEMHOSTALLOC_PORTABLE) },
        "cuMemHostAlloc",
    )?;
    Ok(p)
}

/// # Safety
/// `p` must come from [`mem_host_alloc`], not yet freed, and be used by nothing afterwards.
pub(crate) unsafe fn mem_free_host(p: *mut c_void) -> CuResult<()> {
    // SAFETY: the caller owns the allocation and gives it up.
    check(unsafe { sys::cuMemFreeHost(p) }, "cuMemFreeHost")
}

/// Whether `ptr` lies in page-locked host memory known to the driver (ours or anyone's).
pub(crate) fn pointer_is_host_memory(ptr: usize) -> bool {
    let mut kind: c_uint = 0;
    // SAFETY: the driver only looks the address up in its tables (it never dereferences it)
    // and writes one unsigned int into a local; unknown addresses are an error.
    let rc = unsafe {
        sys::cuPointerGetAttribute(
            (&mut kind as *mut c_uint).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr as CUdeviceptr,
        )
    };
    rc == CUresult::CUDA_SUCCESS && kind == sys::CUmemorytype::CU_MEMORYTYPE_HOST as c_uint
}

// ---- stream-ordered copies and pointer devices --------------------------------------

/// The ordinal of the device whose memory `ptr` is, or `None` when the driver does not know
/// it as device memory (host memory, pinned memory, an unknown address).
pub(crate) fn pointer_device_ordinal(ptr: usize) -> Option<i32> {
    let mut kind: c_uint = 0;
    // SAFETY: the driver only looks the address up in its tables (never dereferencing it)
    // and writes one unsigned int into a local; an unknown address is an error.
    let rc = unsafe {
        sys::cuPointerGetAttribute(
            (&mut kind as *mut c_uint).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr as CUdeviceptr,
        )
    };
    if rc != CUresult::CUDA_SUCCESS || kind != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as c_uint {
        return None;
    }
    let mut ordinal: c_int = -1;
    // SAFETY: as above; writes one int into a local.
    let rc = unsafe {
        sys::cuPointerGetAttribute(
            (&mut ordinal as *mut c_int).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr as CUdeviceptr,
        )
    };
    (rc == CUresult::CUDA_SUCCESS && ordinal >= 0).then_some(ordinal)
}

/// Copy host bytes to device memory in stream order on `s`. From pageable host memory the
/// driver stages the bytes before returning, so `src` may be dropped afterwards.
///
/// # Safety
/// `dst .. dst + src.len()` must be device memory the caller owns until the copy has run;
/// `s` live or null.
pub(crate) unsafe fn memcpy_htod_async(dst: CUdeviceptr, src: &[u8], s: CUstream) -> CuResult<()> {
    // SAFETY: `src` is a valid host slice for the call (staged by the driver before it
    // returns); the caller guarantees the destination range and the stream.
    check(
        unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), src.len(), s) },
        "cuMemcpyHtoDAsync",
    )
}

/// Copy `bytes` between device addresses in stream order (unified addressing: the two may be
/// on different devices, with or without peer access).
///
/// # Safety
/// Both ranges must be device memory the caller keeps allocated until the copy has run;
/// `s` live or null.
pub(crate) unsafe fn memcpy_async(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
    s: CUstream,
) -> CuResult<()> {
    // SAFETY: the caller guarantees both ranges and the stream; the driver reads and writes
    // only those.
    check(
        unsafe { sys::cuMemcpyAsync(dst, src, bytes, s) },
        "cuMemcpyAsync",
    )
}
