//! Sharing accelrt memory between processes (`torch.multiprocessing`'s CUDA tensors).
//!
//! Plain segments (`cuMemAlloc`) are shared by the C++ shim with CUDA's own IPC handles
//! (`cudaIpcGetMemHandle` on the segment base, `cudaIpcOpenMemHandle` in the receiver): the
//! library only says where the segment is (`accelrt_torch_segment_of`).
//!
//! Expandable (VMM) memory cannot be shared that way: its physical pages must have been
//! created shareable (`CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`) and are exported as file
//! descriptors (`cuMemExportToShareableHandle`); the receiver duplicates them
//! (`pidfd_getfd`, done by the shim), imports them (`cuMemImportFromShareableHandle`),
//! reserves an address range and maps them. Creating, exporting and importing pages is the
//! CUDA memory provider's job, which `CachingAllocator` reaches; the two functions below are
//! the C ABI for it, and call these allocator methods (to be added with the provider):
//!
//! ```text
//! /// The pages under [ptr, ptr + len) of an expandable segment, exported as POSIX file
//! /// descriptors (owned by the caller), with the page size and where `ptr` lies in the
//! /// first page. The range must lie in live blocks; the pages stay mapped here.
//! pub fn export_pages(&self, ptr: usize, len: usize) -> Result<ExportedPages>;
//! pub struct ExportedPages { pub page_size: usize, pub offset: usize, pub fds: Vec<OwnedFd> }
//!
//! /// Map pages another process exported (descriptors valid in this process) at a new
//! /// address range of this device, readable and writable by it. Dropping the result
//! /// unmaps, releases the imported handles and frees the range.
//! pub fn import_pages(&self, page_size: usize, fds: Vec<OwnedFd>) -> Result<ImportedPages>;
//! pub struct ImportedPages { pub ptr: usize, pub len: usize }
//! ```
//!
//! Until they exist, both functions fail with a message that says so and what to do instead
//! (`expandable_segments:false` in the sending process).

use std::ffi::{c_int, c_void};

use crate::errors::Failure;
use crate::state::state;
use crate::status;

/// Why expandable memory cannot be shared by this build.
fn vmm_unsupported(what: &str) -> Failure {
    format!(
        "{what}: sharing expandable (VMM) accelrt memory between processes needs the CUDA \
         provider to create pages shareable and CachingAllocator::export_pages / import_pages, \
         which this build of accelrt does not have; start the sending process with \
         ACCELRT_ALLOC_CONF=expandable_segments:false (plain segments are shared with CUDA IPC \
         handles)"
    )
    .into()
}

/// Export the pages under `[ptr, ptr + len)` (expandable memory) as file descriptors: up to
/// `cap` into `fds`; `*page_size` and `*offset` (where `ptr` lies in the first page) are set.
/// Returns the number of pages, or -1.
///
/// # Safety
/// `fds` must be NULL (with `cap` 0) or valid for `cap` writes; the other out pointers NULL or
/// valid for one write.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_ipc_export_pages(
    ptr: *const c_void,
    len: usize,
    fds: *mut c_int,
    cap: usize,
    page_size: *mut usize,
    offset: *mut usize,
) -> isize {
    let _ = (fds, cap, page_size, offset);
    let r = status("accelrt_torch_ipc_export_pages", || {
        let st = state()?;
        let addr = ptr as usize;
        let (d, a) = st
            .existing_allocators()
            .find(|(_, a)| a.contains(addr))
            .ok_or_else(|| format!("{addr:#x} is not memory accelrt allocated"))?;
        if !a.is_expandable() {
            return Err(format!(
                "{addr:#x} ({len} bytes, {}:{d}) is in a plain segment: share it with a CUDA IPC \
                 handle (accelrt_torch_segment_of gives the segment base)",
                st.kind
            )
            .into());
        }
        Err(vmm_unsupported(&format!(
            "exporting {addr:#x} ({len} bytes)"
        )))
    });
    r as isize
}

/// Map `count` pages of `page_size` bytes another process exported (descriptors already
/// valid in this process; the library owns them from the call on, also on failure) on
/// `device`; the address goes to `*ptr`. 0, or -1. Undo with
/// [`accelrt_torch_ipc_close_pages`].
///
/// # Safety
/// `fds` must be valid for `count` reads; `ptr` valid for one write.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_ipc_import_pages(
    device: c_int,
    fds: *const c_int,
    count: usize,
    page_size: usize,
    ptr: *mut *mut c_void,
) -> c_int {
    if !fds.is_null() {
        for i in 0..count {
            // SAFETY: the caller guarantees `count` readable descriptors, owned by the library
            // from the call on: closing each once is this function's duty.
            unsafe { libc::close(*fds.add(i)) };
        }
    }
    status("accelrt_torch_ipc_import_pages", || {
        if ptr.is_null() {
            return Err("ptr is NULL: pass where to write the mapped address".into());
        }
        state()?.allocator(device)?;
        Err(vmm_unsupported(&format!(
            "importing {count} page(s) of {page_size} bytes on device {device}"
        )))
    })
}

/// Unmap what [`accelrt_torch_ipc_import_pages`] mapped at `ptr`.
#[no_mangle]
pub extern "C" fn accelrt_torch_ipc_close_pages(ptr: *mut c_void) -> c_int {
    status("accelrt_torch_ipc_close_pages", || {
        Err(vmm_unsupported(&format!(
            "closing an import at {:#x}",
            ptr as usize
        )))
    })
}
