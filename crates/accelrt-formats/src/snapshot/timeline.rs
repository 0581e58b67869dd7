//! Memory over time, reconstructed from a snapshot's history: allocated and reserved bytes
//! after every history entry, every allocation's lifetime, the peaks, and the segment map at
//! a chosen moment.
//!
//! A history may start after the run did (PyTorch's ring buffer drops the oldest entries).
//! As PyTorch's visualiser does, what existed before the first entry is inferred: an
//! allocation freed without being allocated in the history, or live at the end without an
//! `alloc` entry, was live from the start; likewise for segments.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::Snapshot;
use accelrt_alloc::{BlockStatus, Frames, TraceAction, TraceEntry};

/// A moment of the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimelinePoint {
    /// Index of the history entry after which the figures hold (0 when the peak is the
    /// state before the first entry).
    pub event: usize,
    /// Live requested bytes.
    pub allocated: u64,
    /// Bytes held in segments.
    pub reserved: u64,
}

/// One allocation's life.
#[derive(Debug, Clone, PartialEq)]
pub struct Lifetime {
    /// Its address.
    pub addr: u64,
    /// Requested bytes.
    pub size: u64,
    /// Stream index.
    pub stream: u32,
    /// Entry index of its `alloc` (`None`: live before the history starts).
    pub start: Option<usize>,
    /// Entry index of its `free_requested` (`None`: still live at the end).
    pub end: Option<usize>,
    /// Its stack, when recorded.
    pub frames: Option<Frames>,
}

/// Memory over one device's history.
#[derive(Debug, Clone)]
pub struct Timeline {
    /// The device.
    pub device: u32,
    /// Live requested bytes after each history entry.
    pub allocated: Vec<u64>,
    /// Reserved bytes after each history entry.
    pub reserved: Vec<u64>,
    /// Live bytes and reserved bytes before the first entry.
    pub initial: (u64, u64),
    /// Every allocation, in the order of its `alloc` entry (those live from the start first).
    pub lifetimes: Vec<Lifetime>,
    /// The first moment allocated bytes reach their maximum.
    pub peak_allocated: TimelinePoint,
    /// The first moment reserved bytes reach their maximum.
    pub peak_reserved: TimelinePoint,
    /// `segment_alloc` and `segment_map` entries.
    pub segment_allocs: usize,
    /// `oom` entries.
    pub ooms: usize,
}

/// What a byte range of a segment holds at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeState {
    /// Live allocation (index into [`Timeline::lifetimes`]).
    Allocated(usize),
    /// Held by the allocator but not handed out.
    Cached,
    /// Address space of an expandable segment with no memory mapped.
    Unmapped,
}

/// One segment at a moment, cut into ranges.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentState {
    /// First address.
    pub address: u64,
    /// Bytes spanned.
    pub size: u64,
    /// Stream index.
    pub stream: u32,
    /// An expandable segment (mapped in pieces).
    pub expandable: bool,
    /// `(address, size, state)` in address order, tiling the segment.
    pub ranges: Vec<(u64, u64, RangeState)>,
}

/// The segment map at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct PeakState {
    /// The moment.
    pub at: TimelinePoint,
    /// Segments in address order.
    pub segments: Vec<SegmentState>,
}

#[derive(Default)]
struct State {
    /// Live allocations: address -> lifetime index.
    live: HashMap<u64, usize>,
    /// Whole segments: address -> (size, stream).
    segments: BTreeMap<u64, (u64, u32)>,
    /// Mapped pieces of expandable segments: address -> (size, stream).
    mapped: BTreeMap<u64, (u64, u32)>,
    /// Every range ever mapped (for drawing unmapped holes).
    ever_mapped: BTreeMap<u64, (u64, u32)>,
    allocated: u64,
    reserved: u64,
}

impl State {
    fn unmap(&mut self, addr: u64, size: u64) -> u64 {
        // Remove [addr, addr+size) from the mapped pieces, splitting where needed.
        let end = addr.saturating_add(size);
        let overlapping: Vec<(u64, (u64, u32))> = self
            .mapped
            .range(..end)
            .rev()
            .take_while(|(&a, &(s, _))| a.saturating_add(s) > addr)
            .map(|(&a, &v)| (a, v))
            .collect();
        let mut removed = 0;
        for (a, (s, stream)) in overlapping {
            self.mapped.remove(&a);
            let e = a.saturating_add(s);
            if a < addr {
                self.mapped.insert(a, (addr - a, stream));
            }
            if e > end {
                self.mapped.insert(end, (e - end, stream));
            }
            removed += e.min(end) - a.max(addr);
        }
        removed
    }
}

