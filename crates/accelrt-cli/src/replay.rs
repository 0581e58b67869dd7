//! `accelrt replay`: replay allocator traces through accelrt's caching allocator, under one
//! or more configurations, next to what PyTorch reached on the recorded run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use accelrt::alloc::{format_size, AllocatorConfig, EventCounters, MemoryProvider, PeakBreakdown};
use accelrt::trace::{self, DeviceModel, ReplayInput, ReplayOptions, ReplayOutcome, ReplayTarget};
use accelrt::{Device, DeviceType};

use crate::error::CliError;
use crate::outputs;
use accelrt::DeviceError;

/// Arguments of `accelrt replay`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReplayArgs {
    /// Trace files, v1 or v2, plain text or gzip (see traces/FORMAT.md), e.g.
    /// traces/resnet50_train.trace.gz, or memory snapshots: a PyTorch
    /// `torch.cuda.memory._dump_snapshot()` pickle (each device's `alloc`/`free_requested`
    /// entries are replayed) or accelrt's JSON snapshot. Told apart by content.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Allocator configuration, in ACCELRT_ALLOC_CONF syntax (e.g. 'expandable_segments:true');
    /// repeat to compare several. None, or '', is the default configuration (the
    /// ACCELRT_ALLOC_CONF variable is not read here, so runs are reproducible). `recorded` is
    /// each trace's own (its `#! conf=` header): the replay then predicts the recorded run.
    #[arg(long = "alloc-conf", value_name = "STR")]
    pub alloc_conf: Vec<String>,
    /// When queued GPU work completes in the replay: `auto` (markers when the trace marks
    /// every free, else the default lag), `markers`, `lag:500us` (the GPU runs 500 us behind
    /// the CPU; the default for timed traces), `lag:16ev` (16 events behind; the default
    /// for traces without times), both (`lag:500us,16ev`), or `instant` (every fence completes at once, as replays did
    /// before the device model).
    #[arg(long = "device-model", value_name = "MODEL", default_value = "auto")]
    pub device_model: DeviceModel,
    /// One JSON object per trace and configuration, one a line.
    #[arg(long)]
    pub json: bool,
    /// Size of the simulated device: bytes, or with a unit (24GB, 24GiB, 512MiB, 1.5TiB).
    /// Default: this machine's physical memory (pages are never touched, so any size works).
    #[arg(long, value_name = "BYTES", value_parser = parse_capacity)]
    pub capacity: Option<u64>,
    /// Whose memory the allocator gets its segments from: `host` (simulated device memory,
    /// the default) or `cuda` (device 0's real memory, through cuMemAlloc).
    #[arg(long, value_name = "host|cuda", default_value = "host")]
    pub backend: DeviceType,
    /// Record the replay's memory history and write the snapshot at its end, with the
    /// history: a PyTorch pickle (loadable by pickle.load and
    /// https://pytorch.org/memory_viz), or accelrt's JSON when OUT ends in `.json`. With
    /// several traces or configurations, the trace and configuration are added to the name.
    #[arg(long, value_name = "OUT.pickle")]
    pub snapshot: Option<PathBuf>,
    /// Write the picture: one self-contained HTML page with memory over time and the segment
    /// map at the peak (file names as for --snapshot).
    #[arg(long, value_name = "OUT.html")]
    pub html: Option<PathBuf>,
    /// Write the replay's allocator events as a Chrome trace (Perfetto, chrome://tracing)
    /// (file names as for --snapshot).
    #[arg(long, value_name = "OUT.json")]
    pub profile: Option<PathBuf>,
}

/// A real device and its memory provider.
pub(crate) type DeviceMemory = (Device, Arc<dyn MemoryProvider>);

