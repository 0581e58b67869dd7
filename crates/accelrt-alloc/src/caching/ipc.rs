//! Sharing expandable memory with another process (`torch.multiprocessing`'s CUDA tensors).
//!
//! A block of an expandable segment is backed by chunks (`chunks.rs`), each mapped whole at
//! its home. [`CachingAllocator::export_range`] exports the chunks under a live range as
//! file descriptors (the provider's `export_chunk`), with where each lies; the receiving
//! process gives them to [`CachingAllocator::import_range`], which imports them (the
//! provider's `import_chunk`), reserves one address range and maps them there in the same
//! layout, so the shared bytes appear at `base + offset` without a copy.
//! [`CachingAllocator::close_import`] unmaps and releases them. A chunk is mapped only
//! whole, so the receiver sees the whole chunks around the range (as CUDA IPC of a plain
//! segment shows the whole segment).
//!
//! The sender's chunks do not move or go while the block is allocated (a chunk under a live
//! block is never idle), and an imported handle keeps the physical memory alive in the
//! driver even after the sender releases it. Providers without this capability (the host's)
//! refuse, saying so.

use std::os::fd::OwnedFd;

use super::CachingAllocator;
use crate::chunks::Home;
use crate::error::{Error, Result};
use crate::pool::{BlockState, LENT};
use crate::provider::{ChunkHandle, ProviderError};

/// One exported chunk: its descriptor (owned by the caller), its size, and where it starts
/// relative to the first chunk.
#[derive(Debug)]
pub struct ExportedChunk {
    pub fd: OwnedFd,
    pub bytes: u64,
    pub at: u64,
}

/// The chunks under a shared range, in address order and contiguous.
#[derive(Debug)]
pub struct ExportedRange {
    pub chunks: Vec<ExportedChunk>,
    /// Where the shared range starts, from the first chunk's start.
    pub offset: u64,
    /// Bytes of all the chunks together.
    pub span: u64,
}

/// Chunks another process exported, mapped here at `base..base + span`.
#[derive(Debug)]
pub struct ImportedRange {
    pub base: usize,
    pub span: u64,
    handles: Vec<(ChunkHandle, usize)>,
}

impl CachingAllocator {
    /// Export the chunks under `[ptr, ptr + len)`, which must lie in one allocated block of an
    /// expandable segment. The chunks stay mapped here; the descriptors are the caller's.
    pub fn export_range(&self, ptr: usize, len: usize) -> Result<ExportedRange> {
        self.gated("export_range", || {
            let why = |m: String| {
                Error::InvalidArgument(format!(
                    "cannot share {ptr:#x} ({len} bytes) of {} with another process: {m}",
                    self.device
                ))
            };
            if !self.is_expandable() {
                return Err(why(
                    "it is in a plain segment: share it with the driver's own IPC handle of the \
                     segment (CUDA: cudaIpcGetMemHandle)"
                        .into(),
                ));
            }
            if len == 0 || ptr.checked_add(len).is_none() {
                return Err(why("an empty or overflowing range".into()));
            }
            let pool = self
                .pages
                .lookup(ptr)
                .and_then(|i| self.pools[i as usize].get())
                .ok_or_else(|| why("not memory of this allocator".into()))?;
            let page = self.vm_page as usize;
            let handles: Vec<(ChunkHandle, u64, usize)> = {
                let vm = self.vm_state.lock();
                let st = pool.state.lock();
                let seg = st
                    .segment_at(ptr)
                    .ok_or_else(|| why("no segment holds it".into()))?;
                let table = seg
                    .vm
                    .as_ref()
                    .ok_or_else(|| why("it is in a plain segment".into()))?;
                // The block holding the range must be allocated (the caller's).
                let b = st
                    .block_at(seg, ptr)
                    .map(|idx| st.block(idx))
                    .filter(|b| b.state == BlockState::Allocated)
                    .ok_or_else(|| why("it is not in an allocated block".into()))?;
                if ptr + len > b.addr + b.size as usize {
                    return Err(why(format!(
                        "it runs past its block ({:#x}, {} bytes)",
                        b.addr, b.size
                    )));
                }
                let first = (ptr - seg.base) / page;
                let last = (ptr + len - 1 - seg.base) / page;
                let mut out: Vec<(ChunkHandle, u64, usize)> = Vec::new();
                for slot in first..=last {
                    let id = table.get(slot);
                    if id >= LENT {
                        return Err(why(format!(
                            "page {slot} of its segment is not backed (an allocator bug: an \
                             allocated block is always backed)"
                        )));
                    }
                    let c = vm.chunks.get(id);
                    let Home::Mapped { seg_base, slot, .. } = c.home else {
                        return Err(why(format!("chunk {id} under it is not mapped at home")));
                    };
                    let start = seg_base + slot as usize * page;
                    if out.last().is_some_and(|&(_, _, s)| s == start) {
                        continue;
                    }
                    out.push((c.handle, c.pages as u64 * page as u64, start));
                }
                out
            };
            // Contiguous from the first chunk's start (a block's chunks tile it).
            let base = handles[0].2;
            let mut at = 0u64;
            for &(_, bytes, start) in &handles {
                if (start - base) as u64 != at {
                    return Err(why(format!(
                        "its chunks are not contiguous (one at {start:#x})"
                    )));
                }
                at += bytes;
            }
            let vm = self.vm();
            let mut chunks = Vec::with_capacity(handles.len());
            for (handle, bytes, start) in handles {
                let fd = vm
                    .export_chunk(handle)
                    .map_err(|e| provider_failure(e, "exporting memory"))?;
                chunks.push(ExportedChunk {
                    fd,
                    bytes,
                    at: (start - base) as u64,
                });
            }
            Ok(ExportedRange {
                chunks,
                offset: (ptr - base) as u64,
                span: at,
            })
        })
    }

