//! What `accelrt replay` reads besides v1 traces (PyTorch snapshots, accelrt JSON
//! snapshots) and what it writes besides the table (`--snapshot`, `--html`, `--profile`),
//! plus its progress bar.

use std::collections::HashSet;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use accelrt::alloc::{format_size, Frames};
use accelrt::profiler::{self, ProfilerTrace};
use accelrt::snapshot::{self, FileKind, HtmlOptions};
use accelrt::trace::{self, ReplayOptions, Trace};
use accelrt::{DeviceType, Error};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One replayable input: a trace file, or one device of a snapshot.
pub struct Input {
    /// The events.
    pub trace: Trace,
    /// Stack frames per event (snapshots that recorded them).
    pub frames: Option<Vec<Option<Frames>>>,
    /// What the file was, for headings: `trace`, `PyTorch snapshot`, `accelrt snapshot`.
    pub kind: &'static str,
}

/// The name of a snapshot file without its extensions: `dir/mlp_train.snapshot.pickle` →
/// `mlp_train`.
fn snapshot_name(path: &Path) -> String {
    let mut name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for suffix in [".gz", ".pickle", ".pkl", ".json", ".snapshot"] {
        if let Some(stripped) = name.strip_suffix(suffix) {
            if !stripped.is_empty() {
                name = stripped.to_string();
            }
        }
    }
    if name.is_empty() {
        "snapshot".into()
    } else {
        name
    }
}

/// Read `path` as a v1 trace, a PyTorch snapshot pickle or an accelrt JSON snapshot
/// (told apart by their first bytes; see [`snapshot::sniff`]).
pub fn load_inputs(path: &Path) -> Result<Vec<Input>, Error> {
    let shown = path.display().to_string();
    let mut prefix = [0u8; 64];
    let read = std::fs::File::open(path).and_then(|mut f| f.read(&mut prefix));
    let Ok(n) = read else {
        // The trace reader says what is wrong (missing file, a directory...) in its words.
        return trace::load(path).map(|trace| {
            vec![Input {
                trace,
                frames: None,
                kind: "trace",
            }]
        });
    };
    let kind = match snapshot::sniff(&prefix[..n]) {
        FileKind::Trace => {
            return Ok(vec![Input {
                trace: trace::load(path)?,
                frames: None,
                kind: "trace",
            }])
        }
        FileKind::Pickle => "PyTorch snapshot",
        FileKind::Json => "accelrt snapshot",
    };
    let snap = snapshot::load(path)?;
    Ok(snap
        .traces(&snapshot_name(path), &shown)?
        .into_iter()
        .map(|t| Input {
            trace: t.trace,
            frames: Some(t.frames),
            kind,
        })
        .collect())
}

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

    /// Replay `input` again with memory history on and write the requested files.
    pub fn write(
        &mut self,
        input: &Input,
        config_label: &str,
        opts: &ReplayOptions,
        backend: DeviceType,
        progress: &Progress,
    ) -> Result<Written, Error> {
        let recorded =
            snapshot::replay_recorded(&input.trace, input.frames.as_deref(), opts, &mut |done| {
                progress.set_inner(done)
            })?;
        progress.finish_inner(input.trace.ops.len() as u64);
        let mut written = Written::default();
        let trace = &input.trace;
        if let Some(base) = self.snapshot.clone() {
            let path = self.path_for(&base, &trace.name, config_label);
            recorded.snapshot.save(&path)?;
            written.snapshot = Some(path);
        }
        if let Some(base) = self.html.clone() {
            let path = self.path_for(&base, &trace.name, config_label);
            let mut subtitle = vec![
                format!("{} {}", input.kind, trace.source),
                format!("replayed through accelrt's allocator, config: {config_label}"),
            ];
            if let Some(c) = opts.capacity {
                subtitle.push(format!("simulated device of {}", format_size(c)));
            }
            if backend != DeviceType::Host {
                subtitle.push("history recorded on the simulated host device".into());
            }
            if let Some(e) = &recorded.error {
                subtitle.push(format!("stopped early: {e}"));
            }
            let html = snapshot::render_html(
                &recorded.snapshot,
                &HtmlOptions {
                    title: trace.name.clone(),
                    subtitle,
                    ..HtmlOptions::default()
                },
            )?;
            write_file(&path, html.as_bytes(), "HTML page")?;
            written.html = Some(path);
        }
        if let Some(base) = self.profile.clone() {
            let path = self.path_for(&base, &trace.name, config_label);
            let history = recorded
                .snapshot
                .device_traces
                .first()
                .cloned()
                .unwrap_or_default();
            let start = history.first().map_or(0, |e| e.time_us);
            let end = history.last().map_or(start, |e| e.time_us);
            let t = ProfilerTrace {
                device_type: DeviceType::Host,
                start_unix_us: start,
                duration_us: (end - start) as f64,
                events: profiler::history_events(0, &history, start),
                dropped: 0,
            };
            t.write_chrome_trace(&path)?;
            written.profile = Some(path);
        }
        Ok(written)
    }
}

fn write_file(path: &Path, bytes: &[u8], what: &str) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(|e| Error::Io {
        path: path.display().to_string(),
        message: format!("cannot write the {what}: {e}"),
    })
}

/// The progress bar: events replayed over the replays of one input. Hidden under `--json`
/// or when stderr is not a terminal.
pub struct Progress {
    bar: ProgressBar,
    base: std::cell::Cell<u64>,
}

impl Progress {
    /// A bar for `total` events of work labelled `label`.
    pub fn new(quiet: bool, total: u64, label: &str) -> Progress {
        let bar = if quiet || !std::io::stderr().is_terminal() {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:30}] {human_pos}/{human_len} events ({elapsed})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        };
        Progress {
            bar,
            base: std::cell::Cell::new(0),
        }
    }

    /// One replay of `events` events finished.
    pub fn advance(&self, events: u64) {
        self.base.set(self.base.get() + events);
        self.bar.set_position(self.base.get());
    }

    /// Within a replay, `done` events are finished.
    fn set_inner(&self, done: u64) {
        self.bar.set_position(self.base.get() + done);
    }

    fn finish_inner(&self, events: u64) {
        self.advance(events);
    }

    /// Set the label (e.g. the configuration being replayed).
    pub fn set_label(&self, label: &str) {
        self.bar.set_message(label.to_string());
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

    #[test]
    fn snapshot_names() {
        for (path, want) in [
            ("traces/mlp_train.snapshot.pickle", "mlp_train"),
            ("x.pkl", "x"),
            ("y.json", "y"),
            (".pickle", ".pickle"),
        ] {
            assert_eq!(snapshot_name(Path::new(path)), want);
        }
    }
}