/// The memory provider of `backend`'s device 0, or why it cannot be had. `None` for the host
/// backend: each replay gets a fresh simulated device of `--capacity` bytes.
/// The `moves` object of `replay --json` and `bench --json`: moves of idle chunks, the pages
/// they moved, the moves the time budget deferred (and those too large to defer), and the most
/// of it drawn at once.
pub(crate) fn moves_json(c: &EventCounters) -> serde_json::Value {
    serde_json::json!({
        "num_page_steals": c.num_page_steals,
        "num_pages_remapped": c.num_pages_remapped,
        "num_moves_deferred": c.num_moves_deferred,
        "num_moves_exempt": c.num_moves_exempt,
        "move_time_drawn_peak_us": c.move_time_drawn_peak_us,
    })
}

pub(crate) fn backend_provider(backend: DeviceType) -> Result<Option<DeviceMemory>, CliError> {
    if backend == DeviceType::Host {
        return Ok(None);
    }
    let hooks = accelrt::backend(backend);
    if let Some(reason) = hooks.unavailable_reason() {
        return Err(DeviceError::BackendUnavailable { backend, reason }.into());
    }
    let device = Device {
        kind: backend,
        index: 0,
    };
    Ok(Some((device, hooks.memory_provider(0)?)))
}

/// A configuration to replay under, with the label the user gave it.
#[derive(Clone)]
struct NamedConfig {
    label: String,
    config: AllocatorConfig,
}

/// What one `--alloc-conf` asks for: a configuration, or `recorded` (each trace's own).
enum ConfigChoice {
    Given(Box<NamedConfig>),
    Recorded,
}

/// The label `--alloc-conf recorded` asks for.
const RECORDED: &str = "recorded";

/// The configurations to replay `input` under: `recorded` becomes the trace header's `conf`.
fn resolve(choices: &[ConfigChoice], input: &ReplayInput) -> Result<Vec<NamedConfig>, String> {
    choices
        .iter()
        .map(|c| match c {
            ConfigChoice::Given(named) => Ok(NamedConfig::clone(named)),
            ConfigChoice::Recorded => {
                let h = &input.header;
                let conf = h.conf.as_deref().ok_or_else(|| {
                    "--alloc-conf recorded: the trace does not say which configuration it was \
                     recorded with (no '#! conf=' header line); name one, e.g. --alloc-conf ''"
                        .to_string()
                })?;
                let config = h.recorded_config().ok_or_else(|| {
                    format!(
                        "--alloc-conf recorded: the trace's '#! conf={}' is not a configuration \
                         accelrt reads; name one instead",
                        cut(conf)
                    )
                })?;
                Ok(NamedConfig {
                    label: format!("{RECORDED} ({conf})"),
                    config,
                })
            }
        })
        .collect()
}

/// The widest configuration label the table shows; longer ones are cut with an ellipsis
/// (the JSON output keeps them whole).
const MAX_LABEL: usize = 48;

