//! Device memory for the caching allocator: each segment is one `wgpu::Buffer`.
//!
//! wgpu has no device pointers, so addresses are accelrt's own: every device reserves a
//! range of the process's address space (inaccessible, never backed: `mmap(PROT_NONE)` /
//! `VirtualAlloc(MEM_RESERVE)`), and a segment is given a 2 MiB-aligned piece of it, placed
//! top-down as Linux places mappings (so trace replays take the host backend's decisions). No host
//! object can ever live at such an address, so pointers of different devices and host
//! pointers never collide, and the allocator's page map sees ordinary user-space addresses.
//! [`WgpuMemory::resolve`] maps an address back to its buffer and offset for copies and
//! kernels.
//!
//! wgpu has no virtual memory (no sparse buffers, no mapping of memory objects at chosen
//! places), so [`MemoryProvider::virtual_memory`] is `None` and the allocator uses plain
//! segments, as with `expandable_segments:false`.
//!
//! Buffers are `STORAGE | COPY_SRC | COPY_DST`. They are not host-visible: wgpu refuses to
//! use a buffer in a submission while it is mapped, so no buffer can be addressed by the host
//! and the GPU at once (what MPS calls shared storage); reads and writes go through the
//! stream ([`crate::WgpuDriver::read`], [`crate::WgpuDriver::write`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use accelrt::alloc::{MemoryProvider, ProviderError};
use accelrt::error::{DeviceError, DeviceResult};
use parking_lot::{Mutex, RwLock};

use crate::device::DeviceShared;

/// Alignment and granularity of segments in the reserved address range.
pub const ADDRESS_GRANULARITY: usize = 2 << 20;

/// Least address space a device reserves (it is never backed, so this costs nothing).
const MIN_RESERVATION: u64 = 64 << 30;

/// The most address space a device reserves.
const MAX_RESERVATION: u64 = 4 << 40;

/// A range of address space nobody else can be given.
struct Reservation {
    base: usize,
    size: usize,
    /// What the OS returned (before aligning `base`), for giving it back.
    raw: usize,
    raw_size: usize,
}

impl Reservation {
    /// Reserve `size` bytes aligned to [`ADDRESS_GRANULARITY`].
    fn new(size: usize) -> std::result::Result<Self, String> {
        let raw_size = size + ADDRESS_GRANULARITY;
        let raw = os::reserve(raw_size)?;
        let base = raw.next_multiple_of(ADDRESS_GRANULARITY);
        Ok(Reservation {
            base,
            size,
            raw,
            raw_size,
        })
    }

    fn contains(&self, ptr: usize) -> bool {
        ptr >= self.base && ptr - self.base < self.size
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: `raw`/`raw_size` are exactly what `os::reserve` returned, reserved once.
        unsafe { os::release(self.raw, self.raw_size) }
    }
}

#[cfg(unix)]
mod os {
    pub(super) fn reserve(size: usize) -> Result<usize, String> {
        #[cfg(target_os = "linux")]
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        #[cfg(not(target_os = "linux"))]
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: an anonymous mapping at an address of the kernel's choice, inaccessible
        // (PROT_NONE): it touches no existing memory.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), size, libc::PROT_NONE, flags, -1, 0) };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "reserving {size} bytes of address space (mmap PROT_NONE) failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(p as usize)
    }

    /// # Safety
    /// `(addr, size)` must be one mapping from `reserve`, not yet released.
    pub(super) unsafe fn release(addr: usize, size: usize) {
        // SAFETY: the caller passes a whole mapping of ours; nothing is ever accessed there.
        unsafe { libc::munmap(addr as *mut libc::c_void, size) };
    }
}

#[cfg(windows)]
mod os {
    use std::ffi::c_void;

    const MEM_RESERVE: u32 = 0x2000;
    const MEM_RELEASE: u32 = 0x8000;
    const PAGE_NOACCESS: u32 = 0x01;

    #[link(name = "kernel32")]
    extern "system" {
        fn VirtualAlloc(addr: *mut c_void, size: usize, kind: u32, protect: u32) -> *mut c_void;
        fn VirtualFree(addr: *mut c_void, size: usize, kind: u32) -> i32;
    }