    /// Map chunks another process exported (`(descriptor valid here, bytes)`, in their
    /// order, contiguous) at a new address range of this device, readable and writable by
    /// it. The descriptors are consumed. Undo with [`CachingAllocator::close_import`].
    pub fn import_range(&self, chunks: Vec<(OwnedFd, u64)>) -> Result<ImportedRange> {
        self.gated("import_range", || {
            let vm = self.provider.virtual_memory().ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{} has no virtual memory: it cannot map memory of another process (sharing \
                     expandable memory needs the CUDA backend)",
                    self.device
                ))
            })?;
            let g = vm.granularity() as u64;
            if chunks.is_empty() {
                return Err(Error::InvalidArgument("no chunks to import".into()));
            }
            let mut span = 0u64;
            for (_, bytes) in &chunks {
                if *bytes == 0 || g == 0 || bytes % g != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "an imported chunk of {bytes} bytes is not a positive multiple of the \
                         {g}-byte granularity of {}",
                        self.device
                    )));
                }
                span = span
                    .checked_add(*bytes)
                    .filter(|&s| s <= usize::MAX as u64 / 2)
                    .ok_or_else(|| Error::InvalidArgument("the imported chunks overflow".into()))?;
            }
            let mut handles: Vec<(ChunkHandle, usize)> = Vec::with_capacity(chunks.len());
            let undo = |handles: &[(ChunkHandle, usize)]| {
                for &(h, n) in handles {
                    // SAFETY: imported just now by us, mapped nowhere.
                    unsafe { vm.release(h, n) };
                }
            };
            for (fd, bytes) in chunks {
                match vm.import_chunk(fd, bytes as usize) {
                    Ok(h) => handles.push((h, bytes as usize)),
                    Err(e) => {
                        undo(&handles);
                        return Err(provider_failure(e, "importing memory"));
                    }
                }
            }
            let base = match vm.reserve(span as usize) {
                Ok(b) => b,
                Err(e) => {
                    undo(&handles);
                    return Err(provider_failure(
                        e,
                        "reserving addresses for imported memory",
                    ));
                }
            };
            // SAFETY: `base` is a fresh reservation of `span` bytes, aligned to the granularity;
            // the handles are live and cover it exactly, one after another.
            if let Err(e) = unsafe { vm.map(base, &handles) } {
                undo(&handles);
                // SAFETY: reserved just now; `map` left nothing mapped on failure.
                unsafe { vm.unreserve(base, span as usize) };
                return Err(provider_failure(e, "mapping imported memory"));
            }
            Ok(ImportedRange {
                base,
                span,
                handles,
            })
        })
    }

    /// Unmap and release what [`CachingAllocator::import_range`] mapped. Waits for the
    /// device's queued work first (it may still read the memory).
    pub fn close_import(&self, range: ImportedRange) -> Result<()> {
        self.gated("close_import", || {
            let vm = self.provider.virtual_memory().ok_or_else(|| {
                Error::InvalidArgument(format!("{} has no virtual memory", self.device))
            })?;
            if let Some(events) = &self.events {
                events.synchronize_device(self.device.index)?;
            }
            // SAFETY: `range` came from `import_range` (it cannot be built elsewhere), is
            // consumed here, and the device's work on it has completed.
            unsafe {
                vm.unmap(range.base, range.span as usize);
                for &(h, n) in &range.handles {
                    vm.release(h, n);
                }
                vm.unreserve(range.base, range.span as usize);
            }
            Ok(())
        })
    }
}

