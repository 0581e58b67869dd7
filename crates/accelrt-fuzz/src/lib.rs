//! Mutation fuzzing of every accelrt input surface, on stable Rust, with no instrumentation.
//!
//! A [`Target`] turns bytes into calls on one surface (trace text and gzip, snapshot pickle
//! and JSON, configuration strings, the CLI's size and configuration arguments, C ABI call
//! sequences single- and multi-threaded) and checks what must hold: no panic, no hang, memory
//! bounded, and the target's own properties (a snapshot accelrt wrote reads back, the
//! allocator's invariants hold after hostile C calls, ...).
//!
//! [`fuzz`] runs a target from its seeds (real files from `traces/` and hand-written cases),
//! mutating them (bit flips, byte edits, splices, repeats, dictionary tokens and interesting
//! numbers). Without coverage instrumentation, the outcome is the feedback: an input whose
//! outcome (its error message with numbers blanked, or the path it took) was not seen before
//! joins the corpus. A panic, a violated property, a case running past its time limit or the
//! process growing past its memory limit is a [`Finding`]; its input is saved to the crash
//! directory. A hang or a memory blow-up cannot be interrupted in process: the watchdog saves
//! the input and aborts.
//!
//! Runs are reproducible: the same seed and case count give the same inputs.
//! `tests/ci.rs` runs each target briefly with a fixed seed inside `cargo test`;
//! `scripts/fuzz.sh [SECONDS]` runs them for as long as asked with random seeds.

pub mod targets;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use accelrt::alloc::splitmix::SplitMix64;

/// What a target's run says about one input.
pub type Outcome = Result<String, String>;

/// One input surface.
pub struct Target {
    /// Name on the command line and in reports.
    pub name: &'static str,
    /// One line on what it exercises.
    pub about: &'static str,
    /// Starting inputs.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Run one input: `Ok(outcome signature)`, or `Err(violated property)`. Panics are
    /// caught by the runner.
    pub run: fn(&[u8]) -> Outcome,
    /// Longest input generated.
    pub max_len: usize,
    /// Tokens the mutator inserts (keywords, opcodes, separators).
    pub dictionary: &'static [&'static [u8]],
    /// Longest one case may take before it counts as a hang.
    pub case_timeout: Duration,
}

/// How long to run.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Stop after this many cases (`None`: only the time limit).
    pub cases: Option<u64>,
    /// Stop after this long.
    pub time: Duration,
}

/// Why an input is a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingKind {
    /// The code under test panicked (or the C ABI reported a caught panic).
    Panic,
    /// A property the target checks did not hold.
    Violation,
}

/// A failing input.
#[derive(Debug, Clone)]
pub struct Finding {
    pub kind: FindingKind,
    pub message: String,
    pub input: Vec<u8>,
    /// Where the input was saved, if a crash directory was given.
    pub saved: Option<PathBuf>,
    /// Matches [`KNOWN`]: a finding reported elsewhere and fixed on another branch.
    pub known: Option<&'static str>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: &'static str,
    pub seed: u64,
    pub cases: u64,
    pub elapsed: Duration,
    /// Distinct outcomes seen (the corpus grows by one input per new outcome).
    pub outcomes: usize,
    pub corpus: usize,
    pub findings: Vec<Finding>,
    /// Largest resident set size of the process seen during the run, in bytes.
    pub peak_rss: u64,
}

impl Report {
    /// Findings not explained by [`KNOWN`].
    pub fn unknown_findings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.known.is_none())
    }

    /// One line for logs and RELIABILITY.md.
    pub fn summary(&self) -> String {
        let known = self.findings.len() - self.unknown_findings().count();
        format!(
            "{}: {} cases in {:.1} s (seed {:#x}), {} distinct outcomes, corpus {}, {} finding(s) \
             ({} known), peak RSS {} MiB",
            self.target,
            self.cases,
            self.elapsed.as_secs_f64(),
            self.seed,
            self.outcomes,
            self.corpus,
            self.findings.len(),
            known,
            self.peak_rss >> 20
        )
    }
}

