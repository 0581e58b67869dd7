//! Buffer metadata (sizes, ids, shapes, shared buffers) and the limits' setters.

use super::*;

impl CachingAllocator {
    // ---- buffer metadata -------------------------------------------------------------------

    /// Bytes the caller asked for when allocating `ptr` (before rounding).
    pub fn requested_size(&self, ptr: usize) -> Result<u64> {
        self.with_live_block(ptr, "requested_size", |st, b, _| st.block(b).requested)
    }

    /// Bytes reserved for `ptr` (the rounded block size).
    pub fn block_size(&self, ptr: usize) -> Result<u64> {
        self.with_live_block(ptr, "block_size", |st, b, _| st.block(b).size)
    }

    /// A unique id for the allocation at `ptr` among this allocator's allocations (never 0,
    /// never reused): the pool's allocation count times the number of pool slots, plus the
    /// pool's slot (stream pools, then private pools), so ids of different pools never meet.
    pub fn buffer_id(&self, ptr: usize) -> Result<u64> {
        const POOL_SLOTS: u64 = (MAX_STREAM_POOLS + MAX_PRIVATE_POOLS) as u64;
        self.with_live_block(ptr, "buffer_id", |st, b, pool| {
            st.block(b).id * POOL_SLOTS + u64::from(pool.stream.index)
        })
    }

    /// Attach a tensor shape to a live buffer (kept until it is freed).
    pub fn set_buffer_shape(&self, ptr: usize, shape: &[i64]) -> Result<()> {
        self.with_live_block(ptr, "set_buffer_shape", |_, _, _| {
            let mut shapes = self.shapes.lock();
            shapes.insert(ptr, shape.to_vec());
            self.rare.set(RareFlags::SHAPES, true);
        })
    }

    /// The shape attached with [`CachingAllocator::set_buffer_shape`] (empty if none).
    pub fn buffer_shape(&self, ptr: usize) -> Result<Vec<i64>> {
        self.with_live_block(ptr, "buffer_shape", |_, _, _| {
            self.shapes.lock().get(&ptr).cloned().unwrap_or_default()
        })
    }

    #[cold]
    pub(super) fn forget_shape(&self, ptr: usize) {
        let mut shapes = self.shapes.lock();
        if shapes.remove(&ptr).is_some() && shapes.is_empty() {
            self.rare.set(RareFlags::SHAPES, false);
        }
    }

    /// Whether device memory is host-visible, so buffers can be shared with the host.
    pub fn is_shared_storage_supported(&self) -> bool {
        self.provider.host_visible()
    }

    /// Whether `ptr` is a live buffer the host can address directly.
    pub fn is_shared_buffer(&self, ptr: usize) -> bool {
        self.provider.host_visible()
            && self
                .with_live_block(ptr, "is_shared_buffer", |_, _, _| ())
                .is_ok()
    }

    /// The host address of a shared buffer. Refused where device memory is not
    /// host-visible (CUDA: memory from `cuMemAlloc` / `cuMemCreate` has no host address; use
    /// the backend's pinned allocator for buffers both sides address).
    pub fn shared_host_ptr(&self, ptr: usize) -> Result<*mut u8> {
        if !self.provider.host_visible() {
            return Err(Error::unsupported(
                self.device.kind,
                "shared_host_ptr() (device memory here is not host-visible: use the \
                 backend's pinned_allocator() for memory both the host and the device address)",
            ));
        }
        self.with_live_block(ptr, "shared_host_ptr", |_, _, _| ptr as *mut u8)
    }

    /// Allocate a buffer holding `value` (MPS's scalar buffers), written by the host at
    /// once: for host-visible memory only. On any backend, including CUDA, use
    /// `accelrt::Backend::alloc_scalar_with_value`, which writes in stream order.
    pub fn alloc_scalar_with_value(&self, value: &[u8], stream: Stream) -> Result<usize> {
        if !self.provider.host_visible() {
            return Err(Error::unsupported(
                self.device.kind,
                "CachingAllocator::alloc_scalar_with_value() (the host cannot write device \
                 memory here: use Backend::alloc_scalar_with_value, which writes in stream order)",
            ));
        }
        if value.is_empty() {
            return Err(Error::InvalidArgument(
                "alloc_scalar_with_value needs at least one byte".into(),
            ));
        }
        let ptr = self.raw_alloc(value.len(), stream)?;
        // SAFETY: `ptr` is a fresh block of at least `value.len()` bytes of host-visible
        // memory that nobody else has yet.
        unsafe { copy_into_host_visible(ptr, value) };
        Ok(ptr)
    }

