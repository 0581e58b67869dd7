//! The replay streams its input: memory follows what is live, not the length of the trace
//! (issue 13: a 2.1 MB gzip of `a 0 1 0\nf 0\n` repeated, 1.09 GB of text, once took more
//! than 4 GiB). The traces here are generated on the fly by a reader, never held anywhere,
//! and this file is its own test process so its peak resident memory is its own.

use std::io::Read;

use accelrt::trace::{self, ReplayOptions};

/// A reader producing `header` then `line(i)` for i in 0..count, without holding them.
struct Generated<F: FnMut(u64, &mut Vec<u8>)> {
    header: Vec<u8>,
    line: F,
    next: u64,
    count: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl<F: FnMut(u64, &mut Vec<u8>)> Generated<F> {
    fn new(header: &str, count: u64, line: F) -> Self {
        Generated {
            header: header.as_bytes().to_vec(),
            line,
            next: 0,
            count,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl<F: FnMut(u64, &mut Vec<u8>)> Read for Generated<F> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            self.buf.append(&mut self.header);
            while self.buf.len() < 64 * 1024 && self.next < self.count {
                (self.line)(self.next, &mut self.buf);
                self.next += 1;
            }
            if self.buf.is_empty() {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Peak resident memory of this process so far (Linux: VmHWM), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[test]
fn repeated_events_replay_in_bounded_memory() {
    const PAIRS: u64 = 1_000_000;
    let before = peak_rss();
    // (name, input, events, text bytes)
    let repeat = |_: u64, b: &mut Vec<u8>| b.extend_from_slice(b"a 0 1 0\nf 0\n");
    let unique = |i: u64, b: &mut Vec<u8>| {
        b.extend_from_slice(format!("a {i} {} {} {i}\nf {i} {i}\n", i % 4096 + 1, i % 3).as_bytes())
    };
    let plain: Box<dyn Read> = Box::new(Generated::new("", PAIRS, repeat));
    let gzip: Box<dyn Read> = Box::new(flate2::read::GzEncoder::new(
        Generated::new("", PAIRS, repeat),
        flate2::Compression::fast(),
    ));
    let v2: Box<dyn Read> = Box::new(Generated::new(
        "#accelrt-trace v2\n#! markers=all\n",
        PAIRS / 2,
        unique,
    ));
    let cases: Vec<(&str, Box<dyn Read>, u64)> = vec![
        ("plain v1, one id reused", plain, 2 * PAIRS),
        ("gzip v1, one id reused", gzip, 2 * PAIRS),
        ("v2, a new id each time, three streams", v2, PAIRS),
    ];
    for (name, input, events) in cases {
        let outcome =
            trace::replay_reader(name, name, input, &ReplayOptions::default(), &mut |_| {});
        let r = outcome
            .into_result()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((r.ops, r.total_ops), (events, Some(events)), "{name}");
        assert_eq!(r.allocations, events / 2, "{name}");
    }
    // 5 million events went through; holding them (24 bytes an event and 8 for its line, as
    // the reader once did) would take more than 150 MiB.
    match (before, peak_rss()) {
        (Some(before), Some(after)) => {
            let grew = after.saturating_sub(before);
            println!("peak resident memory grew by {} KiB", grew >> 10);
            assert!(
                grew < 48 << 20,
                "peak resident memory grew by {} MiB",
                grew >> 20
            );
        }
        _ => println!("SKIPPED the memory check: no /proc/self/status on this system"),
    }
}
