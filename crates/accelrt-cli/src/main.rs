//! `accelrt`: device info, allocator trace replay and conversion, and benchmarks.

mod bench;
mod bench_events;
mod error;
mod info;
mod outputs;
mod replay;
mod snapshot_cmd;
mod trace_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "accelrt",
    version,
    about = "accelrt: accelerator runtime tools — device info, allocator trace replay, benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every backend (available or not, with the reason), its devices and configuration.
    Info(info::InfoArgs),
    /// Replay allocator traces through accelrt's caching allocator.
    Replay(replay::ReplayArgs),
    /// Measure the allocator and event fast paths.
    Bench(bench::BenchArgs),
    /// Draw or convert a memory snapshot (PyTorch pickle or accelrt JSON).
    Snapshot(snapshot_cmd::SnapshotArgs),
    /// Write memory snapshots out as v2 allocator traces.
    Trace(trace_cmd::TraceArgs),
}

fn main() -> std::process::ExitCode {
    // Before parsing: `--backend NAME` resolves registered names.
    info::register_backends();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Replay(a) => replay::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Snapshot(a) => snapshot_cmd::run(a),
        Command::Trace(a) => trace_cmd::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
