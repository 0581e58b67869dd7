//! Size rounding and segment sizing (PyTorch's constants, which users' intuitions are built on).

use super::AllocatorConfig;
use super::PoolKind;

/// Every block is a multiple of this, and no block is smaller.
pub const MIN_BLOCK: u64 = 512;
/// Requests up to this size are small: the small size class (PyTorch's small pool).
pub const SMALL_REQUEST: u64 = 1 << 20;
/// Segment size for small requests.
pub const SMALL_SEGMENT: u64 = 2 << 20;
/// Requests below this (and above `SMALL_REQUEST`) share `LARGE_SEGMENT`-sized segments.
pub const MIN_LARGE_ALLOC: u64 = 10 << 20;
/// Segment size for mid-sized requests.
pub const LARGE_SEGMENT: u64 = 20 << 20;
/// Larger requests get their own segment rounded up to this.
pub const ROUND_LARGE: u64 = 2 << 20;
/// The smallest segment taken when the usual size does not fit (the device's page size for
/// virtual memory on GPUs).
pub const MIN_SEGMENT: u64 = 2 << 20;
/// Largest request accepted: 256 TiB. Anything above is a caller bug, and the bound keeps
/// every size computation in the allocator free of overflow.
pub const MAX_REQUEST: u64 = 1 << 48;

/// Size of the block that serves a request of `size` bytes (`size <= MAX_REQUEST`).
#[inline]
pub fn round_size(size: u64, config: &AllocatorConfig) -> u64 {
    round_with_divisions(size, config.divisions_for(size))
}

/// [`round_size`] with the divisions of the request's interval given.
#[inline]
pub fn round_with_divisions(size: u64, divisions: u32) -> u64 {
    if size <= MIN_BLOCK {
        return MIN_BLOCK;
    }
    let divisions = divisions as u64;
    if divisions > 1 && size > MIN_BLOCK * divisions {
        round_to_power2_division(size, divisions)
    } else {
        round_up(size, MIN_BLOCK)
    }
}

/// Round up to the next of `divisions` equal steps between two powers of two
/// (e.g. with 4 divisions, 1200 MiB rounds to 1280 MiB: steps of 256 MiB above 1 GiB).
#[cold]
fn round_to_power2_division(size: u64, divisions: u64) -> u64 {
    if size.is_power_of_two() {
        return size;
    }
    let floor = 1u64 << (63 - size.leading_zeros());
    let step = (floor / divisions).max(MIN_BLOCK);
    round_up(size, step)
}

#[inline(always)]
pub fn round_up(size: u64, multiple: u64) -> u64 {
    debug_assert!(multiple.is_power_of_two());
    (size + multiple - 1) & !(multiple - 1)
}

/// The size class of a block of `block_size` bytes.
#[inline(always)]
pub fn pool_kind(block_size: u64) -> PoolKind {
    if block_size <= SMALL_REQUEST {
        PoolKind::Small
    } else {
        PoolKind::Large
    }
}

/// How much to ask the device for when no cached block fits a block of `block_size`.
pub fn segment_size(block_size: u64) -> u64 {
    if block_size <= SMALL_REQUEST {
        SMALL_SEGMENT
    } else if block_size < MIN_LARGE_ALLOC {
        LARGE_SEGMENT
    } else {
        round_up(block_size, ROUND_LARGE)
    }
}

/// Whether a free block of `block_size` may be split to serve `request` (a rounded size),
/// leaving a remainder worth keeping.
#[inline(always)]
pub fn should_split(
    kind: PoolKind,
    block_size: u64,
    request: u64,
    config: &AllocatorConfig,
) -> bool {
    let remaining = block_size - request;
    match kind {
        PoolKind::Small => remaining >= MIN_BLOCK,
        PoolKind::Large => {
            remaining > SMALL_REQUEST && config.max_split_size.is_none_or(|m| block_size < m)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_table() {
        let c = AllocatorConfig::default();
        for (size, want) in [
            (1, 512),
            (512, 512),
            (513, 1024),
            (1 << 20, 1 << 20),
            ((1 << 20) + 1, (1 << 20) + 512),
        ] {
            assert_eq!(round_size(size, &c), want, "size {size}");
        }
        let c = AllocatorConfig::parse("roundup_power2_divisions:4").unwrap();
        // 1200 MiB: floor 1 GiB, step 256 MiB -> 1280 MiB.
        assert_eq!(round_size(1200 << 20, &c), 1280 << 20);
        assert_eq!(round_size(1 << 30, &c), 1 << 30);
        // Small sizes below 512 * divisions only round to 512.
        assert_eq!(round_size(1000, &c), 1024);
    }

    #[test]
    fn segment_sizes() {
        for (block, want) in [
            (512, 2 << 20),
            (1 << 20, 2 << 20),
            ((1 << 20) + 512, 20 << 20),
            (10 << 20, 10 << 20),
            ((10 << 20) + 512, 12 << 20),
        ] {
            assert_eq!(segment_size(block), want, "block {block}");
        }
    }
}