/// Findings reported in issue 13 whose fixes belong to other branches: (text in the panic
/// message, what it is). Delete an entry once its fix is merged; the CI test then fails if
/// the fuzzer still finds it.
pub const KNOWN: &[(&str, &str)] = &[];

fn known(message: &str) -> Option<&'static str> {
    KNOWN
        .iter()
        .find(|(text, _)| message.contains(text))
        .map(|&(_, what)| what)
}

/// The fuzz targets' generator: the workspace's one SplitMix64, in `usize` terms.
#[derive(Debug, Clone)]
pub struct Rng(pub SplitMix64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in `0..n` (`n > 0`; 0 is read as 1).
    pub fn below(&mut self, n: usize) -> usize {
        self.0.below(n.max(1) as u64) as usize
    }
    /// True with probability 1/n.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// Numbers that break parsers and arithmetic, as text.
const INTERESTING_TEXT: &[&str] = &[
    "0",
    "1",
    "-1",
    "-0",
    "511",
    "512",
    "513",
    "4095",
    "4096",
    "2097152",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "281474976710656",
    "340282366920938463463374607431768211456",
    "1e309",
    "NaN",
    "inf",
    "0.5",
    "1.0000000001",
    "0x10",
    "",
    " ",
    "\u{0}",
    "\u{feff}",
    "é",
];

/// Integers that break binary decoders, little endian.
const INTERESTING_INT: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 4095,
];

/// The mutator: applies a few random edits to an input.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], target: &Target) -> Vec<u8> {
    let mut v = input.to_vec();
    let edits = 1 + rng.below(6);
    for _ in 0..edits {
        let len = v.len();
        match rng.below(13) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                v.drain(i..i + n);
            }
            4 if len > 0 => {
                // Repeat a range: nesting, long lines, many items.
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                let most = if rng.one_in(8) { 2000 } else { 16 };
                let times = 1 + rng.below(most);
                let chunk = v[i..i + n].to_vec();
                let at = i + n;
                let repeated: Vec<u8> = chunk.iter().copied().cycle().take(n * times).collect();
                v.splice(at..at, repeated);
            }
            5 if !target.dictionary.is_empty() => {
                let token = target.dictionary[rng.below(target.dictionary.len())];
                let i = rng.below(len + 1);
                v.splice(i..i, token.iter().copied());
            }
            6 => {
                // Replace a run of digits (or insert) with an interesting number.
                let text = INTERESTING_TEXT[rng.below(INTERESTING_TEXT.len())].as_bytes();
                let digits: Vec<usize> = (0..len).filter(|&i| v[i].is_ascii_digit()).collect();
                if digits.is_empty() {
                    let i = rng.below(len + 1);
                    v.splice(i..i, text.iter().copied());
                } else {
                    let start = digits[rng.below(digits.len())];
                    let mut end = start;
                    while end < len && v[end].is_ascii_digit() {
                        end += 1;
                    }
                    v.splice(start..end, text.iter().copied());
                }
            }
            7 if len > 0 => {
                // An interesting integer, binary, at a random place and width.
                let value = INTERESTING_INT[rng.below(INTERESTING_INT.len())];
                let width = [1, 2, 4, 8][rng.below(4)];
                let i = rng.below(len);
                let end = (i + width).min(len);
                let bytes = value.to_le_bytes();
                v[i..end].copy_from_slice(&bytes[..end - i]);
            }
            8 if !other.is_empty() => {
                // Splice: our head, another input's tail.
                let i = rng.below(len + 1);
                let j = rng.below(other.len());
                v.truncate(i);
                v.extend_from_slice(&other[j..]);
            }
            9 if len > 0 => {
                v.truncate(rng.below(len));
            }
            10 if len > 1 => {
                let i = rng.below(len);
                let j = rng.below(len);
                v.swap(i, j);
            }
            11 if len > 0 => {
                // Copy a range over another place.
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                let j = rng.below(len);
                let chunk = v[i..i + n].to_vec();
                let end = (j + n).min(len);
                v[j..end].copy_from_slice(&chunk[..end - j]);
            }
            12 if len > 0 => {
                let i = rng.below(len);
                v[i] = v[i].wrapping_add(rng.below(5) as u8).wrapping_sub(2);
            }
            _ => {}
        }
    }
    v.truncate(target.max_len);
    v
}