    pub(super) fn reserve(size: usize) -> Result<usize, String> {
        // SAFETY: reserves (does not commit) address space at a place of the system's choice.
        let p = unsafe { VirtualAlloc(std::ptr::null_mut(), size, MEM_RESERVE, PAGE_NOACCESS) };
        if p.is_null() {
            return Err(format!(
                "reserving {size} bytes of address space (VirtualAlloc MEM_RESERVE) failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(p as usize)
    }

    /// # Safety
    /// `addr` must be one reservation from `reserve`, not yet released.
    pub(super) unsafe fn release(addr: usize, _size: usize) {
        // SAFETY: the caller passes a reservation of ours; MEM_RELEASE takes size 0.
        unsafe { VirtualFree(addr as *mut c_void, 0, MEM_RELEASE) };
    }
}

/// Free ranges of the reservation (offset -> length, offsets counted down from its top),
/// first fit, joined when given back: segments are placed top-down, as Linux places
/// mappings, so the allocator (which breaks ties between equally old segments by address)
/// takes the same decisions as over the host backend's `mmap`ed segments.
#[derive(Debug, Default)]
struct Space {
    free: BTreeMap<usize, usize>,
    end: usize,
}

impl Space {
    fn take(&mut self, len: usize, limit: usize) -> Option<usize> {
        let fit = self
            .free
            .iter()
            .find(|(_, &l)| l >= len)
            .map(|(&o, &l)| (o, l));
        if let Some((off, l)) = fit {
            self.free.remove(&off);
            if l > len {
                self.free.insert(off + len, l - len);
            }
            return Some(off);
        }
        if limit - self.end < len {
            return None;
        }
        self.end += len;
        Some(self.end - len)
    }

    fn give(&mut self, mut off: usize, mut len: usize) {
        if let Some((&prev, &plen)) = self.free.range(..off).next_back() {
            if prev + plen == off {
                self.free.remove(&prev);
                off = prev;
                len += plen;
            }
        }
        if let Some(next) = self.free.remove(&(off + len)) {
            len += next;
        }
        if off + len == self.end {
            self.end = off;
        } else {
            self.free.insert(off, len);
        }
    }
}

/// One segment: its buffer and size in bytes.
struct Segment {
    buffer: wgpu::Buffer,
    size: u64,
}

/// A device's memory provider: segments are `wgpu::Buffer`s at addresses of the device's
/// reserved range.
pub struct WgpuMemory {
    device: Arc<DeviceShared>,
    reservation: Reservation,
    space: Mutex<Space>,
    segments: RwLock<BTreeMap<usize, Segment>>,
    held: AtomicU64,
}

impl std::fmt::Debug for WgpuMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuMemory")
            .field("device", &self.device.label())
            .field("reserved_address_space", &self.reservation.size)
            .field("segments", &self.segments.read().len())
            .field("held", &self.held.load(Ordering::Relaxed))
            .finish()
    }
}

impl WgpuMemory {
    pub(crate) fn new(device: Arc<DeviceShared>) -> std::result::Result<Self, String> {
        let want = device
            .memory
            .total
            .saturating_mul(4)
            .clamp(MIN_RESERVATION, MAX_RESERVATION);
        let size = usize::try_from(want)
            .map_err(|_| "this platform's address space is too small".to_string())?
            .next_multiple_of(ADDRESS_GRANULARITY);
        Ok(WgpuMemory {
            reservation: Reservation::new(size)?,
            device,
            space: Mutex::new(Space::default()),
            segments: RwLock::new(BTreeMap::new()),
            held: AtomicU64::new(0),
        })
    }

    /// The buffer holding `[ptr, ptr + len)` and the offset of `ptr` in it; an error when the
    /// range is not inside one live segment of this device.
    pub fn resolve(&self, ptr: usize, len: u64) -> DeviceResult<(wgpu::Buffer, u64)> {
        let segments = self.segments.read();
        let (base, segment) =
            segments
                .range(..=ptr)
                .next_back()
                .ok_or(DeviceError::InvalidPointer {
                    ptr,
                    context: "not inside a segment of this wgpu device",
                })?;
        let offset = (ptr - base) as u64;
        if offset >= segment.size || len > segment.size - offset {
            return Err(if offset >= segment.size {
                DeviceError::InvalidPointer {
                    ptr,
                    context: "not inside a segment of this wgpu device",
                }
            } else {
                DeviceError::InvalidArgument(format!(
                    "{len} bytes at {ptr:#x} run past the end of its segment ({} bytes from \
                     {base:#x})",
                    segment.size
                ))
            });
        }
        Ok((segment.buffer.clone(), offset))
    }

    /// Whether `ptr` lies in this device's reserved address range.
    pub fn owns_address(&self, ptr: usize) -> bool {
        self.reservation.contains(ptr)
    }

    /// Live segments.
    pub fn segment_count(&self) -> usize {
        self.segments.read().len()
    }