    /// Check that `ptr .. ptr + len` lies inside one live allocation (an interior range is
    /// fine, as a tensor view's is): what a copy between device buffers may touch. An error
    /// names `what` and says which part of the check failed.
    pub fn check_live_range(&self, ptr: usize, len: usize, what: &'static str) -> Result<()> {
        let end = ptr.checked_add(len).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{what}: {ptr:#x} + {len} bytes runs past the end of the address space"
            ))
        })?;
        let pool = self
            .pages
            .lookup(ptr)
            .and_then(|i| self.pools[i as usize].get())
            .ok_or(Error::InvalidPointer {
                ptr,
                context: "not inside memory of this allocator",
            })?;
        let st = pool.state.lock();
        let Some(b) = st.segment_at(ptr).and_then(|seg| st.block_at(seg, ptr)) else {
            return Err(Error::InvalidPointer {
                ptr,
                context: "not inside memory of this allocator",
            });
        };
        let block = st.block(b);
        if block.state != BlockState::Allocated || st.live_block(block.addr).is_none() {
            return Err(Error::InvalidPointer {
                ptr,
                context: "inside a freed block (a use after free?)",
            });
        }
        let block_end = block.addr + block.size as usize;
        if end > block_end {
            return Err(Error::InvalidArgument(format!(
                "{what}: {ptr:#x} + {len} bytes runs {} bytes past the end of its allocation \
                 ({:#x}, {} bytes)",
                end - block_end,
                block.addr,
                block.size
            )));
        }
        Ok(())
    }

    /// Whether `ptr` lies inside memory this allocator holds (live or cached).
    pub fn contains(&self, ptr: usize) -> bool {
        let index = self.segment_index.read();
        index
            .range(..=ptr)
            .next_back()
            .is_some_and(|(&base, &size)| ptr < base + size as usize)
    }

    // ---- limits ----------------------------------------------------------------------------

    pub(super) fn check_ratio(what: &str, r: f64) -> Result<()> {
        if !(0.0..=2.0).contains(&r) {
            return Err(Error::InvalidArgument(format!(
                "{what} must be in [0, 2] (0 disables), got {r}"
            )));
        }
        Ok(())
    }

    /// Hard limit as a ratio of the recommended maximum; 0 disables.
    pub fn set_high_watermark_ratio(&self, ratio: f64) -> Result<()> {
        Self::check_ratio("high_watermark_ratio", ratio)?;
        let low = self.low_watermark_ratio();
        if ratio > 0.0 && low > ratio {
            return Err(Error::InvalidArgument(format!(
                "high_watermark_ratio {ratio} is below low_watermark_ratio {low}"
            )));
        }
        self.limits.high_watermark.store(ratio.to_bits(), Relaxed);
        Ok(())
    }
    pub fn high_watermark_ratio(&self) -> f64 {
        f64::from_bits(self.limits.high_watermark.load(Relaxed))
    }
    /// Soft limit as a ratio of the recommended maximum; 0 disables garbage collection.
    pub fn set_low_watermark_ratio(&self, ratio: f64) -> Result<()> {
        Self::check_ratio("low_watermark_ratio", ratio)?;
        let high = self.high_watermark_ratio();
        if high > 0.0 && ratio > high {
            return Err(Error::InvalidArgument(format!(
                "low_watermark_ratio {ratio} exceeds high_watermark_ratio {high}"
            )));
        }
        self.limits.low_watermark.store(ratio.to_bits(), Relaxed);
        Ok(())
    }
    pub fn low_watermark_ratio(&self) -> f64 {
        f64::from_bits(self.limits.low_watermark.load(Relaxed))
    }
    /// Cap reserved memory at `fraction` of device memory, in [0, 1] (0 allows nothing, as
    /// in PyTorch).
    pub fn set_memory_fraction(&self, fraction: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::InvalidArgument(format!(
                "memory fraction must be in [0, 1] (0 allows nothing), got {fraction}"
            )));
        }
        self.limits.fraction.store(fraction.to_bits(), Relaxed);
        Ok(())
    }
    pub fn memory_fraction(&self) -> Option<f64> {
        let f = f64::from_bits(self.limits.fraction.load(Relaxed));
        (f >= 0.0).then_some(f) // unset is negative (`NO_FRACTION`)
    }
    /// Change `roundup_power2_divisions` (one entry per size interval, as
    /// [`AllocatorConfig::roundup_power2_divisions`]; each 0 or a power of two) and
    /// `garbage_collection_threshold` (`None` turns it off; else in (0, 1)) at run time, as
    /// PyTorch's `torch.cuda.memory._set_allocator_settings` does. Requests made after the
    /// call round with the new divisions; blocks already cached keep their sizes. Nothing
    /// changes when an argument is invalid.
    ///
    /// [`AllocatorConfig::roundup_power2_divisions`]: crate::AllocatorConfig::roundup_power2_divisions
    pub fn set_rounding(
        &self,
        divisions: &[u32; crate::config::ROUNDUP_INTERVALS],
        garbage_collection_threshold: Option<f64>,
    ) -> Result<()> {
        Self::check_rounding(divisions, garbage_collection_threshold)?;
        for (slot, d) in self.rounding.iter().zip(divisions) {
            slot.store(*d, Relaxed);
        }
        self.limits.gc_threshold.store(
            garbage_collection_threshold.unwrap_or(0.0).to_bits(),
            Relaxed,
        );
        Ok(())
    }

    /// Whether [`CachingAllocator::set_rounding`] would accept these settings (for callers that
    /// keep them for allocators not built yet).
    pub fn check_rounding(
        divisions: &[u32; crate::config::ROUNDUP_INTERVALS],
        garbage_collection_threshold: Option<f64>,
    ) -> Result<()> {
        if let Some((i, d)) = divisions
            .iter()
            .enumerate()
            .find(|(_, d)| **d != 0 && !d.is_power_of_two())
        {
            return Err(Error::InvalidArgument(format!(
                "roundup_power2_divisions: interval {i} has {d} divisions; use 0 or a power of two"
            )));
        }
        if let Some(t) = garbage_collection_threshold {
            if !(t > 0.0 && t < 1.0) {
                return Err(Error::InvalidArgument(format!(
                    "garbage_collection_threshold must be in (0, 1), got {t}"
                )));
            }
        }
        Ok(())
    }

    /// The `roundup_power2_divisions` in effect, one entry per size interval.
    pub fn roundup_power2_divisions(&self) -> [u32; crate::config::ROUNDUP_INTERVALS] {
        std::array::from_fn(|i| self.rounding[i].load(Relaxed))
    }

    /// The `garbage_collection_threshold` in effect.
    pub fn garbage_collection_threshold(&self) -> Option<f64> {
        let t = f64::from_bits(self.limits.gc_threshold.load(Relaxed));
        (t > 0.0).then_some(t)
    }

    /// The low watermark in bytes (MPS's `getLowWatermarkLimit`): above it, cached memory
    /// is released before the allocator grows. `None` when no low watermark is set.
    pub fn low_watermark_limit(&self) -> Option<u64> {
        let low = self.low_watermark_ratio();
        (low > 0.0).then(|| (self.provider.recommended_max() as f64 * low) as u64)
    }
    /// The high watermark in bytes (MPS's `getHighWatermarkLimit`): reserved memory never
    /// exceeds it. `None` when no high watermark is set.
    pub fn high_watermark_limit(&self) -> Option<u64> {
        let high = self.high_watermark_ratio();
        (high > 0.0).then(|| (self.provider.recommended_max() as f64 * high) as u64)
    }
    /// Bytes left before the low watermark, negative once reserved memory is above it (MPS's
    /// signed `getLowWatermarkValue`). `None` when no low watermark is set.
    pub fn low_watermark_value(&self) -> Option<i64> {
        self.low_watermark_limit().map(|limit| {
            let reserved = self.reserved_bytes();
            if limit >= reserved {
                i64::try_from(limit - reserved).unwrap_or(i64::MAX)
            } else {
                i64::try_from(reserved - limit).map_or(i64::MIN, |over| -over)
            }
        })
    }
    /// Bytes that can still be reserved before the low watermark (0 when above it; `None`
    /// when no low watermark is set).
    pub fn low_watermark_headroom(&self) -> Option<u64> {
        let low = self.low_watermark_ratio();
        (low > 0.0).then(|| {
            ((self.provider.recommended_max() as f64 * low) as u64)
                .saturating_sub(self.reserved_bytes())
        })
    }
}
