//! Byte counts as people read them. A leaf: messages anywhere in the allocator (and the
//! out-of-memory report) use it without importing the allocator.

/// Human-readable size: `512 B`, `1.50 KiB`, `20.00 MiB`, `1.00 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    #[test]
    fn format_size_reads_well() {
        use super::format_size as f;
        assert_eq!(f(0), "0 B");
        assert_eq!(f(512), "512 B");
        assert_eq!(f(1536), "1.50 KiB");
        assert_eq!(f(20 << 20), "20.00 MiB");
        assert_eq!(f(1 << 30), "1.00 GiB");
        assert_eq!(f(u64::MAX), "16384.00 PiB");
    }
}
