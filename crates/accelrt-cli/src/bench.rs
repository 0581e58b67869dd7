//! `accelrt bench`: the allocator's fast path against the system allocator, an RMM-style
//! random-allocation workload, multi-thread scaling, and the event benches.
//!
//! Numbers are only meaningful from a release build (`cargo run --release -p accelrt-cli --
//! bench`). The allocator runs on the host backend's memory with a large capacity: segments
//! are `MAP_NORESERVE` mappings that are never touched, so even the 1 GiB case costs no RAM.

use std::hint::black_box;
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use accelrt::alloc::splitmix::SplitMix64;
use accelrt::alloc::{
    format_size, AllocatorConfig, CachingAllocator, EventCounters, HostMemory, MemoryProvider,
};
use accelrt::{Device, DeviceType, Stream};
use serde_json::{json, Map, Value};

use crate::error::CliError;

mod report;
use report::{machine, print_human, utc_now};

/// Arguments of `accelrt bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// A short run (about a tenth of the work) for smoke tests; numbers are noisier.
    #[arg(long)]
    pub quick: bool,
    /// Threads in the multi-thread bench, each on its own stream.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
    /// Where the allocator's segments and the benched events come from: `host` (simulated
    /// device memory, host events; the default), `cuda` (device 0's memory and CUDA events),
    /// or a registered backend by name (e.g. `fault`: its device 0 and events).
    #[arg(long, value_name = "host|cuda|NAME", default_value = "host")]
    pub backend: DeviceType,
    /// Allocator configuration to bench (`ACCELRT_ALLOC_CONF` syntax; the default when empty).
    #[arg(long, value_name = "STR", default_value = "")]
    pub alloc_conf: String,
}

/// Simulated device size: large enough for the random workloads' peaks (tens of GiB of
/// untouched, unreserved address space).
const BENCH_CAPACITY: u64 = 256 << 30;

/// Request sizes of the pair benches.
const PAIR_SIZES: [usize; 7] = [512, 4096, 1 << 20, 2 << 20, 20 << 20, 64 << 20, 1 << 30];

const HOST_DEVICE: Device = Device {
    kind: DeviceType::Host,
    index: 0,
};

/// Where bench allocators take their segments: a fresh simulated host device each time, or
/// one real device's memory provider (shared; each bench empties its cache when done).
#[derive(Clone)]
struct Target {
    device: Device,
    provider: Option<Arc<dyn MemoryProvider>>,
    config: AllocatorConfig,
}

/// How much work each bench does.
struct Plan {
    pair_batches: usize,
    pair_iters: u64,
    random_ops: u64,
    thread_pairs: u64,
    thread_reps: u32,
    event_iters: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                pair_batches: 5,
                pair_iters: 2_000,
                random_ops: 20_000,
                thread_pairs: 20_000,
                thread_reps: 1,
                event_iters: 2_000,
            }
        } else {
            Plan {
                pair_batches: 21,
                pair_iters: 50_000,
                random_ops: 200_000,
                thread_pairs: 500_000,
                thread_reps: 3,
                event_iters: 100_000,
            }
        }
    }
}

/// The configuration the benches run under: `--alloc-conf` over the default, without
/// per-call invariant checks (which would dominate the timings).
fn bench_config(conf: &str) -> Result<AllocatorConfig, CliError> {
    let mut config = AllocatorConfig::parse(conf)?;
    config.debug_checks = false;
    Ok(config)
}

