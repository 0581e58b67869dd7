//! Finding adapters (which backends, best first) and what they report: properties from the
//! adapter's info and limits, memory figures from the driver where it reports them. Opening
//! them is `device.rs`'s.
//!
//! Memory, by source:
//! - **Vulkan**: the heaps of `vkGetPhysicalDeviceMemoryProperties` give the total (the
//!   device-local heaps). Where the driver has `VK_EXT_memory_budget` (NVIDIA, AMD, most
//!   desktop drivers), its heap budget is the recommended maximum (MPS's
//!   `recommendedMaxWorkingSetSize`: what the process can use without oversubscribing) and
//!   its heap usage is the memory the driver counts as used (MPS's
//!   `getDriverAllocatedMemory`). Without the extension (Mesa's lavapipe) the recommended
//!   maximum is the total.
//! - **Metal, DX12**: wgpu does not expose the figures; the total and recommended maximum
//!   are this machine's physical memory (the upper bound for unified memory), and the used
//!   figure comes from wgpu's allocator report.
//!
//! The MPS watermark model follows: the high watermark (a hard limit) and the low watermark
//! (garbage collection above it) are ratios of the recommended maximum.

/// Memory figures of one adapter, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFigures {
    /// Device memory in total (device-local heaps on Vulkan).
    pub total: u64,
    /// The working set the driver recommends: the heap budget where reported, else `total`.
    pub budget: u64,
    /// Memory in use as the driver counts it (heap usage, whole process), where reported.
    pub usage: Option<u64>,
    /// Where the figures come from, for `accelrt info`.
    pub source: &'static str,
}

/// The backends to look for adapters on: wgpu's `WGPU_BACKEND` (e.g. `vulkan`, `metal`,
/// `dx12`), else all three native ones.
pub(crate) fn backends() -> wgpu::Backends {
    wgpu::Backends::from_env()
        .unwrap_or(wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12)
}

/// Rank of a device type: discrete GPUs first, the CPU (lavapipe, WARP) last.
pub(crate) fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// The adapter's memory figures now (see the module docs for the sources).
pub(crate) fn memory_figures(adapter: &wgpu::Adapter) -> MemoryFigures {
    #[cfg(any(
        windows,
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd"
    ))]
    if let Some(figures) = vulkan::memory_figures(adapter) {
        return figures;
    }
    let _ = adapter;
    let physical = accelrt::backend::host::HostMemory::with_default_capacity().capacity();
    MemoryFigures {
        total: physical,
        budget: physical,
        usage: None,
        source: "not reported by wgpu on this backend: host physical memory",
    }
}

#[cfg(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
))]
mod vulkan {
    use ash::vk;

    use super::MemoryFigures;

    /// Heaps (and the budget extension's figures) of a Vulkan adapter; `None` for others.
    pub(super) fn memory_figures(adapter: &wgpu::Adapter) -> Option<MemoryFigures> {
        // SAFETY: the guard only lends the hal adapter; we call read-only queries
        // (vkGetPhysicalDeviceMemoryProperties[2]) on its physical device and destroy nothing.
        let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }?;
        let instance = hal.shared_instance().raw_instance();
        let physical = hal.raw_physical_device();
        let capabilities = hal.physical_device_capabilities();
        let api = capabilities
            .properties()
            .api_version
            .min(hal.shared_instance().instance_api_version());
        let has_budget = api >= vk::API_VERSION_1_1
            && capabilities.supports_extension(ash::ext::memory_budget::NAME);
        let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
        let memory = if has_budget {
            let mut props = vk::PhysicalDeviceMemoryProperties2::default().push_next(&mut budget);
            // SAFETY: `physical` belongs to `instance` (both from the same hal adapter), the
            // instance and device support Vulkan 1.1 (checked above), and `props` is a valid
            // chain with the budget structure the device supports.
            unsafe { instance.get_physical_device_memory_properties2(physical, &mut props) };
            props.memory_properties
        } else {
            // SAFETY: `physical` belongs to `instance`; a Vulkan 1.0 query.
            unsafe { instance.get_physical_device_memory_properties(physical) }
        };
        let heaps = &memory.memory_heaps[..memory.memory_heap_count as usize];
        let local: Vec<usize> = (0..heaps.len())
            .filter(|&i| heaps[i].flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL))
            .collect();
        // Every Vulkan device has a device-local heap; be defensive anyway.
        let local = if local.is_empty() {
            (0..heaps.len()).collect()
        } else {
            local
        };
        let total: u64 = local.iter().map(|&i| heaps[i].size).sum();
        if total == 0 {
            return None;
        }
        Some(if has_budget {
            let budget_sum: u64 = local.iter().map(|&i| budget.heap_budget[i]).sum();
            MemoryFigures {
                total,
                budget: budget_sum.clamp(1, total),
                usage: Some(local.iter().map(|&i| budget.heap_usage[i]).sum()),
                source: "Vulkan device-local heaps, VK_EXT_memory_budget",
            }
        } else {
            MemoryFigures {
                total,
                budget: total,
                usage: None,
                source: "Vulkan device-local heaps (no VK_EXT_memory_budget: the recommended \
                         maximum is the heap size)",
            }
        })
    }
}