/// Run `accelrt replay`. Exits non-zero when any trace could not be read or replayed to the
/// end, after printing every result it has; each failure is on stderr, naming file and line.
pub fn run(args: ReplayArgs) -> Result<ExitCode, CliError> {
    let choices = parse_configs(&args.alloc_conf)?;
    if args.capacity.is_some() && args.backend != DeviceType::Host {
        return Err(CliError::Argument(format!(
            "--capacity sizes the simulated host device; with --backend {} the device's memory \
             is real: cap it with --alloc-conf per_process_memory_fraction:F instead",
            args.backend
        )));
    }
    let target =
        backend_provider(args.backend)?.map(|(device, provider)| ReplayTarget { device, provider });
    if cfg!(debug_assertions) && !args.json {
        eprintln!(
            "note: this is a debug build; ns/call is only meaningful with `cargo run --release`"
        );
    }
    let mut failed = false;
    let mut outputs = outputs::Outputs::new(
        args.snapshot.clone(),
        args.html.clone(),
        args.profile.clone(),
        args.files.len() > 1,
        choices.len() > 1,
    );
    let mut shown = 0;
    for path in &args.files {
        let inputs = match trace::open(path) {
            Ok(inputs) => inputs,
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
                continue;
            }
        };
        if inputs.len() > 1 {
            outputs.set_several_inputs();
        }
        for input in &inputs {
            let configs = match resolve(&choices, input) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {}: {e}", input.name);
                    failed = true;
                    continue;
                }
            };
            let progress = outputs::Progress::new(args.json, input, configs.len());
            let mut rows = Vec::with_capacity(configs.len());
            let mut files = Vec::new();
            for (k, named) in configs.iter().enumerate() {
                progress.start(k, &format!("{} [{}]", input.name, cut(&named.label)));
                let opts = ReplayOptions {
                    config: named.config.clone(),
                    capacity: args.capacity,
                    device_model: args.device_model,
                    history: outputs.any(),
                    target: target.clone(),
                    ..ReplayOptions::default()
                };
                let outcome = input.replay(&opts, &mut |p| progress.update(p));
                let mut written = outputs::Written::default();
                if let Some(snapshot) = &outcome.snapshot {
                    match outputs.write(input, snapshot, &named.label, &opts, &outcome) {
                        Ok(w) => written = w,
                        Err(e) => {
                            failed = true;
                            progress.suspend(|| eprintln!("error: [{}] {e}", cut(&named.label)));
                        }
                    }
                }
                if args.json {
                    let mut line = json_line(input, named, &outcome, args.capacity);
                    if let Some(map) = line.as_object_mut() {
                        map.insert("backend".into(), args.backend.name().into());
                        for (key, file) in [
                            ("snapshot_file", &written.snapshot),
                            ("html_file", &written.html),
                            ("profile_file", &written.profile),
                        ] {
                            if let Some(f) = file {
                                map.insert(key.into(), f.display().to_string().into());
                            }
                        }
                    }
                    println!("{line}");
                } else {
                    files.push(written);
                }
                if let Some(e) = &outcome.error {
                    failed = true;
                    let hint = if outcome.is_out_of_memory() {
                        match args.capacity {
                            Some(c) => format!(
                                " (the simulated device has {}; try a larger --capacity)",
                                format_size(c)
                            ),
                            None => " (try a larger --capacity)".to_string(),
                        }
                    } else {
                        String::new()
                    };
                    progress.suspend(|| eprintln!("error: [{}] {e}{hint}", cut(&named.label)));
                }
                rows.push((named, outcome));
            }
            progress.clear();
            if !args.json {
                if shown > 0 {
                    println!();
                }
                shown += 1;
                if let Some(t) = &target {
                    println!("backend: {} (real device memory)", t.device);
                }
                print_heading(input, &rows);
                print_table(input, &rows);
                files.iter().for_each(outputs::Written::announce);
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn parse_configs(confs: &[String]) -> Result<Vec<ConfigChoice>, CliError> {
    if confs.is_empty() {
        return Ok(vec![ConfigChoice::Given(Box::new(NamedConfig {
            label: "default".into(),
            config: AllocatorConfig::default(),
        }))]);
    }
    confs
        .iter()
        .map(|conf| {
            let conf = conf.trim();
            if conf == RECORDED {
                return Ok(ConfigChoice::Recorded);
            }
            if !conf.is_empty() && conf.chars().all(|c| c == ',' || c.is_whitespace()) {
                return Err(CliError::Config(format!(
                    "--alloc-conf '{}' has only separators and no option: write key:value \
                     pairs (e.g. expandable_segments:false), or '' for the default",
                    cut(conf)
                )));
            }
            let config = AllocatorConfig::parse(conf).map_err(|e| {
                CliError::Config(format!(
                    "--alloc-conf '{}': {}",
                    cut(conf),
                    e.config_message()
                ))
            })?;
            let label = if conf.is_empty() {
                "default".to_string()
            } else {
                conf.to_string()
            };
            Ok(ConfigChoice::Given(Box::new(NamedConfig { label, config })))
        })
        .collect()
}

/// `text` cut to [`MAX_LABEL`] characters, with an ellipsis when cut.
fn cut(text: &str) -> String {
    if text.chars().count() <= MAX_LABEL {
        return text.to_string();
    }
    let mut out: String = text.chars().take(MAX_LABEL - 1).collect();
    out.push('…');
    out
}

/// The trace's line above the table: what it holds (as the replay read it), what it was
/// recorded from, and which device model the predictions come from.
fn print_heading(input: &ReplayInput, rows: &[(&NamedConfig, ReplayOutcome)]) {
    // The replay that read the most describes the trace.
    let Some(r) = rows.iter().map(|(_, o)| &o.report).max_by_key(|r| r.ops) else {
        return;
    };
    let partial = if r.completed { "" } else { " before the stop" };
    println!(
        "{}  ({}: {} events{partial}, {} allocations on {} stream{}, peak live {})",
        input.name,
        input.source,
        group(r.ops),
        group(r.allocations),
        r.streams,
        if r.streams == 1 { "" } else { "s" },
        format_size(r.peak_allocated_bytes),
    );
    let h = &input.header;
    if h.version >= 2 {
        let mut recorded = Vec::new();
        if let Some(w) = &h.workload {
            recorded.push(cut(w));
        }
        if let Some(a) = &h.allocator {
            recorded.push(format!("allocator {}", cut(a)));
        }
        if let Some(c) = &h.conf {
            recorded.push(format!("conf {}", cut(c)));
        }
        if let Some(d) = &h.recorded_on {
            recorded.push(format!("on {}", cut(d)));
        }
        if let Some(w) = &h.recorded_with {
            recorded.push(format!("with {}", cut(w)));
        }
        if !recorded.is_empty() {
            println!("  recorded: {}", recorded.join(", "));
        }
    }
    println!(
        "  predictions: device model = {} ({})",
        r.device_model,
        r.device_model_source.describe(r.device_model)
    );
}

fn ratio_text(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_string(), |r| format!("{r:.3}x"))
}

