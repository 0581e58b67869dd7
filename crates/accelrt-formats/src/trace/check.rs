//! Checking a trace's events against its history, and planning them for the replay.
//!
//! The [`Planner`] sees events one at a time (from a file being read or from a [`Trace`] in
//! memory) and
//! - checks what needs the history: ids live where they must be, frees of live ids, `u` of
//!   live ids, markers after their frees and at most once, CPU times never going backwards;
//! - turns ids into dense slots (reused after a free), so the replay indexes a vector
//!   instead of hashing in its timed loop;
//! - schedules completion markers: a marker whose time is ahead of the CPU clock waits until
//!   the clock gets there.
//!
//! Its memory follows the live allocations, plus the last [`FREED_WINDOW`] to twice as many
//! frees (for double-free messages and for markers) and the markers still waiting.
//!
//! [`Trace`]: super::Trace

use std::cmp::{Ordering, Reverse};
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};

use super::read::{check_alloc_values, check_stream, TraceEvent};
use super::{TraceOp, FREED_WINDOW};
use accelrt_alloc::Frames;

/// Where an `a`, `f` or `u` event sits on the replay's clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Clock {
    /// 1-based count of `a`, `f` and `u` events (markers do not count).
    pub ordinal: u64,
    /// CPU time in microseconds (0 in an untimed trace).
    pub time: u64,
    /// 1-based count of all events, markers included, up to this one.
    pub events: u64,
}

/// One thing the replay does, in order.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    /// `raw_alloc(size, stream)` into `ptrs[slot]`.
    Alloc {
        slot: u32,
        size: u64,
        stream: u32,
        id: u64,
        at: Clock,
        line: u64,
        frames: Option<Frames>,
    },
    /// `raw_free(ptrs[slot])`; `size` is the requested size it had.
    Free {
        slot: u32,
        size: u64,
        id: u64,
        at: Clock,
        line: u64,
    },
    /// `record_stream(ptrs[slot], stream)`.
    Use {
        slot: u32,
        stream: u32,
        id: u64,
        at: Clock,
        line: u64,
    },
    /// A completion marker came due: the device has passed event `ordinal` on `stream`.
    Passed { stream: u32, ordinal: u64 },
}

struct Slot {
    size: u64,
    stream: u32,
    line: u64,
    /// Other streams named by `u` lines.
    uses: Vec<u32>,
}

/// A free the planner still remembers (kept small: there are many).
struct Freed {
    line: u64,
    /// Its event number: also tells this free from a later free of the same id.
    ordinal: u64,
    time: u64,
    /// Line of its marker, once seen (0: none yet).
    marked: u64,
    stream: u32,
    /// Other streams named by `u` lines (rare).
    uses: Option<Box<[u32]>>,
}

/// A marker waiting for the CPU clock to reach its time.
struct Pending {
    time: u64,
    seq: u64,
    ordinal: u64,
    stream: u32,
    uses: Vec<u32>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.time, self.seq) == (other.time, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.time, self.seq).cmp(&(other.time, other.seq))
    }
}

/// Hashing of trace ids: one folded multiplication with a key drawn per map (from the
/// standard library's random state), so a hostile file cannot aim ids at one bucket, at a
/// fraction of SipHash's cost.
#[derive(Clone)]
pub(crate) struct IdHash {
    key: u64,
}

impl IdHash {
    fn new() -> IdHash {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        IdHash { key: h.finish() }
    }
}

impl std::hash::BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            key: self.key,
            hash: 0,
        }
    }
}

pub(crate) struct IdHasher {
    key: u64,
    hash: u64,
}