fn fresh_allocator(target: &Target) -> Result<CachingAllocator, CliError> {
    let provider: Arc<dyn MemoryProvider> = match &target.provider {
        Some(p) => Arc::clone(p),
        None => Arc::new(HostMemory::new(BENCH_CAPACITY)),
    };
    Ok(CachingAllocator::new(
        target.device,
        provider,
        None,
        target.config.clone(),
    )?)
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn ns_per(elapsed: Duration, count: u64) -> f64 {
    elapsed.as_nanos() as f64 / count.max(1) as f64
}

/// `pairs` alloc+free pairs: the first takes a segment from the device, later ones reuse it.
fn warm_up(
    alloc: &CachingAllocator,
    size: usize,
    stream: Stream,
    pairs: u64,
) -> Result<(), CliError> {
    for _ in 0..pairs {
        let p = alloc.raw_alloc(size, stream)?;
        alloc.raw_free(p)?;
    }
    Ok(())
}

/// Median ns of a cached `raw_alloc` + `raw_free` pair of `size` bytes on one stream.
fn accelrt_pair_ns(alloc: &CachingAllocator, size: usize, plan: &Plan) -> Result<f64, CliError> {
    let stream = Stream {
        device: alloc.device(),
        index: 0,
    };
    warm_up(alloc, size, stream, plan.pair_iters.min(1_000))?;
    let mut per_batch = Vec::with_capacity(plan.pair_batches);
    for _ in 0..plan.pair_batches {
        let start = Instant::now();
        for _ in 0..plan.pair_iters {
            let p = black_box(alloc.raw_alloc(black_box(size), stream)?);
            alloc.raw_free(p)?;
        }
        per_batch.push(ns_per(start.elapsed(), plan.pair_iters));
    }
    Ok(median(per_batch))
}

/// Median ns of a `malloc` + `free` pair of `size` bytes (std's global allocator, which is
/// the C library's `malloc` for these alignments).
fn system_pair_ns(size: usize, plan: &Plan) -> Result<f64, CliError> {
    let layout = std::alloc::Layout::from_size_align(size, 16)
        .map_err(|e| CliError::Argument(format!("layout for {size} bytes: {e}")))?;
    // Sizes the C library serves with mmap/munmap cost microseconds; do fewer of them.
    let iters = if size >= 1 << 20 {
        (plan.pair_iters / 20).max(100)
    } else {
        plan.pair_iters
    };
    let pair = || {
        // SAFETY: `layout` has a non-zero size; the pointer is checked and freed with the
        // same layout it was allocated with.
        unsafe {
            let p = std::alloc::alloc(black_box(layout));
            if p.is_null() {
                return Err(CliError::Argument(format!(
                    "the system allocator refused {}: not enough memory for the malloc comparison",
                    format_size(size as u64)
                )));
            }
            std::alloc::dealloc(black_box(p), layout);
        }
        Ok(())
    };
    for _ in 0..iters.min(1_000) {
        pair()?;
    }
    let mut per_batch = Vec::with_capacity(plan.pair_batches);
    for _ in 0..plan.pair_batches {
        let start = Instant::now();
        for _ in 0..iters {
            pair()?;
        }
        per_batch.push(ns_per(start.elapsed(), iters));
    }
    Ok(median(per_batch))
}

/// Median ns of a cached pinned-host alloc+free pair, through the backend's own pinned
/// allocator (page-locked memory on CUDA, host memory on the host backend).
fn pinned_pair_ns(kind: accelrt::DeviceType, size: usize, plan: &Plan) -> Result<f64, CliError> {
    let pinned = accelrt::backend(kind).pinned_allocator()?;
    let warm = pinned.allocate(size)?;
    pinned.free(warm)?;
    let mut per_batch = Vec::with_capacity(plan.pair_batches);
    for _ in 0..plan.pair_batches {
        let start = Instant::now();
        for _ in 0..plan.pair_iters {
            let p = pinned.allocate(black_box(size))?;
            pinned.free(black_box(p))?;
        }
        per_batch.push(ns_per(start.elapsed(), plan.pair_iters));
    }
    Ok(median(per_batch))
}

/// Result of one random-allocation workload.
struct RandomResult {
    live: usize,
    max_size: u64,
    ops: u64,
    ns_per_call: f64,
    peak_reserved: u64,
    peak_allocated: u64,
    peak_requested: u64,
    device_allocs: u64,
    /// Driver calls the timed loop made, per kind (`DriverCalls::named`), and their total.
    driver_calls: Vec<(&'static str, u64)>,
    /// The allocator's event counters over the timed loop (moves of idle chunks, moves the
    /// time budget deferred, the most of it drawn at once).
    counters: EventCounters,
    /// The out-of-memory that stopped the workload: the device is smaller than its peak
    /// (e.g. a registered backend over this machine's memory); the figures are then NaN.
    error: Option<String>,
}

impl RandomResult {
    /// A workload that did not fit the device.
    fn did_not_fit(live: usize, max_size: u64, ops: u64, error: &CliError) -> Self {
        RandomResult {
            live,
            max_size,
            ops,
            ns_per_call: f64::NAN,
            peak_reserved: 0,
            peak_allocated: 0,
            peak_requested: 0,
            device_allocs: 0,
            driver_calls: Vec::new(),
            counters: EventCounters::default(),
            error: Some(error.to_string()),
        }
    }

    /// Peak reserved / peak allocated (allocated = rounded block bytes, as PyTorch's
    /// `max_memory_allocated`), the figure ANCHORS.md reports.
    fn ratio(&self) -> f64 {
        if self.error.is_some() {
            return f64::NAN;
        }
        self.peak_reserved as f64 / self.peak_allocated.max(1) as f64
    }

    fn to_json(&self) -> Value {
        json!({
            "live": self.live,
            "max_size_bytes": self.max_size,
            "ops": self.ops,
            "ns_per_call": self.ns_per_call,
            "peak_reserved_bytes": self.peak_reserved,
            "peak_allocated_bytes": self.peak_allocated,
            "peak_requested_bytes": self.peak_requested,
            "ratio": self.ratio(),
            "ratio_vs_requested": self.peak_reserved as f64 / self.peak_requested.max(1) as f64,
            "device_allocs": self.device_allocs,
            "driver_calls": self.driver_calls_json(),
            "vm_call_us": self.counters.vm_call_us,
            "moves": crate::replay::moves_json(&self.counters),
            "error": self.error,
        })
    }

    fn driver_calls_total(&self) -> u64 {
        self.driver_calls.iter().map(|(_, n)| n).sum()
    }

    fn driver_calls_json(&self) -> Value {
        let mut m: serde_json::Map<String, Value> = self
            .driver_calls
            .iter()
            .map(|&(k, n)| (k.to_string(), n.into()))
            .collect();
        m.insert("total".into(), self.driver_calls_total().into());
        Value::Object(m)
    }
}

/// RMM-style random allocations, as `tools/torch/alloc_bench.py` runs them on PyTorch: `live`
/// allocations of sizes uniform in 1..=`max_size`; then `ops` times, free a random one and
/// allocate a new one in its place. ns per call = loop time / (2 × ops). The random choices
/// are drawn before the clock starts.
fn random_workload(
    target: &Target,
    live: usize,
    max_size: u64,
    ops: u64,
    seed: u64,
) -> Result<RandomResult, CliError> {
    let alloc = fresh_allocator(target)?;
    let stream = Stream {
        device: alloc.device(),
        index: 0,
    };
    let mut rng = SplitMix64(seed);
    let size = move |rng: &mut SplitMix64| 1 + rng.below_scaled(max_size);
    let sizes: Vec<u64> = (0..live).map(|_| size(&mut rng)).collect();
    let steps: Vec<(u32, u64)> = (0..ops)
        .map(|_| (rng.below_scaled(live as u64) as u32, size(&mut rng)))
        .collect();

    // Peak of live requested bytes, outside the timed loop.
    let mut current: u64 = sizes.iter().sum();
    let mut peak_requested = current;
    {
        let mut shadow = sizes.clone();
        for &(k, s) in &steps {
            current = current - shadow[k as usize] + s;
            shadow[k as usize] = s;
            peak_requested = peak_requested.max(current);
        }
    }

    let mut ptrs = Vec::with_capacity(live);
    for &s in &sizes {
        ptrs.push(alloc.raw_alloc(s as usize, stream)?);
    }
    let before = alloc.stats();
    let calls_before = before.driver_calls;
    let start = Instant::now();
    for &(k, s) in &steps {
        let slot = &mut ptrs[k as usize];
        alloc.raw_free(*slot)?;
        *slot = alloc.raw_alloc(s as usize, stream)?;
    }
    let elapsed = start.elapsed();
    let stats = alloc.stats();
    let driver_calls = stats
        .driver_calls
        .named()
        .iter()
        .zip(calls_before.named())
        .map(|(&(k, after), (_, before))| (k, after.saturating_sub(before)))
        .collect();
    for p in ptrs {
        alloc.raw_free(p)?;
    }
    alloc.empty_cache()?;
    Ok(RandomResult {
        live,
        max_size,
        ops,
        ns_per_call: ns_per(elapsed, 2 * ops),
        peak_reserved: stats.reserved_bytes_peak,
        peak_allocated: stats.all().allocated_bytes.peak,
        peak_requested,
        device_allocs: stats.counters.num_device_alloc,
        driver_calls,
        counters: stats.counters.since(&before.counters),
        error: None,
    })
}

/// Which allocator the threads of the multi-thread bench share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sharing {
    /// One allocator, each thread on its own stream (its own pool): what is measured.
    OneAllocator,
    /// An allocator of its own for each thread, sharing nothing: the control. Its scaling is
    /// what the machine allows (cores, caches, clocks); the shared allocator's falling short
    /// of it is what the allocator costs.
    OnePerThread,
}

/// One run of the multi-thread bench.
#[derive(Clone, Copy, Default)]
struct ThreadRun {
    /// All pairs over the window from the first worker's start to the last worker's end.
    pairs_per_sec: f64,
    /// The slowest worker's own time per pair: a thread slowed on every call (a cache line
    /// the threads share) shows here, threads started apart do not.
    slowest_ns_per_pair: f64,
    /// Between the first and the last worker's start, in microseconds.
    start_spread_us: f64,
}

/// Cached pairs over `threads` threads, each on its own stream, all released together. The
/// window runs from the first worker's start to the last worker's end, as the workers
/// themselves see it (so a descheduled main thread cannot shorten it).
fn pairs_per_sec(
    target: &Target,
    threads: u32,
    pairs_per_thread: u64,
    size: usize,
    sharing: Sharing,
) -> Result<ThreadRun, CliError> {
    let shared = match sharing {
        Sharing::OneAllocator => Some(fresh_allocator(target)?),
        Sharing::OnePerThread => None,
    };
    let barrier = Barrier::new(threads as usize);
    let windows = std::thread::scope(|scope| -> Result<Vec<(Instant, Instant)>, CliError> {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (shared, barrier) = (shared.as_ref(), &barrier);
                scope.spawn(move || -> Result<(Instant, Instant), CliError> {
                    let mut own = None;
                    let ready = match shared {
                        Some(a) => Ok(a),
                        None => fresh_allocator(target).map(|a| &*own.insert(a)),
                    }
                    .and_then(|alloc| {
                        let stream = Stream {
                            device: alloc.device(),
                            index: t + 1,
                        };
                        warm_up(alloc, size, stream, pairs_per_thread.min(1_000))
                            .map(|()| (alloc, stream))
                    });
                    // Always reach the barrier, or the others would wait forever.
                    barrier.wait();
                    let (alloc, stream) = ready?;
                    let start = Instant::now();
                    for _ in 0..pairs_per_thread {
                        let p = black_box(alloc.raw_alloc(black_box(size), stream)?);
                        alloc.raw_free(p)?;
                    }
                    let end = Instant::now();
                    if shared.is_none() {
                        alloc.empty_cache()?;
                    }
                    Ok((start, end))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| CliError::Argument("a bench thread panicked".into()))?
            })
            .collect()
    })?;
    if let Some(alloc) = &shared {
        alloc.empty_cache()?;
    }
    let first = windows.iter().map(|w| w.0).min();
    let last = windows.iter().map(|w| w.1).max();
    let last_start = windows.iter().map(|w| w.0).max();
    let elapsed = match (first, last) {
        (Some(first), Some(last)) => last.duration_since(first),
        _ => Duration::ZERO,
    };
    let slowest = windows
        .iter()
        .map(|w| w.1.duration_since(w.0))
        .max()
        .unwrap_or_default();
    Ok(ThreadRun {
        pairs_per_sec: (threads as u64 * pairs_per_thread) as f64 / elapsed.as_secs_f64().max(1e-9),
        slowest_ns_per_pair: slowest.as_nanos() as f64 / pairs_per_thread.max(1) as f64,
        start_spread_us: match (first, last_start) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64() * 1e6,
            _ => 0.0,
        },
    })
}