impl Timeline {
    /// Reconstruct device `device`'s timeline from `snapshot`.
    pub fn build(snapshot: &Snapshot, device: u32) -> Timeline {
        let entries = entries_of(snapshot, device);
        let (mut st, mut lifetimes) = initial(snapshot, device);
        let initial = (st.allocated, st.reserved);

        // Pass 2: forward.
        let mut allocated = Vec::with_capacity(entries.len());
        let mut reserved = Vec::with_capacity(entries.len());
        let mut peak_allocated = TimelinePoint {
            event: 0,
            allocated: initial.0,
            reserved: initial.1,
        };
        let mut peak_reserved = peak_allocated;
        let (mut segment_allocs, mut ooms) = (0, 0);
        for (i, e) in entries.iter().enumerate() {
            apply(
                &mut st,
                &mut lifetimes,
                i,
                e,
                &mut segment_allocs,
                &mut ooms,
            );
            allocated.push(st.allocated);
            reserved.push(st.reserved);
            if st.allocated > peak_allocated.allocated {
                peak_allocated = TimelinePoint {
                    event: i,
                    allocated: st.allocated,
                    reserved: st.reserved,
                };
            }
            if st.reserved > peak_reserved.reserved {
                peak_reserved = TimelinePoint {
                    event: i,
                    allocated: st.allocated,
                    reserved: st.reserved,
                };
            }
        }
        Timeline {
            device,
            allocated,
            reserved,
            initial,
            lifetimes,
            peak_allocated,
            peak_reserved,
            segment_allocs,
            ooms,
        }
    }

    /// Number of history entries.
    pub fn len(&self) -> usize {
        self.allocated.len()
    }

    /// True for an empty history.
    pub fn is_empty(&self) -> bool {
        self.allocated.is_empty()
    }