impl std::hash::Hasher for IdHasher {
    #[inline]
    fn write_u64(&mut self, x: u64) {
        let m = u128::from(x ^ self.key ^ self.hash) * 0x9e37_79b9_7f4a_7c15_u128;
        self.hash = (m as u64) ^ ((m >> 64) as u64);
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// See the module documentation.
pub(crate) struct Planner {
    timed: bool,
    /// Live id → slot.
    ids: HashMap<u64, u32, IdHash>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    /// The latest frees by id, in two generations: new frees go to `freed`; when it holds
    /// [`FREED_WINDOW`] frees, the older generation is dropped whole and `freed` becomes it.
    /// An id's latest free is the one in `freed`, else in `freed_old`. Entries are not
    /// removed when an id is allocated again: a live id is always looked up first.
    freed: HashMap<u64, Freed, IdHash>,
    freed_old: HashMap<u64, Freed, IdHash>,
    /// Whether a generation of frees has been dropped (messages then say so).
    forgot: bool,
    seq: u64,
    pending: BinaryHeap<Reverse<Pending>>,
    clock: Clock,
    /// Events accepted.
    events: u64,
    /// Line of the latest `a`, `f` or `u` event.
    clock_line: u64,
    /// `c` lines read.
    pub markers: u64,
}

impl Planner {
    pub fn new(timed: bool) -> Planner {
        Planner {
            timed,
            ids: HashMap::with_hasher(IdHash::new()),
            slots: Vec::new(),
            free_slots: Vec::new(),
            freed: HashMap::with_hasher(IdHash::new()),
            freed_old: HashMap::with_hasher(IdHash::new()),
            forgot: false,
            seq: 0,
            pending: BinaryHeap::new(),
            clock: Clock {
                ordinal: 0,
                time: 0,
                events: 0,
            },
            events: 0,
            clock_line: 0,
            markers: 0,
        }
    }

    /// Slots in use or free: the replay's pointer table needs this many entries.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Events accepted so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Check `event` and append what the replay does for it to `out`. A refused event
    /// changes nothing.
    pub fn plan(
        &mut self,
        event: &TraceEvent,
        frames: Option<&Frames>,
        out: &mut Vec<Step>,
    ) -> Result<(), String> {
        self.plan_event(event, frames, out)?;
        self.events += 1;
        Ok(())
    }

    fn plan_event(
        &mut self,
        event: &TraceEvent,
        frames: Option<&Frames>,
        out: &mut Vec<Step>,
    ) -> Result<(), String> {
        let time = match (self.timed, event.time) {
            (true, Some(t)) => t,
            (false, None) => 0,
            (true, None) => return Err("the event has no time in a timed (v2) trace".into()),
            (false, Some(_)) => return Err("the event has a time in an untimed (v1) trace".into()),
        };
        if let TraceOp::Complete { id } = event.op {
            return self.marker(id, time, event.line, out);
        }
        if time < self.clock.time {
            return Err(format!(
                "time {time} is earlier than {}, the time of the event at line {}: the CPU \
                 times of 'a', 'f' and 'u' lines never go backwards",
                self.clock.time, self.clock_line
            ));
        }
        // Check first, then change state: a refused event leaves the planner as it was.
        match event.op {
            TraceOp::Alloc { id, size, stream } => {
                check_alloc_values(size, stream)?;
                if usize::try_from(size).is_err() {
                    return Err(format!(
                        "size {size} does not fit in this machine's address space"
                    ));
                }
                let slot = match self.free_slots.last() {
                    Some(&s) => s,
                    None => u32::try_from(self.slots.len())
                        .map_err(|_| "more than 2^32 live allocations".to_string())?,
                };
                match self.ids.entry(id) {
                    Entry::Occupied(o) => {
                        return Err(format!(
                            "duplicate live id {id}: it was allocated at line {} and not freed \
                             since; ids must be unique among live allocations",
                            self.slots[*o.get() as usize].line
                        ))
                    }
                    Entry::Vacant(v) => {
                        v.insert(slot);
                    }
                }
                self.advance(time, event.line, out);
                self.free_slots.pop();
                let record = Slot {
                    size,
                    stream,
                    line: event.line,
                    uses: Vec::new(),
                };
                if slot as usize == self.slots.len() {
                    self.slots.push(record);
                } else {
                    self.slots[slot as usize] = record;
                }
                out.push(Step::Alloc {
                    slot,
                    size,
                    stream,
                    id,
                    at: self.clock,
                    line: event.line,
                    frames: frames.cloned(),
                });
            }
            TraceOp::Free { id } => {
                let Some(slot) = self.ids.remove(&id) else {
                    return Err(match self.freed_get(id) {
                        Some(f) => format!(
                            "free of id {id}, which was already freed at line {} (double free)",
                            f.line
                        ),
                        None => format!(
                            "free of unknown id {id}: no earlier line allocates it{}",
                            self.forgotten_note()
                        ),
                    });
                };
                self.advance(time, event.line, out);
                self.free_slots.push(slot);
                let s = &mut self.slots[slot as usize];
                let uses = std::mem::take(&mut s.uses);
                let (size, stream) = (s.size, s.stream);
                self.remember_free(id, stream, uses, event.line);
                out.push(Step::Free {
                    slot,
                    size,
                    id,
                    at: self.clock,
                    line: event.line,
                });
            }
            TraceOp::RecordStream { id, stream } => {
                if !self.timed {
                    return Err(
                        "'u' (record_stream) lines need times: they exist only in v2 \
                                traces"
                            .into(),
                    );
                }
                check_stream(stream)?;
                let Some(&slot) = self.ids.get(&id) else {
                    return Err(match self.freed_get(id) {
                        Some(f) => format!(
                            "'u' (record_stream) of id {id}, which is not live: it was freed at \
                             line {}; a 'u' line names a live allocation",
                            f.line
                        ),
                        None => format!(
                            "'u' (record_stream) of unknown id {id}: no earlier line allocates \
                             it{}",
                            self.forgotten_note()
                        ),
                    });
                };
                self.advance(time, event.line, out);
                let s = &mut self.slots[slot as usize];
                if stream != s.stream && !s.uses.contains(&stream) {
                    s.uses.push(stream);
                }
                out.push(Step::Use {
                    slot,
                    stream,
                    id,
                    at: self.clock,
                    line: event.line,
                });
            }
            TraceOp::Complete { .. } => unreachable!("handled above"),
        }
        Ok(())
    }

    fn forgotten_note(&self) -> String {
        if self.forgot {
            format!(
                " (or it was freed more than {FREED_WINDOW} frees earlier: older frees are \
                 forgotten to keep memory bounded)"
            )
        } else {
            String::new()
        }
    }

    /// Move the CPU clock to an accepted `a`, `f` or `u` event at `time`, first releasing the
    /// markers that came due on the way.
    fn advance(&mut self, time: u64, line: u64, out: &mut Vec<Step>) {
        while self.pending.peek().is_some_and(|p| p.0.time <= time) {
            let Some(Reverse(p)) = self.pending.pop() else {
                break;
            };
            push_passed(out, p.ordinal, p.stream, &p.uses);
        }
        self.clock = Clock {
            ordinal: self.clock.ordinal + 1,
            time,
            events: self.events + 1,
        };
        self.clock_line = line;
    }

    /// The latest free of `id`, if still remembered.
    fn freed_get(&self, id: u64) -> Option<&Freed> {
        self.freed.get(&id).or_else(|| self.freed_old.get(&id))
    }

    fn remember_free(&mut self, id: u64, stream: u32, uses: Vec<u32>, line: u64) {
        if self.freed.len() >= FREED_WINDOW {
            std::mem::swap(&mut self.freed, &mut self.freed_old);
            self.forgot |= !self.freed.is_empty();
            self.freed.clear();
        }
        self.freed.insert(
            id,
            Freed {
                line,
                ordinal: self.clock.ordinal,
                time: self.clock.time,
                marked: 0,
                stream,
                uses: (!uses.is_empty()).then(|| uses.into_boxed_slice()),
            },
        );
    }

    fn marker(&mut self, id: u64, time: u64, line: u64, out: &mut Vec<Step>) -> Result<(), String> {
        if !self.timed {
            return Err(
                "a completion marker needs times: 'c' lines exist only in v2 traces".into(),
            );
        }
        if let Some(&slot) = self.ids.get(&id) {
            return Err(format!(
                "completion marker for id {id}, which is live (allocated at line {}): a 'c' \
                 line follows the free of its id",
                self.slots[slot as usize].line
            ));
        }
        let forgotten = self.forgotten_note();
        let f = match self.freed.get_mut(&id) {
            Some(f) => Some(f),
            None => self.freed_old.get_mut(&id),
        };
        let Some(f) = f else {
            return Err(format!(
                "completion marker for id {id}, which no earlier line frees{forgotten}"
            ));
        };
        if f.marked != 0 {
            let at = f.marked;
            return Err(format!(
                "second completion marker for id {id} (the first is at line {at}): a free has \
                 at most one marker"
            ));
        }
        if time < f.time {
            return Err(format!(
                "completion marker at time {time} for id {id}, whose free at line {} is at time \
                 {}: the work before a free completes after the free",
                f.line, f.time
            ));
        }
        if time > self.clock.time && self.pending.len() >= FREED_WINDOW {
            return Err(format!(
                "more than {FREED_WINDOW} completion markers wait for the CPU clock to reach \
                 their times: markers are written where the recorder learned of the completion, \
                 so their times are close to the lines around them"
            ));
        }
        f.marked = line.max(1);
        self.markers += 1;
        let uses = f.uses.take().map_or_else(Vec::new, Vec::from);
        if time <= self.clock.time {
            push_passed(out, f.ordinal, f.stream, &uses);
        } else {
            self.seq += 1;
            self.pending.push(Reverse(Pending {
                time,
                seq: self.seq,
                ordinal: f.ordinal,
                stream: f.stream,
                uses,
            }));
        }
        Ok(())
    }
}

fn push_passed(out: &mut Vec<Step>, ordinal: u64, stream: u32, uses: &[u32]) {
    for &s in std::iter::once(&stream).chain(uses) {
        out.push(Step::Passed { stream: s, ordinal });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(op: TraceOp, time: u64, line: u64) -> TraceEvent {
        TraceEvent {
            op,
            time: Some(time),
            line,
        }
    }

    /// Events with their times.
    type Events = Vec<(TraceOp, u64)>;

    /// The steps a timed sequence plans to, written compactly: `A slot`, `F slot`, `U slot`,
    /// `P stream@ordinal`.
    fn plan_all(events: &[(TraceOp, u64)]) -> Result<Vec<String>, (u64, String)> {
        let mut p = Planner::new(true);
        let mut out = Vec::new();
        for (i, &(op, t)) in events.iter().enumerate() {
            p.plan(&ev(op, t, i as u64 + 1), None, &mut out)
                .map_err(|m| (i as u64 + 1, m))?;
        }
        Ok(out
            .iter()
            .map(|s| match s {
                Step::Alloc { slot, .. } => format!("A{slot}"),
                Step::Free { slot, .. } => format!("F{slot}"),
                Step::Use { slot, .. } => format!("U{slot}"),
                Step::Passed { stream, ordinal } => format!("P{stream}@{ordinal}"),
            })
            .collect())
    }

    const fn a(id: u64, stream: u32) -> TraceOp {
        TraceOp::Alloc {
            id,
            size: 100,
            stream,
        }
    }
    const fn f(id: u64) -> TraceOp {
        TraceOp::Free { id }
    }
    const fn u(id: u64, stream: u32) -> TraceOp {
        TraceOp::RecordStream { id, stream }
    }
    const fn c(id: u64) -> TraceOp {
        TraceOp::Complete { id }
    }

    #[test]
    fn markers_wait_for_the_clock_and_name_every_stream() {
        // (events with times, planned steps)
        let cases: Vec<(Events, Vec<&str>)> = vec![
            // A marker already due applies where it is read.
            (
                vec![(a(1, 0), 0), (f(1), 5), (c(1), 5)],
                vec!["A0", "F0", "P0@2"],
            ),
            // A marker ahead of the clock waits for the first event at or after its time.
            (
                vec![
                    (a(1, 0), 0),
                    (f(1), 5),
                    (c(1), 20),
                    (a(2, 0), 10),
                    (a(3, 0), 20),
                ],
                vec!["A0", "F0", "A0", "P0@2", "A1"],
            ),
            // Markers due at once come out in time order, each for all its streams.
            (
                vec![
                    (a(1, 0), 0),
                    (u(1, 3), 1),
                    (a(2, 1), 2),
                    (f(1), 3),
                    (f(2), 4),
                    (c(1), 9),
                    (c(2), 8),
                    (a(3, 0), 9),
                ],
                vec!["A0", "U0", "A1", "F0", "F1", "P1@5", "P0@4", "P3@4", "A1"],
            ),
            // Slots are reused after a free; a 'u' of the owning stream adds nothing.
            (
                vec![
                    (a(1, 2), 0),
                    (u(1, 2), 0),
                    (f(1), 0),
                    (a(2, 0), 0),
                    (c(1), 0),
                ],
                vec!["A0", "U0", "F0", "A0", "P2@3"],
            ),
        ];
        for (events, want) in cases {
            assert_eq!(plan_all(&events).unwrap(), want, "{events:?}");
        }
    }

    #[test]
    fn history_errors_name_the_line() {
        // (events, line of the error, words of the message)
        let cases: Vec<(Events, u64, &str)> = vec![
            (vec![(a(1, 0), 0), (a(1, 0), 1)], 2, "duplicate live id 1"),
            (vec![(f(4), 0)], 1, "free of unknown id 4"),
            (
                vec![(a(1, 0), 0), (f(1), 1), (f(1), 2)],
                3,
                "already freed at line 2",
            ),
            (vec![(a(1, 0), 5), (f(1), 4)], 2, "time 4 is earlier than 5"),
            (vec![(u(1, 0), 0)], 1, "'u' (record_stream) of unknown id 1"),
            (
                vec![(a(1, 0), 0), (f(1), 0), (u(1, 1), 0)],
                3,
                "freed at line 2",
            ),
            (
                vec![(a(1, 0), 0), (u(1, 4096), 0)],
                2,
                "stream 4096 is over 4095",
            ),
            (vec![(c(3), 0)], 1, "which no earlier line frees"),
            (
                vec![(a(1, 0), 0), (c(1), 0)],
                2,
                "which is live (allocated at line 1)",
            ),
            (
                vec![(a(1, 0), 0), (f(1), 0), (c(1), 0), (c(1), 0)],
                4,
                "second completion marker for id 1 (the first is at line 3)",
            ),
            (
                vec![(a(1, 0), 0), (f(1), 10), (c(1), 9)],
                3,
                "whose free at line 2 is at time 10",
            ),
            (
                vec![
                    (a(1, 0), 0),
                    (f(1), 0),
                    (a(1, 0), 0),
                    (f(1), 0),
                    (c(1), 0),
                    (c(1), 0),
                ],
                6,
                "second completion marker",
            ),
        ];
        for (events, line, want) in cases {
            match plan_all(&events) {
                Err((at, message)) => {
                    assert_eq!(at, line, "{events:?}: {message}");
                    assert!(message.contains(want), "{events:?}: {message} lacks {want}");
                }
                Ok(steps) => panic!("{events:?} planned to {steps:?}; expected '{want}'"),
            }
        }
    }

    #[test]
    fn memory_follows_the_live_set_and_the_window() {
        let mut p = Planner::new(true);
        let mut out = Vec::new();
        let n = FREED_WINDOW as u64 * 3;
        for id in 0..n {
            out.clear();
            p.plan(&ev(a(id, 0), id, 2 * id + 1), None, &mut out)
                .unwrap();
            p.plan(&ev(f(id), id, 2 * id + 2), None, &mut out).unwrap();
        }
        assert_eq!(p.slot_count(), 1, "one allocation live at a time");
        assert_eq!(p.ids.len(), 0);
        let remembered = p.freed.len() + p.freed_old.len();
        assert!(
            (FREED_WINDOW..=2 * FREED_WINDOW).contains(&remembered),
            "{remembered}"
        );
        // The oldest frees are forgotten, and messages say so.
        let e = p.plan(&ev(f(0), n, 0), None, &mut out).unwrap_err();
        assert!(
            e.contains(&format!("more than {FREED_WINDOW} frees earlier")),
            "{e}"
        );
        // The last FREED_WINDOW are still known.
        for id in [n - 1, n - FREED_WINDOW as u64] {
            let e = p.plan(&ev(f(id), n, 0), None, &mut out).unwrap_err();
            assert!(e.contains("already freed"), "{id}: {e}");
        }
    }
}
