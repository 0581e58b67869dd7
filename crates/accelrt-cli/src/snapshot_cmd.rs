//! `accelrt snapshot`: draw or convert a memory snapshot (a PyTorch
//! `torch.cuda.memory._dump_snapshot()` pickle, or accelrt's JSON).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::error::CliError;
use accelrt::alloc::format_size;
use accelrt::snapshot::{self, HtmlOptions, Snapshot};
use accelrt::FormatError;

/// Arguments of `accelrt snapshot`.
#[derive(clap::Args, Debug, Clone)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

/// The `accelrt snapshot` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum SnapshotCommand {
    /// Draw a snapshot as one self-contained HTML page: memory over time (allocated vs
    /// reserved, largest allocations stacked, peaks marked) and the segment map at the peak.
    Render {
        /// A PyTorch snapshot pickle or an accelrt JSON snapshot.
        #[arg(value_name = "SNAPSHOT")]
        snapshot: PathBuf,
        /// Where to write the page.
        #[arg(short, long, value_name = "OUT.html")]
        output: PathBuf,
        /// Device to draw (default: the first one with history or segments).
        #[arg(long, value_name = "N")]
        device: Option<u32>,
    },
    /// Convert between a PyTorch pickle and accelrt's JSON (by OUT's extension: `.json` is
    /// JSON, anything else a pickle).
    Convert {
        /// A PyTorch snapshot pickle or an accelrt JSON snapshot.
        #[arg(value_name = "SNAPSHOT")]
        snapshot: PathBuf,
        /// Where to write the converted snapshot.
        #[arg(value_name = "OUT")]
        output: PathBuf,
    },
}

/// Run `accelrt snapshot`.
pub fn run(args: SnapshotArgs) -> Result<ExitCode, CliError> {
    match args.command {
        SnapshotCommand::Render {
            snapshot: input,
            output,
            device,
        } => {
            let snap = snapshot::load(&input)?;
            let html = snapshot::render_html(
                &snap,
                &HtmlOptions {
                    title: input.file_name().map_or_else(
                        || input.display().to_string(),
                        |n| n.to_string_lossy().into_owned(),
                    ),
                    subtitle: describe(&input, &snap),
                    device,
                    ..HtmlOptions::default()
                },
            )?;
            std::fs::write(&output, html).map_err(|e| {
                FormatError::io(
                    output.display().to_string(),
                    format!("cannot write the HTML page: {e}"),
                    e,
                )
            })?;
            eprintln!("wrote {} ({})", output.display(), file_size(&output));
        }
        SnapshotCommand::Convert {
            snapshot: input,
            output,
        } => {
            let snap = snapshot::load(&input)?;
            snap.save(&output)?;
            eprintln!("wrote {} ({})", output.display(), file_size(&output));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn file_size(path: &std::path::Path) -> String {
    format_size(std::fs::metadata(path).map_or(0, |m| m.len()))
}

fn describe(path: &std::path::Path, snap: &Snapshot) -> Vec<String> {
    let entries: usize = snap.device_traces.iter().map(Vec::len).sum();
    let mut lines = vec![format!(
        "{}: {} segment(s), {entries} history entries",
        path.display(),
        snap.segments.len()
    )];
    match snap
        .allocator_settings
        .get("PYTORCH_CUDA_ALLOC_CONF")
        .and_then(|v| v.as_str())
    {
        Some("") => lines.push("allocator config: native (default)".into()),
        Some(c) => lines.push(format!("allocator config: {c}")),
        None => {}
    }
    lines
}
