//! Hostile input and misuse found by fuzzing (issue 13), one test per finding: each failed
//! (a panic, a wrong answer or a misleading message) before its fix.

use std::sync::Arc;

use accelrt::alloc::{AllocatorConfig, CachingAllocator, StreamFilter};
use accelrt::backend::host::HostMemory;

use crate::common::{host_stream, HOST0 as DEV};

fn allocator() -> CachingAllocator {
    let config = AllocatorConfig {
        debug_checks: true,
        ..AllocatorConfig::default()
    };
    CachingAllocator::new(DEV, Arc::new(HostMemory::new(1 << 30)), None, config).unwrap()
}

/// Item 5: a released pool that still has a live block has no use left to drop; a second
/// release underflowed its use count (a panic in debug builds, 2^32 - 1 uses in release).
#[test]
fn a_released_pool_cannot_be_released_retained_or_begun_again() {
    let a = allocator();
    let pool = a.new_pool_id();
    a.begin_allocate_to_pool(pool, StreamFilter::All).unwrap();
    let p = a.raw_alloc(512, host_stream(0)).unwrap();
    a.end_allocate_to_pool(pool).unwrap();
    a.release_pool(pool).unwrap();
    assert_eq!(a.pool_use_count(pool), Some(0), "released, draining");
    let refusals = [
        a.release_pool(pool).unwrap_err(),
        a.retain_pool(pool).unwrap_err(),
        a.begin_allocate_to_pool(pool, StreamFilter::All)
            .unwrap_err(),
    ];
    for e in refusals {
        assert!(
            e.to_string().contains("was already released"),
            "says what happened: {e}"
        );
        assert!(
            !e.to_string().contains("MempoolId"),
            "no debug formatting: {e}"
        );
    }
    assert_eq!(a.pool_use_count(pool), Some(0));
    a.raw_free(p).unwrap();
    assert_eq!(a.pool_use_count(pool), None, "gone with its last block");
    a.check_invariants().unwrap();
}

/// Host memory whose address-space reservations fail, as under `ulimit -v`.
struct NoAddressSpace(HostMemory);

impl accelrt::alloc::MemoryProvider for NoAddressSpace {
    fn allocate(&self, size: usize) -> Result<usize, accelrt::alloc::ProviderError> {
        self.0.allocate(size)
    }
    unsafe fn free(&self, ptr: usize, size: usize) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.0.free(ptr, size) }
    }
    fn memory_info(&self) -> (u64, u64) {
        self.0.memory_info()
    }
    fn host_visible(&self) -> bool {
        true
    }
    fn driver_allocated(&self) -> u64 {
        self.0.driver_allocated()
    }
    fn virtual_memory(&self) -> Option<&dyn accelrt::alloc::VirtualMemory> {
        Some(self)
    }
}

impl accelrt::alloc::VirtualMemory for NoAddressSpace {
    fn granularity(&self) -> usize {
        2 << 20
    }
    fn reserve(&self, _size: usize) -> Result<usize, accelrt::alloc::ProviderError> {
        Err(accelrt::alloc::ProviderError::Failed(
            "reserving address space: Cannot allocate memory (os error 12)".into(),
        ))
    }
    unsafe fn unreserve(&self, _base: usize, _size: usize) {}
    fn create(
        &self,
        _size: usize,
    ) -> Result<accelrt::alloc::ChunkHandle, accelrt::alloc::ProviderError> {
        Err(accelrt::alloc::ProviderError::OutOfMemory)
    }
    unsafe fn release(&self, _chunk: accelrt::alloc::ChunkHandle, _size: usize) {}
    unsafe fn map(
        &self,
        _addr: usize,
        _chunks: &[(accelrt::alloc::ChunkHandle, usize)],
    ) -> Result<(), accelrt::alloc::ProviderError> {
        Err(accelrt::alloc::ProviderError::OutOfMemory)
    }
    unsafe fn unmap(&self, _addr: usize, _len: usize) {}
}

/// Item 7: a failed reservation showed the provider's debug form,
/// `Failed("reserving address space: Cannot allocate memory (os error 12)")`.
#[test]
fn a_failed_address_reservation_reads_as_words() {
    let provider = Arc::new(NoAddressSpace(HostMemory::new(1 << 30)));
    let a = CachingAllocator::new(DEV, provider, None, AllocatorConfig::default()).unwrap();
    assert!(a.is_expandable());
    let e = a.raw_alloc(4096, host_stream(0)).unwrap_err().to_string();
    assert!(!e.contains("Failed("), "no debug formatting: {e}");
    assert_eq!(
        e.matches("reserving address space").count(),
        1,
        "said once: {e}"
    );
    assert!(
        e.contains("Cannot allocate memory (os error 12)") && e.contains("GiB"),
        "the reason and the size: {e}"
    );
}

/// The 117-byte snapshot: `{'segments': [], 'device_traces': [[{'action':
/// 'segment_map', 'addr': 2**64-4096, 'size': 8192, 'stream': 0}]]}`.
fn wrapping_snapshot_pickle(action: &str, addr: u64, size: u64) -> Vec<u8> {
    let mut w = accelrt::snapshot::pickle::PickleWriter::new();
    w.dict_begin();
    w.str("segments");
    w.list_begin();
    w.list_end();
    w.str("device_traces");
    w.list_begin();
    w.list_begin();
    w.dict_begin();
    for (k, v) in [("addr", addr), ("size", size), ("stream", 0)] {
        w.str(k);
        w.int(v.into());
    }
    w.str("action");
    w.str(action);
    w.dict_end();
    w.list_end();
    w.list_end();
    w.dict_end();
    w.finish()
}