    fn create_buffer(&self, size: u64) -> std::result::Result<wgpu::Buffer, ProviderError> {
        let device = &self.device.device;
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("accelrt segment"),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let invalid = pollster::block_on(validation.pop());
        let out_of_memory = pollster::block_on(oom.pop());
        if out_of_memory.is_some() {
            return Err(ProviderError::OutOfMemory);
        }
        if let Some(e) = invalid {
            return Err(ProviderError::Failed(format!(
                "wgpu::Device::create_buffer of {size} bytes on {}: {e}",
                self.device.label()
            )));
        }
        Ok(buffer)
    }
}

impl MemoryProvider for WgpuMemory {
    fn allocate(&self, size: usize) -> std::result::Result<usize, ProviderError> {
        if size == 0 {
            return Err(ProviderError::Failed(
                "a segment of 0 bytes was requested".into(),
            ));
        }
        let max = self.device.limits.max_buffer_size;
        if size as u64 > max {
            return Err(ProviderError::Failed(format!(
                "a segment of {size} bytes is larger than {}'s max_buffer_size ({max} bytes): \
                 wgpu cannot create a buffer that large",
                self.device.label()
            )));
        }
        let span = size.next_multiple_of(ADDRESS_GRANULARITY);
        let offset = self
            .space
            .lock()
            .take(span, self.reservation.size)
            .ok_or(ProviderError::OutOfMemory)?;
        let buffer = match self.create_buffer(size as u64) {
            Ok(b) => b,
            Err(e) => {
                self.space.lock().give(offset, span);
                return Err(e);
            }
        };
        // Offsets count down from the top of the range, as Linux places mappings.
        let ptr = self.reservation.base + self.reservation.size - offset - span;
        self.segments.write().insert(
            ptr,
            Segment {
                buffer,
                size: size as u64,
            },
        );
        self.held.fetch_add(size as u64, Ordering::Relaxed);
        Ok(ptr)
    }

    unsafe fn free(&self, ptr: usize, size: usize) {
        let removed = self.segments.write().remove(&ptr);
        let Some(segment) = removed else {
            debug_assert!(false, "free of {ptr:#x}, which is not a segment");
            return;
        };
        debug_assert_eq!(segment.size, size as u64);
        // wgpu keeps the memory until work queued on it has finished (and a graph holding
        // the buffer has let go); the poll lets it reclaim what is already idle.
        drop(segment.buffer);
        let _ = self.device.device.poll(wgpu::PollType::Poll);
        self.held.fetch_sub(size as u64, Ordering::Relaxed);
        let span = size.next_multiple_of(ADDRESS_GRANULARITY);
        self.space.lock().give(
            self.reservation.base + self.reservation.size - ptr - span,
            span,
        );
    }

    fn memory_info(&self) -> (u64, u64) {
        let now = crate::adapter::memory_figures(&self.device.adapter);
        let free = match now.usage {
            Some(used) => now.budget.saturating_sub(used),
            None => now.total.saturating_sub(self.driver_allocated()),
        };
        (free.min(now.total), now.total)
    }

    /// The budget when the device was opened (MPS's recommended working set, CUDA's free
    /// memory at start): the watermarks are ratios of it.
    fn recommended_max(&self) -> u64 {
        self.device.memory.budget
    }

    fn host_visible(&self) -> bool {
        false
    }

    fn driver_allocated(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_space_is_reused_first_fit_and_joined() {
        let mut s = Space::default();
        let g = ADDRESS_GRANULARITY;
        let limit = 8 * g;
        let a = s.take(2 * g, limit).unwrap();
        let b = s.take(g, limit).unwrap();
        let c = s.take(g, limit).unwrap();
        assert_eq!((a, b, c), (0, 2 * g, 3 * g));
        s.give(b, g);
        assert_eq!(s.take(g, limit), Some(b), "the hole is reused");
        s.give(a, 2 * g);
        s.give(b, g);
        assert_eq!(s.free.get(&0), Some(&(3 * g)), "neighbours join");
        s.give(c, g);
        assert_eq!((s.end, s.free.len()), (0, 0), "all given back");
        assert_eq!(s.take(9 * g, limit), None, "past the reservation");
    }

    #[test]
    fn reservations_are_aligned_and_inaccessible_ranges_of_their_own() {
        let r = Reservation::new(64 << 20).unwrap();
        assert_eq!(r.base % ADDRESS_GRANULARITY, 0);
        assert!(r.contains(r.base) && r.contains(r.base + (64 << 20) - 1));
        assert!(!r.contains(r.base + (64 << 20)));
        let local = 0u8;
        assert!(!r.contains(&local as *const u8 as usize));
    }
}