fn bytes_text(b: Option<u64>) -> String {
    b.map_or_else(|| "-".to_string(), format_size)
}

/// (predicted - real) / real for peak reserved, when the configuration is the recorded one.
fn prediction_error(
    input: &ReplayInput,
    named: &NamedConfig,
    outcome: &ReplayOutcome,
) -> Option<f64> {
    let real = input.header.real_peak_reserved?;
    (real > 0 && outcome.report.completed && input.header.is_recorded_config(&named.config))
        .then(|| (outcome.report.peak_reserved_bytes as f64 - real as f64) / real as f64)
}

fn print_table(input: &ReplayInput, rows: &[(&NamedConfig, ReplayOutcome)]) {
    let torch_label = input.torch.as_ref().map(|t| {
        format!(
            "PyTorch ({}, recorded)",
            cut(t.conf.as_deref().unwrap_or("unknown conf"))
        )
    });
    let h = &input.header;
    let real = (h.real_peak_reserved.is_some() || h.real_peak_allocated.is_some()).then(|| {
        format!(
            "real run ({})",
            cut(h
                .allocator
                .as_deref()
                .or(h.conf.as_deref())
                .unwrap_or("recorded"))
        )
    });
    let labels: Vec<String> = rows.iter().map(|(n, _)| cut(&n.label)).collect();
    let width = labels
        .iter()
        .chain(&torch_label)
        .chain(&real)
        .map(|l| l.chars().count())
        .chain(std::iter::once("config".len()))
        .max()
        .unwrap_or(6);
    println!(
        "  {:<width$}  {:>13}  {:>14}  {:>13}  {:>7}  {:>13}  {:>12}  {:>4}  {:>8}",
        "config",
        "events",
        "peak allocated",
        "peak reserved",
        "ratio",
        "device allocs",
        "driver calls",
        "OOMs",
        "ns/call"
    );
    for (label, (_, outcome)) in labels.iter().zip(rows) {
        let r = &outcome.report;
        let events = if r.completed {
            group(r.ops)
        } else {
            format!("{} (stop)", group(r.ops))
        };
        // Every driver call (creations, maps, access grants, unmaps, releases, events): what
        // the configuration costs in time on a real device.
        let calls = r
            .driver_calls
            .as_ref()
            .and_then(|d| d["total"].as_u64())
            .map_or_else(|| "-".to_string(), group);
        println!(
            "  {:<width$}  {:>13}  {:>14}  {:>13}  {:>7}  {:>13}  {:>12}  {:>4}  {:>8.1}",
            label,
            events,
            format_size(r.peak_allocated_bytes),
            format_size(r.peak_reserved_bytes),
            ratio_text(r.ratio()),
            group(r.device_allocs),
            calls,
            r.ooms,
            r.ns_per_call,
        );
    }
    let recorded_rows = [
        (
            torch_label,
            input
                .torch
                .as_ref()
                .map(|t| (t.peak_allocated, t.peak_reserved, t.ratio())),
        ),
        (
            real,
            Some((h.real_peak_allocated, h.real_peak_reserved, h.real_ratio())),
        ),
    ];
    for (label, figures) in recorded_rows {
        if let (Some(label), Some((allocated, reserved, ratio))) = (label, figures) {
            println!(
                "  {:<width$}  {:>13}  {:>14}  {:>13}  {:>7}  {:>13}  {:>12}  {:>4}  {:>8}",
                label,
                "-",
                bytes_text(allocated),
                bytes_text(reserved),
                ratio_text(ratio),
                "-",
                "-",
                "-",
                "-",
            );
        }
    }
    for (label, (_, outcome)) in labels.iter().zip(rows) {
        if let Some(b) = &outcome.report.peak_breakdown {
            println!(
                "  at the peak ({}): {}",
                label.trim_end(),
                breakdown_text(b)
            );
        }
    }
    for (label, (named, outcome)) in labels.iter().zip(rows) {
        if let Some(e) = prediction_error(input, named, outcome) {
            println!(
                "  prediction error, peak reserved ({label} is the recorded configuration): {:+.2}%",
                e * 100.0
            );
        }
    }
    if h.real_peak_reserved.is_some() && !rows.iter().any(|(n, _)| h.is_recorded_config(&n.config))
    {
        match &h.conf {
            Some(c) if h.recorded_config().is_some() => println!(
                "  (no replayed configuration is the recorded one; add --alloc-conf '{}' to \
                 compare with the real run)",
                cut(c)
            ),
            Some(c) => println!(
                "  (the recorded conf '{}' is not a configuration this accelrt reads: no \
                 prediction error)",
                cut(c)
            ),
            None => println!("  (the trace does not say which configuration it ran under)"),
        }
    }
}

