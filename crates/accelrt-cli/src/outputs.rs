//! What `accelrt replay` writes besides the table (`--snapshot`, `--html`, `--profile`, all
//! from the snapshot of the replay itself, with history on), and its progress bar.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::CliError;
use accelrt::alloc::format_size;
use accelrt::profiler::{self, ProfilerTrace};
use accelrt::snapshot::{self, HtmlOptions, Snapshot};
use accelrt::trace::{ReplayInput, ReplayOptions, ReplayOutcome};
use accelrt::DeviceType;
use accelrt::FormatError;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where `--snapshot`, `--html` and `--profile` go.
pub struct Outputs {
    snapshot: Option<PathBuf>,
    html: Option<PathBuf>,
    profile: Option<PathBuf>,
    several_inputs: bool,
    several_configs: bool,
    written: HashSet<PathBuf>,
}

/// What [`Outputs::write`] wrote.
#[derive(Default)]
pub struct Written {
    pub snapshot: Option<PathBuf>,
    pub html: Option<PathBuf>,
    pub profile: Option<PathBuf>,
}

impl Written {
    /// Print `wrote WHAT PATH (SIZE)` for each file.
    pub fn announce(&self) {
        for (what, file) in [
            ("snapshot", &self.snapshot),
            ("HTML page", &self.html),
            ("profile", &self.profile),
        ] {
            if let Some(path) = file {
                let size = std::fs::metadata(path).map_or(0, |m| m.len());
                println!("  wrote {what} {} ({})", path.display(), format_size(size));
            }
        }
    }
}

/// A file-name-safe form of a configuration label: `max_split_size_mb:128` →
/// `max_split_size_mb-128`.
fn slug(label: &str) -> String {
    let mut out = String::new();
    for c in label.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-').to_string();
    if out.is_empty() {
        "default".into()
    } else {
        out
    }
}

impl Outputs {
    /// `several_inputs`: more than one trace will be replayed (several files, or a snapshot
    /// of several devices); `several_configs`: more than one `--alloc-conf`. Then each output
    /// name gets the trace and/or configuration as a suffix.
    pub fn new(
        snapshot: Option<PathBuf>,
        html: Option<PathBuf>,
        profile: Option<PathBuf>,
        several_inputs: bool,
        several_configs: bool,
    ) -> Outputs {
        Outputs {
            snapshot,
            html,
            profile,
            several_inputs,
            several_configs,
            written: HashSet::new(),
        }
    }

    /// Whether any output was asked for.
    pub fn any(&self) -> bool {
        self.snapshot.is_some() || self.html.is_some() || self.profile.is_some()
    }

    /// Note that more traces than first thought will be replayed (a snapshot of several
    /// devices).
    pub fn set_several_inputs(&mut self) {
        self.several_inputs = true;
    }

    /// `base` with `.TRACE` and/or `.CONFIG` inserted before the extension when needed,
    /// and `-2`, `-3`... if that name was already written in this run.
    fn path_for(&mut self, base: &Path, trace: &str, config: &str) -> PathBuf {
        let stem = base
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let ext = base
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        let mut name = stem;
        if self.several_inputs {
            name.push('.');
            name.push_str(&slug(trace));
        }
        if self.several_configs {
            name.push('.');
            name.push_str(&slug(config));
        }
        let mut path = base.with_file_name(format!("{name}{ext}"));
        let mut k = 2;
        while self.written.contains(&path) {
            path = base.with_file_name(format!("{name}-{k}{ext}"));
            k += 1;
        }
        self.written.insert(path.clone());
        path
    }