fn wrapping_snapshot_json(action: &str, addr: u64, size: u64) -> Vec<u8> {
    serde_json::json!({
        "format": accelrt::snapshot::JSON_FORMAT,
        "version": 1,
        "segments": [],
        "device_traces": [[{"action": action, "addr": addr, "size": size, "stream": 0,
                            "time_us": 0, "frames": null}]],
    })
    .to_string()
    .into_bytes()
}

/// Item 1: a range whose end wraps past 2^64 made `snapshot render` panic in
/// `Timeline::state_at` ("range start is greater than range end in BTreeMap"), and
/// `snapshot convert` accepted it. Both readers refuse it, naming the entry.
#[test]
fn snapshot_ranges_past_two_to_the_64_are_refused_by_both_readers() {
    let top = u64::MAX - 4095; // 2^64 - 4096
                               // (action, addr, size)
    let cases = [
        ("segment_map", top, 8192),
        ("segment_alloc", top, 8192),
        ("alloc", u64::MAX, 1),
        ("free_requested", top, 4097),
        ("segment_unmap", top, 1 << 40),
    ];
    for (action, addr, size) in cases {
        let inputs = [
            ("snap.pickle", wrapping_snapshot_pickle(action, addr, size)),
            ("snap.json", wrapping_snapshot_json(action, addr, size)),
        ];
        for (file, bytes) in inputs {
            let e = accelrt::snapshot::parse_bytes(file, &bytes)
                .expect_err("a wrapping range is refused")
                .to_string();
            assert!(
                e.contains(file) && e.contains("device_traces[0][0]") && e.contains("2^64"),
                "{action} in {file}: the message names the file, the entry and the fault: {e}"
            );
        }
    }
    // Ending just below 2^64 is fine.
    let fits = wrapping_snapshot_pickle("segment_map", top - 4096, 4096);
    accelrt::snapshot::parse_bytes("fits.pickle", &fits).unwrap();
}

/// Item 1, for snapshots built in code (no reader to refuse them): rendering never panics.
#[test]
fn a_snapshot_built_in_code_with_wrapping_ranges_still_renders() {
    use accelrt::alloc::{TraceAction, TraceEntry};
    use accelrt::snapshot::{render_html, HtmlOptions, Snapshot};
    let top = u64::MAX - 4095;
    let entry = |action, addr, size| TraceEntry {
        action,
        addr,
        size,
        stream: 0,
        time_us: 0,
        frames: None,
    };
    let snapshot = Snapshot {
        segments: Vec::new(),
        device_traces: vec![vec![
            entry(TraceAction::SegmentMap, top, 8192),
            entry(TraceAction::SegmentAlloc, top - (1 << 20), u64::MAX),
            entry(TraceAction::Alloc, top, u64::MAX),
            entry(TraceAction::Alloc, top - 8192, u64::MAX),
            entry(TraceAction::SegmentUnmap, top + 2048, u64::MAX),
            entry(TraceAction::FreeRequested, top, 0),
        ]],
        allocator_settings: serde_json::Value::Null,
        external_annotations: Vec::new(),
        stream_handles: Vec::new(),
    };
    let html = render_html(&snapshot, &HtmlOptions::default()).unwrap();
    assert!(html.contains("<html"), "a page");
}

/// Item 6: configuration strings are capped (100,000 commas were accepted as an empty
/// configuration); the longest real one fits easily.
#[test]
fn configuration_strings_are_capped() {
    use accelrt::alloc::MAX_CONF_LEN;
    let commas = ",".repeat(100_000);
    let e = AllocatorConfig::parse(&commas).unwrap_err().to_string();
    assert!(
        e.contains("100000 bytes") && e.contains(&MAX_CONF_LEN.to_string()),
        "names the length and the limit: {e}"
    );
    let every_option = "expandable_segments:false,max_split_size_mb:128,\
        max_non_split_rounding_mb:20,roundup_power2_divisions:[256:1,512:2,1024:4,>:8],\
        garbage_collection_threshold:0.6,per_process_memory_fraction:0.9,\
        release_at_peak:true,debug_checks:false";
    AllocatorConfig::parse(every_option).unwrap();
    let padded = format!(
        "{every_option}{}",
        " ".repeat(MAX_CONF_LEN - every_option.len())
    );
    AllocatorConfig::parse(&padded).unwrap();
    assert!(AllocatorConfig::parse(&format!("{padded} ")).is_err());
}

/// A device claiming an absurd size (a host `--capacity` of 2^64 - 1) must not make every
/// expandable range absurdly large: a range of 2^46 bytes cost 400 MB of address map and
/// page table and 1.5 s before the first byte was handed out. Ranges stop at 4 TiB, and the
/// page table grows with what is mapped, so the segment's snapshot still reads as unmapped
/// space past the block.
#[test]
fn an_absurd_device_size_does_not_make_absurd_address_ranges() {
    let provider = Arc::new(HostMemory::new(u64::MAX));
    let a = CachingAllocator::new(DEV, provider, None, AllocatorConfig::default()).unwrap();
    assert!(a.is_expandable());
    let s = host_stream(0);
    let p = a.raw_alloc(1, s).unwrap();
    let snap = a.memory_snapshot();
    assert_eq!(snap.segments.len(), 1);
    let seg = &snap.segments[0];
    assert!(
        seg.total_size <= 1 << 42,
        "a range of {} bytes for one byte",
        seg.total_size
    );
    a.raw_free(p).unwrap();
    a.check_invariants().unwrap();
}