    /// The segment map right after history entry `event` (`None`: before the first entry).
    pub fn state_at(&self, snapshot: &Snapshot, event: Option<usize>) -> PeakState {
        // Re-run the reconstruction up to `event` (cheap next to drawing it).
        let (mut st, mut lifetimes) = initial(snapshot, self.device);
        if let Some(last) = event {
            let (mut a, mut b) = (0, 0);
            for (i, e) in entries_of(snapshot, self.device)
                .iter()
                .enumerate()
                .take(last + 1)
            {
                apply(&mut st, &mut lifetimes, i, e, &mut a, &mut b);
            }
        }
        let mut by_addr: Vec<(u64, u64, usize)> = st
            .live
            .iter()
            .map(|(&a, &i)| (a, self.lifetimes.get(i).map_or(0, |l| l.size), i))
            .collect();
        by_addr.sort_unstable();
        let mut segments: Vec<SegmentState> = st
            .segments
            .iter()
            .map(|(&a, &(s, stream))| SegmentState {
                address: a,
                size: s.min(u64::MAX - a),
                stream,
                expandable: false,
                ranges: vec![(a, s.min(u64::MAX - a), RangeState::Cached)],
            })
            .collect();
        // Expandable: group ever-mapped pieces that touch into one segment each.
        let mut groups: Vec<(u64, u64, u32)> = Vec::new();
        for (&a, &(s, stream)) in &st.ever_mapped {
            // Ranges are clipped to end at 2^64 (readers refuse wrapping ones; a snapshot
            // built in code may still hold them).
            let s = s.min(u64::MAX - a);
            match groups.last_mut() {
                Some(g) if g.0.saturating_add(g.1) >= a => g.1 = g.1.max(a + s - g.0),
                _ => groups.push((a, s, stream)),
            }
        }
        for (a, s, stream) in groups {
            let mut ranges: Vec<(u64, u64, RangeState)> = Vec::new();
            let mut cursor = a;
            let end = a + s;
            for (&m, &(ms, _)) in st.mapped.range(a..end) {
                let ms = ms.min(end - m);
                if m > cursor {
                    ranges.push((cursor, m - cursor, RangeState::Unmapped));
                }
                // Pages mapped one by one form one mapped range.
                match ranges.last_mut() {
                    Some(last) if last.2 == RangeState::Cached && last.0 + last.1 == m => {
                        last.1 += ms;
                    }
                    _ => ranges.push((m, ms, RangeState::Cached)),
                }
                cursor = cursor.max(m + ms);
            }
            if cursor < end {
                ranges.push((cursor, end - cursor, RangeState::Unmapped));
            }
            segments.push(SegmentState {
                address: a,
                size: s,
                stream,
                expandable: true,
                ranges,
            });
        }
        segments.sort_by_key(|s| s.address);
        // Cut the cached ranges around live allocations.
        let mut next = 0;
        for seg in &mut segments {
            let end = seg.address.saturating_add(seg.size);
            while next < by_addr.len() && by_addr[next].0 < seg.address {
                next += 1;
            }
            let mut inside = Vec::new();
            while next < by_addr.len() && by_addr[next].0 < end {
                inside.push(by_addr[next]);
                next += 1;
            }
            if inside.is_empty() {
                continue;
            }
            let mut out = Vec::with_capacity(seg.ranges.len() + 2 * inside.len());
            for &(ra, rs, state) in &seg.ranges {
                if state != RangeState::Cached {
                    out.push((ra, rs, state));
                    continue;
                }
                let rend = ra.saturating_add(rs);
                let mut cursor = ra;
                // Allocations overlapping this range, clipped to it.
                for &(a, s, i) in inside
                    .iter()
                    .filter(|x| x.0 < rend && x.0.saturating_add(x.1.max(1)) > ra)
                {
                    let a = a.max(cursor);
                    let e = a.saturating_add(s.max(1)).min(rend);
                    if a > cursor {
                        out.push((cursor, a - cursor, RangeState::Cached));
                    }
                    if e > a {
                        out.push((a, e - a, RangeState::Allocated(i)));
                        cursor = e;
                    }
                }
                if cursor < rend {
                    out.push((cursor, rend - cursor, RangeState::Cached));
                }
            }
            seg.ranges = out;
        }
        let at = match event {
            Some(i) => TimelinePoint {
                event: i,
                allocated: self.allocated.get(i).copied().unwrap_or(0),
                reserved: self.reserved.get(i).copied().unwrap_or(0),
            },
            None => TimelinePoint {
                event: 0,
                allocated: self.initial.0,
                reserved: self.initial.1,
            },
        };
        PeakState { at, segments }
    }
}

fn entries_of(snapshot: &Snapshot, device: u32) -> &[TraceEntry] {
    snapshot
        .device_traces
        .get(device as usize)
        .map_or(&[][..], Vec::as_slice)
}

