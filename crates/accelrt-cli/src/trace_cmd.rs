//! `accelrt trace`: write memory snapshots out as v2 traces.

use std::path::PathBuf;
use std::process::ExitCode;

use accelrt::alloc::{format_size, AllocatorConfig};
use accelrt::trace::Trace;

use crate::error::CliError;
use crate::replay::{group, parse_capacity};
use accelrt::FormatError;

/// Arguments of `accelrt trace`.
#[derive(clap::Args, Debug, Clone)]
pub struct TraceArgs {
    #[command(subcommand)]
    pub command: TraceCommand,
}

/// The `accelrt trace` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum TraceCommand {
    /// Convert a memory snapshot (a PyTorch `torch.cuda.memory._dump_snapshot()` pickle, or
    /// accelrt's JSON snapshot) to a v2 trace: `alloc` -> `a`, `free_requested` -> `f`, a
    /// later `free_completed` -> `c` (a completion marker), times relative to the first
    /// entry, streams numbered in order of appearance (0 = the default stream).
    Convert(ConvertArgs),
}

/// Arguments of `accelrt trace convert`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConvertArgs {
    /// The snapshot.
    #[arg(value_name = "SNAPSHOT")]
    pub snapshot: PathBuf,
    /// Where to write the trace (gzip-compressed when the name ends in `.gz`).
    #[arg(value_name = "OUT.trace[.gz]")]
    pub output: PathBuf,
    /// Device of the snapshot to convert (default: the only one with allocations).
    #[arg(long, value_name = "N")]
    pub device: Option<u32>,
    /// Header `workload`: what ran.
    #[arg(long, value_name = "TEXT")]
    pub workload: Option<String>,
    /// Header `allocator` (default: from the snapshot's settings: `accelrt`,
    /// `pytorch-native`, `pytorch-expandable`).
    #[arg(long, value_name = "NAME")]
    pub allocator: Option<String>,
    /// Header `conf`: the accelrt configuration the recorded allocator corresponds to
    /// (default: derived from the snapshot's PYTORCH_CUDA_ALLOC_CONF, e.g.
    /// `expandable_segments:false,release_at_peak:false` for PyTorch's native allocator).
    #[arg(long, value_name = "STR")]
    pub conf: Option<String>,
    /// Header `real_peak_reserved`: the recorded run's torch.cuda.max_memory_reserved()
    /// (bytes, or with a unit).
    #[arg(long, value_name = "BYTES", value_parser = parse_capacity)]
    pub real_peak_reserved: Option<u64>,
    /// Header `real_peak_allocated`: the recorded run's torch.cuda.max_memory_allocated().
    #[arg(long, value_name = "BYTES", value_parser = parse_capacity)]
    pub real_peak_allocated: Option<u64>,
    /// Header `recorded_on`: the device's name (e.g. `NVIDIA H200`).
    #[arg(long, value_name = "TEXT")]
    pub recorded_on: Option<String>,
    /// Header `recorded_with`: e.g. `PyTorch 2.11.0+cu130`.
    #[arg(long, value_name = "TEXT")]
    pub recorded_with: Option<String>,
}

/// Run `accelrt trace`.
pub fn run(args: TraceArgs) -> Result<ExitCode, CliError> {
    match args.command {
        TraceCommand::Convert(a) => convert(a),
    }
}

fn convert(a: ConvertArgs) -> Result<ExitCode, CliError> {
    let shown = a.snapshot.display().to_string();
    let inputs = accelrt::trace::open(&a.snapshot)?;
    if inputs
        .iter()
        .any(|i| i.kind == accelrt::trace::InputKind::Trace)
    {
        return Err(CliError::Argument(format!(
            "{shown} is already a trace: `trace convert` reads memory snapshots (a PyTorch \
             pickle or accelrt's JSON)"
        )));
    }
    let devices: Vec<u32> = inputs.iter().filter_map(|i| i.device).collect();
    let pick = match a.device {
        Some(d) => inputs.iter().find(|i| i.device == Some(d)),
        None if inputs.len() == 1 => inputs.first(),
        None => {
            return Err(CliError::Argument(format!(
                "{shown} has allocations on devices {devices:?}: pick one with --device N"
            )))
        }
    };
    let Some(input) = pick else {
        return Err(CliError::Argument(format!(
            "{shown} has no allocations on device {}; devices with allocations: {devices:?}",
            a.device.unwrap_or_default()
        )));
    };
    let (Some(trace), Some(device)) = (input.trace(), input.device) else {
        return Err(CliError::Argument(format!(
            "{shown}: a snapshot input without its trace"
        )));
    };
    if !trace.is_timed() {
        return Err(FormatError::Snapshot {
            file: shown,
            at: format!("device_traces[{device}]"),
            message: "the entries carry no time_us, and a v2 trace needs the time of every \
                      call: record the snapshot with a PyTorch that writes time_us (2.1 or newer)"
                .into(),
        }
        .into());
    }
    if let Some(c) = &a.conf {
        AllocatorConfig::parse(c).map_err(|e| {
            CliError::Config(format!(
                "--conf '{c}' is not an accelrt configuration: {e}; it names the accelrt \
                 configuration the recorded allocator corresponds to"
            ))
        })?;
    }
    let mut trace: Trace = trace.clone();
    let h = &mut trace.header;
    h.workload = a.workload.or(h.workload.take());
    h.allocator = a.allocator.or(h.allocator.take());
    h.conf = a.conf.or(h.conf.take());
    h.recorded_on = a.recorded_on;
    h.recorded_with = a.recorded_with;
    h.real_peak_reserved = a.real_peak_reserved;
    h.real_peak_allocated = a.real_peak_allocated;
    h.other.push(("source".into(), shown));
    trace.save(&a.output)?;
    let size = std::fs::metadata(&a.output).map_or(0, |m| m.len());
    let markers = trace
        .ops
        .iter()
        .filter(|op| matches!(op, accelrt::trace::TraceOp::Complete { .. }))
        .count();
    println!(
        "wrote {} ({}): {} events ({} completion markers) of device {device}, allocator {}, \
         conf {}{}",
        a.output.display(),
        format_size(size),
        group(trace.ops.len() as u64),
        group(markers as u64),
        trace.header.allocator.as_deref().unwrap_or("unknown"),
        trace
            .header
            .conf
            .as_deref()
            .unwrap_or("unknown (set it with --conf)"),
        if trace.header.real_peak_reserved.is_none() {
            "; no real peaks (pass --real-peak-reserved and --real-peak-allocated)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}
