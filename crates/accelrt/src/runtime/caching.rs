//! The concrete allocator behind the hooks' [`DeviceAllocator`]: the hooks
//! ([`Backend::device_allocator`]) name no allocator type, and callers that need what only
//! accelrt's [`CachingAllocator`] has (private-pool routing, checkpoints, IPC ranges,
//! `check_invariants`: the C ABI, the tests, the fuzz targets) ask for it here, by name.

use super::*;
use crate::error::Error;

impl<D: Driver> Runtime<D> {
    /// The device's [`CachingAllocator`], created on first use (the one
    /// [`Backend::device_allocator`] hands out).
    pub fn allocator(&self, device: u32) -> Result<Arc<CachingAllocator>> {
        let ready = self.ready("allocator")?;
        self.allocator_in(ready, device)
    }
}

impl dyn Backend + '_ {
    /// The device's allocator as accelrt's [`CachingAllocator`]: the one
    /// [`Backend::device_allocator`] hands out, with its extras. Every backend built on
    /// [`Runtime`] (the built-in ones, and those registered with `register_driver` or
    /// `register_runtime`) has one; another implementation of [`Backend`] with an allocator
    /// of its own answers [`DeviceError::Unsupported`].
    pub fn allocator(&self, device: u32) -> Result<Arc<CachingAllocator>> {
        let allocator = self.device_allocator(device).map_err(|e| match e {
            // The caller asked for allocator(): the error names it.
            Error::Device(DeviceError::NeedsBackend { needs, reason, .. }) => {
                DeviceError::NeedsBackend {
                    call: "allocator",
                    needs,
                    reason,
                }
                .into()
            }
            e => e,
        })?;
        allocator
            .into_any()
            .downcast::<CachingAllocator>()
            .map_err(|_| {
                DeviceError::unsupported(
                    self.device_type(),
                    "allocator() (its allocator is not accelrt's CachingAllocator: use \
                     device_allocator())",
                )
                .into()
            })
    }
}