/// Resident set size of this process in bytes (0 where `/proc` is missing).
pub fn rss() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The outcome with quoted text and numbers blanked and cut short, so that inputs that differ
/// only in the values they carry count as one outcome (one path through the code). Quoted
/// input may hold quotes itself: everything from the first quote to the last one goes.
fn signature(outcome: &str) -> String {
    let quotes: &[char] = &['\'', '"', '`'];
    let unquoted = match (outcome.find(quotes), outcome.rfind(quotes)) {
        (Some(a), Some(b)) if b > a => format!("{}_{}", &outcome[..a], &outcome[b + 1..]),
        _ => outcome.to_string(),
    };
    let mut out = String::new();
    for c in unquoted.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
        if out.len() >= 64 {
            break;
        }
    }
    out
}

/// Print each new outcome (`ACCELRT_FUZZ_SHOW=1`), to see what the feedback tells apart.
static SHOW: AtomicBool = AtomicBool::new(false);

/// Most distinct outcomes remembered (beyond it, none counts as new).
const MAX_OUTCOMES: usize = 100_000;
/// Most inputs kept in the corpus (beyond it, a new one replaces a random one).
const MAX_CORPUS: usize = 4096;

thread_local! {
    static IN_CASE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

static PANIC_HOOK: std::sync::Once = std::sync::Once::new();

/// Keep panics inside fuzz cases quiet (they are reported as findings); others print as usual.
fn install_panic_hook() {
    PANIC_HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_CASE.with(|c| c.get()) && !QUIET.load(Ordering::Relaxed) {
                default(info);
            }
        }));
    });
}

/// Silence panics on every thread while a target runs (a target's own threads).
static QUIET: AtomicBool = AtomicBool::new(false);

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".into())
}

/// Save `input` under `dir/target/` with a name from its content; returns the path.
pub fn save(dir: &Path, target: &str, kind: &str, input: &[u8]) -> Option<PathBuf> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in input {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let folder = dir.join(target);
    std::fs::create_dir_all(&folder).ok()?;
    let path = folder.join(format!("{kind}-{h:016x}"));
    std::fs::write(&path, input).ok()?;
    Some(path)
}

/// Run one input through a target, catching panics.
pub fn run_one(target: &Target, input: &[u8]) -> Result<String, (FindingKind, String)> {
    install_panic_hook();
    IN_CASE.with(|c| c.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (target.run)(input)));
    IN_CASE.with(|c| c.set(false));
    match result {
        Ok(Ok(sig)) => Ok(sig),
        Ok(Err(violation)) => Err((FindingKind::Violation, violation)),
        Err(payload) => Err((FindingKind::Panic, panic_text(payload.as_ref()))),
    }
}

/// State the watchdog reads.
struct Watch {
    input: Mutex<Vec<u8>>,
    /// Milliseconds since the run started at which the current case started (0: none).
    case_started: AtomicU64,
    done: AtomicBool,
}