/// Run `accelrt bench`.
pub fn run(args: BenchArgs) -> Result<ExitCode, CliError> {
    let plan = Plan::new(args.quick);
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    if build == "debug" {
        eprintln!("note: this is a debug build; bench numbers are only meaningful with `cargo run --release`");
    }

    let config = bench_config(&args.alloc_conf)?;
    let target = match crate::replay::backend_provider(args.backend)? {
        None => Target {
            device: HOST_DEVICE,
            provider: None,
            config,
        },
        Some((device, provider)) => Target {
            device,
            provider: Some(provider),
            config,
        },
    };
    let mut fast = Map::new();
    let mut system = Map::new();
    let pair_alloc = fresh_allocator(&target)?;
    for size in PAIR_SIZES {
        fast.insert(
            size.to_string(),
            json!(accelrt_pair_ns(&pair_alloc, size, &plan)?),
        );
        system.insert(size.to_string(), json!(system_pair_ns(size, &plan)?));
    }
    pair_alloc.empty_cache()?;
    drop(pair_alloc);

    const SEED: u64 = 42;
    // A device smaller than a workload's peak reports that workload as not fitting.
    let random =
        |live, max_size| match random_workload(&target, live, max_size, plan.random_ops, SEED) {
            Err(e) if e.is_out_of_memory() => Ok(RandomResult::did_not_fit(
                live,
                max_size,
                plan.random_ops,
                &e,
            )),
            other => other,
        };
    let random_64 = random(1000, 64 << 20)?;
    let random_1 = random(1000, 1 << 20)?;
    let random_256 = random(200, 256 << 20)?;

    const THREAD_PAIR_SIZE: usize = 4096;
    // Best of a few runs: throughput only ever drops under outside load.
    let best = |threads: u32, sharing: Sharing| -> Result<ThreadRun, CliError> {
        let mut best = ThreadRun::default();
        for _ in 0..plan.thread_reps {
            let run = pairs_per_sec(
                &target,
                threads,
                plan.thread_pairs,
                THREAD_PAIR_SIZE,
                sharing,
            )?;
            if run.pairs_per_sec > best.pairs_per_sec {
                best = run;
            }
        }
        Ok(best)
    };
    let single = best(1, Sharing::OneAllocator)?;
    let total = best(args.threads, Sharing::OneAllocator)?;
    let control_single = best(1, Sharing::OnePerThread)?;
    let control_total = best(args.threads, Sharing::OnePerThread)?;
    let multi = json!({
        "threads": args.threads,
        "size_bytes": THREAD_PAIR_SIZE,
        "pairs_per_thread": plan.thread_pairs,
        "best_of": plan.thread_reps,
        "pairs_per_sec_total": total.pairs_per_sec,
        "single_thread_pairs_per_sec": single.pairs_per_sec,
        "scaling": total.pairs_per_sec / single.pairs_per_sec.max(1e-9),
        // Per call (the slowest thread's own time per pair) or in the start (the spread)?
        "slowest_thread_ns_per_pair": total.slowest_ns_per_pair,
        "single_thread_ns_per_pair": single.slowest_ns_per_pair,
        "start_spread_us": total.start_spread_us,
        // The control: each thread with an allocator of its own (nothing shared).
        "private_allocators_pairs_per_sec_total": control_total.pairs_per_sec,
        "private_allocators_scaling": control_total.pairs_per_sec
            / control_single.pairs_per_sec.max(1e-9),
        "private_allocators_slowest_thread_ns_per_pair": control_total.slowest_ns_per_pair,
    });

    let events = crate::bench_events::run_event_benches(plan.event_iters, args.backend);

    let mut out = Map::new();
    out.insert("accelrt_version".into(), json!(env!("CARGO_PKG_VERSION")));
    out.insert("build".into(), json!(build));
    out.insert("quick".into(), json!(args.quick));
    out.insert("date".into(), json!(utc_now()));
    out.insert("machine".into(), machine());
    out.insert("backend".into(), json!(args.backend.name()));
    out.insert(
        "device".into(),
        json!(accelrt::backend(target.device.kind)
            .device_properties(target.device.index)
            .map(|p| p.name)
            .unwrap_or_default()),
    );
    out.insert("config".into(), json!(target.config.to_conf_string()));
    out.insert("fast_path_pair_ns".into(), Value::Object(fast));
    out.insert("system_malloc_pair_ns".into(), Value::Object(system));
    let mut pinned = Map::new();
    for size in [4096usize, 1 << 20] {
        pinned.insert(
            size.to_string(),
            json!(pinned_pair_ns(target.device.kind, size, &plan)?),
        );
    }
    out.insert("pinned_pair_ns".into(), Value::Object(pinned));
    out.insert("random_ns_per_call".into(), json!(random_64.ns_per_call));
    out.insert("random_ratio".into(), json!(random_64.ratio()));
    out.insert(
        "random_1mib_ns_per_call".into(),
        json!(random_1.ns_per_call),
    );
    out.insert("random_1mib_ratio".into(), json!(random_1.ratio()));
    out.insert(
        "random_256mib_200_live_ns_per_call".into(),
        json!(random_256.ns_per_call),
    );
    out.insert(
        "random_256mib_200_live_ratio".into(),
        json!(random_256.ratio()),
    );
    out.insert(
        "random".into(),
        json!({
            "1000_live_64MiB": random_64.to_json(),
            "1000_live_1MiB": random_1.to_json(),
            "200_live_256MiB": random_256.to_json(),
        }),
    );
    out.insert("multi_thread".into(), multi);
    let event_keys: Vec<String> = match events {
        Value::Object(map) => {
            let keys = map.keys().cloned().collect();
            for (k, v) in map {
                out.insert(k, v);
            }
            keys
        }
        Value::Null => Vec::new(),
        other => {
            out.insert("events".into(), other);
            vec!["events".into()]
        }
    };

    if args.json {
        println!("{}", Value::Object(out));
    } else {
        print_human(&out, &event_keys, &[&random_64, &random_1, &random_256]);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }

    #[test]
    fn dates() {
        let d = utc_now();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20") && d.ends_with('Z'), "{d}");
    }
}