/// The state before the first entry, and the allocations live then.
fn initial(snapshot: &Snapshot, device: u32) -> (State, Vec<Lifetime>) {
    let mut st = State::default();
    let mut lifetimes: Vec<Lifetime> = Vec::new();
    let mut allocated_in_history: HashSet<u64> = HashSet::new();
    let mut live: HashSet<u64> = HashSet::new();
    let mut seg_live: HashSet<u64> = HashSet::new();
    let mut seg_seen: HashSet<u64> = HashSet::new();
    // Ranges any segment entry touched, sorted by start for overlap queries.
    let mut touched: Vec<(u64, u64)> = Vec::new();
    for e in entries_of(snapshot, device) {
        match e.action {
            TraceAction::Alloc => {
                live.insert(e.addr);
                allocated_in_history.insert(e.addr);
            }
            TraceAction::FreeRequested
                if !live.remove(&e.addr) && allocated_in_history.insert(e.addr) =>
            {
                lifetimes.push(Lifetime {
                    addr: e.addr,
                    size: e.size,
                    stream: e.stream,
                    start: None,
                    end: None,
                    frames: e.frames.clone(),
                });
            }
            TraceAction::SegmentAlloc => {
                seg_live.insert(e.addr);
                seg_seen.insert(e.addr);
                touched.push((e.addr, e.size));
            }
            TraceAction::SegmentFree => {
                if !seg_live.remove(&e.addr) && seg_seen.insert(e.addr) {
                    st.segments.insert(e.addr, (e.size, e.stream));
                }
                touched.push((e.addr, e.size));
            }
            TraceAction::SegmentMap | TraceAction::SegmentUnmap => {
                touched.push((e.addr, e.size));
            }
            _ => {}
        }
    }
    touched.sort_unstable();
    // max_end[i]: the furthest end of touched[..=i]; a range overlaps [start, end) iff some
    // touched range starting before `end` ends after `start`.
    let max_end: Vec<u64> = touched
        .iter()
        .scan(0u64, |m, &(a, s)| {
            *m = (*m).max(a.saturating_add(s));
            Some(*m)
        })
        .collect();
    let overlaps = |start: u64, size: u64| {
        let n = touched.partition_point(|&(a, _)| a < start.saturating_add(size));
        n > 0 && max_end[n - 1] > start
    };
    for seg in snapshot.segments.iter().filter(|s| s.device == device) {
        if !overlaps(seg.address, seg.total_size) {
            if seg.is_expandable {
                // Mapped: the segment minus its unmapped holes.
                let mut holes = seg.unmapped.clone();
                holes.sort_unstable();
                let mut cursor = seg.address;
                let end = seg.address.saturating_add(seg.total_size);
                for (a, s) in holes.into_iter().chain([(end, 0)]) {
                    let a = a.clamp(cursor, end);
                    if a > cursor {
                        st.mapped.insert(cursor, (a - cursor, seg.stream));
                    }
                    cursor = cursor.max(a.saturating_add(s).min(end));
                }
                st.ever_mapped
                    .insert(seg.address, (seg.total_size, seg.stream));
            } else {
                st.segments
                    .insert(seg.address, (seg.total_size, seg.stream));
            }
        }
        for b in &seg.blocks {
            let active = b.state != BlockStatus::Inactive;
            if active && !allocated_in_history.contains(&b.address) {
                lifetimes.push(Lifetime {
                    addr: b.address,
                    size: b.requested_size,
                    stream: seg.stream,
                    start: None,
                    end: None,
                    frames: b.frames.clone(),
                });
            }
        }
    }
    for (i, l) in lifetimes.iter().enumerate() {
        st.live.insert(l.addr, i);
        st.allocated = st.allocated.saturating_add(l.size);
    }
    st.reserved = st
        .segments
        .values()
        .chain(st.mapped.values())
        .fold(0u64, |sum, v| sum.saturating_add(v.0));
    (st, lifetimes)
}

/// Apply history entry `i` to the state. Inconsistent entries (a free of an address that is
/// not live, a segment freed twice) change nothing: the picture stays drawable.
fn apply(
    st: &mut State,
    lifetimes: &mut Vec<Lifetime>,
    i: usize,
    e: &TraceEntry,
    segment_allocs: &mut usize,
    ooms: &mut usize,
) {
    match e.action {
        TraceAction::Alloc => {
            if let Some(old) = st.live.remove(&e.addr) {
                st.allocated = st.allocated.saturating_sub(lifetimes[old].size);
                lifetimes[old].end.get_or_insert(i);
            }
            lifetimes.push(Lifetime {
                addr: e.addr,
                size: e.size,
                stream: e.stream,
                start: Some(i),
                end: None,
                frames: e.frames.clone(),
            });
            st.live.insert(e.addr, lifetimes.len() - 1);
            st.allocated = st.allocated.saturating_add(e.size);
        }
        TraceAction::FreeRequested => {
            if let Some(index) = st.live.remove(&e.addr) {
                st.allocated = st.allocated.saturating_sub(lifetimes[index].size);
                lifetimes[index].end = Some(i);
            }
        }
        TraceAction::SegmentAlloc => {
            *segment_allocs += 1;
            if st.segments.insert(e.addr, (e.size, e.stream)).is_none() {
                st.reserved = st.reserved.saturating_add(e.size);
            }
        }
        TraceAction::SegmentFree => {
            if let Some((size, _)) = st.segments.remove(&e.addr) {
                st.reserved = st.reserved.saturating_sub(size);
            }
        }
        TraceAction::SegmentMap => {
            *segment_allocs += 1;
            let already = st.unmap(e.addr, e.size);
            st.reserved = st.reserved.saturating_sub(already);
            st.mapped.insert(e.addr, (e.size, e.stream));
            st.ever_mapped.insert(e.addr, (e.size, e.stream));
            st.reserved = st.reserved.saturating_add(e.size);
        }
        TraceAction::SegmentUnmap => {
            let removed = st.unmap(e.addr, e.size);
            st.reserved = st.reserved.saturating_sub(removed);
        }
        TraceAction::Oom => *ooms += 1,
        _ => {}
    }
}