/// Fuzz `target` from `seed` within `budget`; inputs that fail are saved under `crashes`.
///
/// The watchdog aborts the process (after saving the input and printing why) when one case
/// runs past the target's `case_timeout`, or the process's resident memory passes
/// `memory_limit` bytes: neither can be interrupted in process.
pub fn fuzz(
    target: &Target,
    seed: u64,
    budget: Budget,
    crashes: Option<&Path>,
    memory_limit: u64,
) -> Report {
    install_panic_hook();
    QUIET.store(true, Ordering::Relaxed);
    SHOW.store(
        std::env::var_os("ACCELRT_FUZZ_SHOW").is_some(),
        Ordering::Relaxed,
    );
    let started = Instant::now();
    let watch = Arc::new(Watch {
        input: Mutex::new(Vec::new()),
        case_started: AtomicU64::new(0),
        done: AtomicBool::new(false),
    });
    let peak = Arc::new(AtomicU64::new(rss()));
    let watchdog = {
        let (watch, peak) = (watch.clone(), peak.clone());
        let crashes = crashes.map(Path::to_path_buf);
        let (name, timeout) = (target.name, target.case_timeout);
        std::thread::spawn(move || {
            while !watch.done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                let now_rss = rss();
                peak.fetch_max(now_rss, Ordering::Relaxed);
                let since = watch.case_started.load(Ordering::Relaxed);
                let now = started.elapsed().as_millis() as u64;
                let hung = since != 0 && now.saturating_sub(since) > timeout.as_millis() as u64;
                let bloated = now_rss > memory_limit;
                if hung || bloated {
                    let input = watch.input.lock().map(|i| i.clone()).unwrap_or_default();
                    let kind = if hung { "hang" } else { "memory" };
                    let saved = crashes.as_deref().and_then(|d| save(d, name, kind, &input));
                    eprintln!(
                        "accelrt-fuzz: {name}: {}: input saved to {saved:?} ({} bytes); aborting",
                        if hung {
                            format!("one case ran past {timeout:?} (a hang)")
                        } else {
                            format!(
                                "resident memory {} MiB is past the limit of {} MiB",
                                now_rss >> 20,
                                memory_limit >> 20
                            )
                        },
                        input.len()
                    );
                    std::process::abort();
                }
            }
        })
    };

    let mut rng = Rng(SplitMix64(seed));
    let mut corpus: Vec<Vec<u8>> = (target.seeds)();
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let mut seen: HashSet<String> = HashSet::new();
    let mut findings: Vec<Finding> = Vec::new();
    let mut seen_findings: HashSet<String> = HashSet::new();
    let mut cases = 0u64;
    // Seeds first, unmutated, then mutations.
    let seeds = corpus.len();
    loop {
        if budget.cases.is_some_and(|n| cases >= n) || started.elapsed() >= budget.time {
            break;
        }
        let input = if (cases as usize) < seeds {
            corpus[cases as usize].clone()
        } else {
            // A quarter of the time from a seed: a corpus grown large must not bury them.
            let base = if rng.one_in(4) {
                &corpus[rng.below(seeds)]
            } else {
                &corpus[rng.below(corpus.len())]
            };
            let other = &corpus[rng.below(corpus.len())];
            mutate(&mut rng, base, other, target)
        };
        *watch.input.lock().unwrap() = input.clone();
        watch
            .case_started
            .store(started.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        let result = run_one(target, &input);
        watch.case_started.store(0, Ordering::Relaxed);
        cases += 1;
        match result {
            Ok(sig) => {
                let sig = signature(&sig);
                if SHOW.load(Ordering::Relaxed) && !seen.contains(&sig) {
                    eprintln!("new outcome: {sig}");
                }
                if seen.len() < MAX_OUTCOMES && seen.insert(sig) {
                    if corpus.len() < MAX_CORPUS {
                        corpus.push(input);
                    } else {
                        // Keep the seeds; replace one of the others.
                        let i = seeds + rng.below(corpus.len() - seeds);
                        corpus[i] = input;
                    }
                }
            }
            Err((kind, message)) => {
                if seen_findings.insert(signature(&message)) {
                    let saved = crashes.and_then(|d| {
                        save(d, target.name, &format!("{kind:?}").to_lowercase(), &input)
                    });
                    findings.push(Finding {
                        kind,
                        known: known(&message),
                        message,
                        input,
                        saved,
                    });
                }
            }
        }
        let now = rss();
        peak.fetch_max(now, Ordering::Relaxed);
    }
    watch.done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    QUIET.store(false, Ordering::Relaxed);
    Report {
        target: target.name,
        seed,
        cases,
        elapsed: started.elapsed(),
        outcomes: seen.len(),
        corpus: corpus.len(),
        findings,
        peak_rss: peak.load(Ordering::Relaxed),
    }
}

/// The repository's root (for seeds from `traces/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
