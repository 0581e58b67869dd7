//! The limits on reserved memory: the hard limit (the device, `per_process_memory_fraction`,
//! `high_watermark_ratio`: [`HardLimit`], each with its hint), the soft limit above which
//! cached memory goes back before the allocator grows (low watermark,
//! `garbage_collection_threshold`), counting reserved bytes against the hard limit, and the
//! out-of-memory error with its report.

use super::*;

impl CachingAllocator {
    /// The hard limit on reserved bytes and its description.
    pub(super) fn hard_limit(&self) -> Option<(u64, HardLimit)> {
        let (_, total) = self.provider.memory_info();
        let mut limit: Option<(u64, HardLimit)> = None;
        let fraction = f64::from_bits(self.limits.fraction.load(Relaxed));
        if fraction >= 0.0 {
            let bytes = (total as f64 * fraction) as u64;
            limit = Some((bytes, HardLimit::Fraction { fraction, bytes }));
        }
        let high = f64::from_bits(self.limits.high_watermark.load(Relaxed));
        if high > 0.0 {
            let recommended = self.provider.recommended_max();
            let bytes = (recommended as f64 * high) as u64;
            if limit.as_ref().is_none_or(|(l, _)| bytes < *l) {
                limit = Some((
                    bytes,
                    HardLimit::HighWatermark {
                        ratio: high,
                        recommended,
                        bytes,
                    },
                ));
            }
        }
        limit
    }

    /// The soft limit above which cached segments are released before taking new ones.
    pub(super) fn soft_limit(&self) -> Option<u64> {
        let low = f64::from_bits(self.limits.low_watermark.load(Relaxed));
        let mut soft = (low > 0.0).then(|| (self.provider.recommended_max() as f64 * low) as u64);
        if let Some(t) = self.garbage_collection_threshold() {
            let fraction = f64::from_bits(self.limits.fraction.load(Relaxed));
            if fraction >= 0.0 {
                let bytes = (self.provider.memory_info().1 as f64 * fraction * t) as u64;
                soft = Some(soft.map_or(bytes, |s| s.min(bytes)));
            }
        }
        soft
    }

    /// Count `bytes` more as reserved if the hard limit allows; returns the new total.
    pub(super) fn claim_reserved(&self, bytes: u64) -> std::result::Result<u64, SegmentFailure> {
        let limit = self.hard_limit();
        let mut cur = self.reserved.load(Relaxed);
        loop {
            let next = cur.saturating_add(bytes);
            if let Some((max, ref what)) = limit {
                if next > max {
                    return Err(SegmentFailure::Limit(*what));
                }
            }
            match self
                .reserved
                .compare_exchange_weak(cur, next, Relaxed, Relaxed)
            {
                Ok(_) => return Ok(next),
                Err(actual) => cur = actual,
            }
        }
    }

    #[cold]
    pub(super) fn out_of_memory(&self, requested: u64, limit: HardLimit) -> Error {
        self.counters.num_ooms.fetch_add(1, Relaxed);
        let (free, total) = self.provider.memory_info();
        if self.history.enabled() {
            self.history
                .record(TraceAction::Oom, free, requested, u32::MAX);
        }
        let info = OomInfo {
            device: self.device,
            requested,
            device_total: total,
            device_free: free,
        };
        for obs in self.oom_observers.read().clone() {
            obs(&info);
        }
        let allocated = self.allocated_bytes();
        let reserved = self.reserved.load(Relaxed);
        let unallocated = reserved.saturating_sub(allocated);
        let hint = if let Some(hint) = limit.hint() {
            hint.to_string()
        } else if unallocated > requested / 2 && unallocated > (32 << 20) {
            "Much of the reserved memory is cached but unallocated: fragmentation. Try expandable_segments:true, \
             or max_split_size_mb to keep large blocks whole."
                .to_string()
        } else {
            "Free memory (tensors, other processes on the device) or reduce the working set."
                .to_string()
        };
        Error::OutOfMemory(Box::new(OomReport {
            device: self.device.to_string(),
            requested,
            device_total: total,
            device_free: free,
            allocated,
            reserved_unallocated: unallocated,
            limit: limit.to_string(),
            hint,
        }))
    }
}

/// The limit an allocation hit: the device itself, or one of the configured caps.
#[derive(Debug, Clone, Copy)]
pub(super) enum HardLimit {
    Device,
    /// `per_process_memory_fraction` of the device's total.
    Fraction {
        fraction: f64,
        bytes: u64,
    },
    /// `high_watermark_ratio` times the recommended maximum.
    HighWatermark {
        ratio: f64,
        recommended: u64,
        bytes: u64,
    },
}

impl HardLimit {
    /// What to try when this limit is hit (`None`: it depends on the memory's state).
    fn hint(&self) -> Option<&'static str> {
        match self {
            HardLimit::Device => None,
            HardLimit::Fraction { .. } => {
                Some("Raise per_process_memory_fraction, or free memory before this allocation.")
            }
            HardLimit::HighWatermark { .. } => Some(
                "Raise high_watermark_ratio (0 disables the limit), or free memory before this allocation.",
            ),
        }
    }
}

/// The limit as the OOM report names it.
impl std::fmt::Display for HardLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            HardLimit::Device => f.write_str("device memory"),
            HardLimit::Fraction { fraction, bytes } => write!(
                f,
                "per_process_memory_fraction {fraction} ({})",
                format_size(bytes)
            ),
            HardLimit::HighWatermark {
                ratio,
                recommended,
                bytes,
            } => write!(
                f,
                "high_watermark_ratio {ratio} x recommended max {} ({})",
                format_size(recommended),
                format_size(bytes)
            ),
        }
    }
}