fn provider_failure(e: ProviderError, what: &'static str) -> Error {
    match e.into_parts() {
        (message, Some(code)) => Error::Driver {
            call: what,
            code: Some(code),
            message,
        },
        (message, None) => Error::InvalidArgument(format!("{what}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{AllocatorConfig, Device, DeviceType, HostMemory, Stream};

    const DEV: Device = Device {
        kind: DeviceType::Host,
        index: 0,
    };
    const S: Stream = Stream {
        device: DEV,
        index: 0,
    };

    fn allocator(expandable: bool) -> CachingAllocator {
        let config = AllocatorConfig {
            debug_checks: true,
            expandable_segments: expandable,
            ..AllocatorConfig::default()
        };
        CachingAllocator::new(DEV, Arc::new(HostMemory::new(256 << 20)), None, config).unwrap()
    }

    #[test]
    fn the_host_provider_refuses_to_export_and_import_saying_why() {
        let a = allocator(true);
        assert!(a.is_expandable());
        let p = a.raw_alloc(3 << 20, S).unwrap();
        let e = a.export_range(p, 3 << 20).unwrap_err().to_string();
        assert!(e.contains("cannot export memory to other processes"), "{e}");
        assert!(e.contains("CUDA backend"), "{e}");
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let g = a.vm().granularity() as u64;
        let e = a.import_range(vec![(fd, g)]).unwrap_err().to_string();
        assert!(
            e.contains("cannot import memory from other processes"),
            "{e}"
        );
        a.raw_free(p).unwrap();
    }

    #[test]
    fn ranges_that_cannot_be_shared_are_refused_with_the_reason() {
        let a = allocator(true);
        let p = a.raw_alloc(1 << 20, S).unwrap();
        let size = a.block_size(p).unwrap() as usize;
        for (ptr, len, words) in [
            (p, 0, "empty"),
            (p, usize::MAX, "overflowing"),
            (p, size + 4096, "runs past its block"),
            (1usize << 12, 16, "not memory of this allocator"),
        ] {
            let e = a.export_range(ptr, len).unwrap_err().to_string();
            assert!(e.contains(words), "{words:?} not in {e}");
        }
        a.raw_free(p).unwrap();
        let e = a.export_range(p, 512).unwrap_err().to_string();
        assert!(e.contains("not in an allocated block"), "{e}");

        let plain = allocator(false);
        let q = plain.raw_alloc(1 << 20, S).unwrap();
        let e = plain.export_range(q, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("plain segment"), "{e}");
        plain.raw_free(q).unwrap();
    }

    #[test]
    fn imports_of_bad_sizes_are_refused_before_the_provider_is_asked() {
        let a = allocator(true);
        let null = || -> OwnedFd { std::fs::File::open("/dev/null").unwrap().into() };
        let g = a.vm().granularity() as u64;
        for (chunks, words) in [
            (vec![], "no chunks"),
            (vec![(null(), 0)], "positive multiple"),
            (vec![(null(), g + 1)], "positive multiple"),
            (vec![(null(), g), (null(), u64::MAX - g + 1)], "overflow"),
            (vec![(null(), 1 << 62), (null(), 1 << 62)], "overflow"),
        ] {
            let e = a.import_range(chunks).unwrap_err().to_string();
            assert!(e.contains(words), "{words:?} not in {e}");
        }
    }
}