    /// Write the requested files from the snapshot of `outcome`'s replay of `input`.
    pub fn write(
        &mut self,
        input: &ReplayInput,
        snapshot: &Snapshot,
        config_label: &str,
        opts: &ReplayOptions,
        outcome: &ReplayOutcome,
    ) -> Result<Written, CliError> {
        let mut written = Written::default();
        if let Some(base) = self.snapshot.clone() {
            let path = self.path_for(&base, &input.name, config_label);
            snapshot.save(&path)?;
            written.snapshot = Some(path);
        }
        if let Some(base) = self.html.clone() {
            let path = self.path_for(&base, &input.name, config_label);
            let mut subtitle = vec![
                format!("{} {}", input.kind.name(), input.source),
                format!(
                    "replayed through accelrt's allocator, config: {config_label}, device model: \
                     {}",
                    outcome.report.device_model
                ),
            ];
            match &opts.target {
                Some(t) => subtitle.push(format!("on {} (real device memory)", t.device)),
                None => {
                    if let Some(c) = opts.capacity {
                        subtitle.push(format!("simulated device of {}", format_size(c)));
                    }
                }
            }
            if let Some(e) = &outcome.error {
                subtitle.push(format!("stopped early: {e}"));
            }
            let html = snapshot::render_html(
                snapshot,
                &HtmlOptions {
                    title: input.name.clone(),
                    subtitle,
                    ..HtmlOptions::default()
                },
            )?;
            write_file(&path, html.as_bytes(), "HTML page")?;
            written.html = Some(path);
        }
        if let Some(base) = self.profile.clone() {
            let path = self.path_for(&base, &input.name, config_label);
            let device = opts.target.as_ref().map_or(0, |t| t.device.index);
            let history = snapshot
                .device_traces
                .get(device as usize)
                .cloned()
                .unwrap_or_default();
            let start = history.first().map_or(0, |e| e.time_us);
            let end = history.last().map_or(start, |e| e.time_us);
            let t = ProfilerTrace {
                device_type: opts
                    .target
                    .as_ref()
                    .map_or(DeviceType::Host, |t| t.device.kind),
                start_unix_us: start,
                duration_us: end.saturating_sub(start) as f64,
                events: profiler::history_events(device, &history, start),
                dropped: 0,
            };
            t.write_chrome_trace(&path)?;
            written.profile = Some(path);
        }
        Ok(written)
    }
}

fn write_file(path: &Path, bytes: &[u8], what: &str) -> Result<(), CliError> {
    Ok(std::fs::write(path, bytes).map_err(|e| {
        FormatError::io(
            path.display().to_string(),
            format!("cannot write the {what}: {e}"),
            e,
        )
    })?)
}

/// The progress bar over the replays of one input (one per configuration): by bytes of the
/// file for streamed traces, by events for inputs in memory. Hidden under `--json` or when
/// stderr is not a terminal.
pub struct Progress {
    bar: ProgressBar,
    /// Units of one replay (bytes or events; 0 when unknown).
    per_replay: u64,
    by_bytes: bool,
    replay: std::cell::Cell<u64>,
}

impl Progress {
    /// A bar for `replays` replays of `input`.
    pub fn new(quiet: bool, input: &ReplayInput, replays: usize) -> Progress {
        let (per_replay, by_bytes) = match (input.input_len(), input.event_count()) {
            (Some(bytes), _) => (bytes, true),
            (None, Some(events)) => (events, false),
            (None, None) => (0, false),
        };
        let bar = if quiet || !std::io::stderr().is_terminal() {
            ProgressBar::hidden()
        } else {
            let total = per_replay.max(1) * replays as u64;
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {percent}% ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        };
        Progress {
            bar,
            per_replay,
            by_bytes,
            replay: std::cell::Cell::new(0),
        }
    }

    /// Replay `k` (0-based) starts, labelled `label`.
    pub fn start(&self, k: usize, label: &str) {
        self.replay.set(k as u64);
        self.bar.set_message(label.to_string());
        self.bar.set_position(k as u64 * self.per_replay);
    }

    /// Within the current replay, this far.
    pub fn update(&self, p: &accelrt::trace::Progress) {
        let done = if self.by_bytes {
            p.input_bytes
        } else {
            p.events
        };
        self.bar
            .set_position(self.replay.get() * self.per_replay + done.min(self.per_replay));
    }

    /// Run `f` (which prints) with the bar hidden.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// Remove the bar.
    pub fn clear(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names() {
        // (several inputs, several configs, base, trace, config, expected)
        let cases = [
            (
                false,
                false,
                "out/r.html",
                "resnet",
                "default",
                "out/r.html",
            ),
            (
                false,
                true,
                "r.html",
                "resnet",
                "max_split_size_mb:128",
                "r.max_split_size_mb-128.html",
            ),
            (
                true,
                false,
                "r.pickle",
                "gpt2_train",
                "default",
                "r.gpt2_train.pickle",
            ),
            (
                true,
                true,
                "r.json",
                "mlp:dev1",
                "",
                "r.mlp-dev1.default.json",
            ),
            (
                false,
                true,
                "noext",
                "t",
                "expandable_segments:true",
                "noext.expandable_segments-true",
            ),
        ];
        for (inputs, configs, base, trace, config, want) in cases {
            let mut o = Outputs::new(None, None, None, inputs, configs);
            assert_eq!(
                o.path_for(Path::new(base), trace, config),
                PathBuf::from(want)
            );
        }
        let mut o = Outputs::new(None, None, None, false, false);
        assert_eq!(
            o.path_for(Path::new("a.html"), "t", "c"),
            PathBuf::from("a.html")
        );
        assert_eq!(
            o.path_for(Path::new("a.html"), "t", "c"),
            PathBuf::from("a-2.html")
        );
    }
}