fn json_line(
    input: &ReplayInput,
    named: &NamedConfig,
    outcome: &ReplayOutcome,
    capacity: Option<u64>,
) -> serde_json::Value {
    let r = &outcome.report;
    let torch = input.torch.as_ref();
    let h = &input.header;
    let mut line = serde_json::json!({
        "trace": r.trace,
        "file": input.source,
        "input": input.kind.name(),
        "format_version": h.version,
        "config": named.label,
        "config_canonical": r.config,
        "device_model": r.device_model,
        "device_model_source": r.device_model_source,
        "ops": r.ops,
        "total_ops": r.total_ops,
        "completed": r.completed,
        "allocations": r.allocations,
        "streams": r.streams,
        "record_streams": r.record_streams,
        "markers": r.markers,
        "peak_allocated_bytes": r.peak_allocated_bytes,
        "peak_reserved_bytes": r.peak_reserved_bytes,
        "ratio": r.ratio(),
        "device_allocs": r.device_allocs,
        "ooms": r.ooms,
        "ns_per_call": r.ns_per_call,
        "seconds": r.seconds,
        "history": r.history,
        "capacity_bytes": capacity,
        "device_calls": r.device_calls,
        "driver_calls": r.driver_calls,
        "moves": moves_json(&r.counters),
        "peak_breakdown": r.peak_breakdown,
        "torch_peak_allocated_bytes": torch.and_then(|t| t.peak_allocated),
        "torch_peak_reserved_bytes": torch.and_then(|t| t.peak_reserved),
        "torch_ratio": torch.and_then(|t| t.ratio()),
        "torch_conf": torch.and_then(|t| t.conf.clone()),
        "recorded_allocator": h.allocator,
        "recorded_conf": h.conf,
        "recorded_conf_matches": h.is_recorded_config(&named.config),
        "real_peak_reserved_bytes": h.real_peak_reserved,
        "real_peak_allocated_bytes": h.real_peak_allocated,
        "real_ratio": h.real_ratio(),
        "prediction_error": prediction_error(input, named, outcome),
        "error": outcome.error.as_ref().map(|e| e.to_string()),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    // What the counts in `driver_calls` cost (the host backend's simulated calls: next to
    // nothing); outside the macro above, which is at its depth limit.
    line["vm_call_us"] = r.counters.vm_call_us.into();
    line
}

/// Where reserved memory was at its peak, in words: reserved = allocated + the parts that
/// are not zero, largest first.
pub(crate) fn breakdown_text(b: &PeakBreakdown) -> String {
    let mut parts = [
        (b.free_in_used_chunks, "free pages in partly used chunks"),
        (
            b.free_in_shared_pages,
            "free in pages shared with live blocks",
        ),
        (b.idle_chunks, "idle chunks"),
        (b.spare_chunks, "spare chunks"),
        (b.free_in_segments, "cached in segments"),
        (
            b.other,
            "other (frees waiting for other streams, allocations under way)",
        ),
    ];
    parts.sort_by_key(|&(bytes, _)| std::cmp::Reverse(bytes));
    let mut text = format!(
        "reserved {} = allocated {}",
        format_size(b.reserved),
        format_size(b.allocated)
    );
    for (bytes, what) in parts {
        if bytes > 0 {
            text.push_str(&format!(" + {} {what}", format_size(bytes)));
        }
    }
    text
}

/// `1234567` → `1,234,567`.
pub(crate) fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Parse a byte count: `1073741824`, `24GB` (10^9), `24GiB` (2^30), `512MiB`, `1.5TiB`,
/// `64K`/`64KiB` (2^10; a bare letter is binary). Case-insensitive; spaces and `_` allowed.
pub fn parse_capacity(text: &str) -> Result<u64, CliError> {
    let bad = |why: &str| {
        CliError::Argument(format!(
            "capacity '{text}' {why}: write bytes (e.g. 25769803776) or a number with a unit \
             (B, KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB or K, M, G, T = powers of 1024), \
             e.g. 24GiB or 512MiB"
        ))
    };
    let cleaned: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '_')
        .collect();
    let split = cleaned
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(cleaned.len());
    let (number, unit) = cleaned.split_at(split);
    if number.is_empty() {
        return Err(bad("has no number"));
    }
    let multiplier: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => return Err(bad(&format!("has an unknown unit '{unit}'"))),
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if fraction.contains('.') || (whole.is_empty() && fraction.is_empty()) {
        return Err(bad("is not a number"));
    }
    if fraction.len() > 9 {
        return Err(bad("has more than 9 decimals"));
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad("is too large"))?
    };
    let frac_digits: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| bad("is not a number"))?
    };
    let scale = 10u128.pow(fraction.len() as u32);
    let bytes = whole
        .checked_mul(multiplier)
        .and_then(|w| w.checked_add(frac_digits * multiplier / scale))
        .filter(|&b| b <= u64::MAX as u128)
        .ok_or_else(|| bad("does not fit in 64 bits"))?;
    if bytes == 0 {
        return Err(bad("is zero"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests;
