//! The device model: when, during a replay, the work queued on a stream has completed.
//!
//! A replay runs the production allocator; only "completed" is simulated. The replay hands
//! the allocator a [`SimulatedDevice`] as its [`StreamEvents`](accelrt_alloc::StreamEvents), and moves the device's clocks
//! before every call:
//!
//! - the **event clock** counts the trace's `a`, `f` and `u` events (1, 2, 3, ...): an event
//!   recorded during the call for event `r` marks the point in the stream after all work the
//!   program queued before event `r`'s call returned;
//! - the **CPU clock** is the event's time in microseconds (v2 traces; 0 without times).
//!
//! A ticket recorded on stream `s` at event `r` (time `t_r`) has completed when any of these
//! holds, and every stream it waits on (below) has passed its point too:
//!
//! - **markers**: a completion marker came due (the CPU clock reached its time) for a free at
//!   event `f >= r` whose allocation lived on `s` or was used on `s` (`u`): the recorded run's
//!   device had passed that free on every such stream. Markers count in every model but
//!   `instant`: they are what the recorded device really did;
//! - **lag** (`lag:Lus`): `t_r + L <= now`: the device runs `L` microseconds behind the CPU;
//! - **lag** (`lag:Kev`): `r + K <= now`: the device runs `K` events behind the CPU;
//! - **synchronize**: the allocator waited for this ticket, or a later one on `s`
//!   (`synchronize`), or for the whole device at event `>= r` (`synchronize_device`). The
//!   trace's CPU times do not move: the recorded run's own waits are already in them.
//!
//! `wait(s, t)` (stream `s` waits on the device for ticket `t`): tickets recorded on `s`
//! from then on complete only once `t` has. Per pair of streams only one wait is kept: a
//! later wait merges into the one still open (the later point, from the earlier event), so
//! the model may complete work later than a device would, never earlier.
//!
//! Models ([`DeviceModel`], `--device-model`): `instant` (no simulated device at all: the
//! allocator gets no event source and every fence completes at once, as replays did before
//! the device model), `markers`, `lag:Lus`, `lag:Kev`, and `auto` (the default): markers for
//! a timed trace whose header says `markers=all`, `lag:`[`DEFAULT_LAG_US`]`us` for other
//! timed traces, `lag:`[`DEFAULT_LAG_EVENTS`]`ev` for traces without times.

mod simulated;
#[cfg(test)]
mod tests;

pub use simulated::{ModelCalls, SimulatedDevice};

use std::fmt;
use std::str::FromStr;

use super::{Markers, MAX_STREAM};
use crate::error::{FormatError, Result};

/// Default lag of the device behind the CPU for timed traces without markers, in
/// microseconds. Calibrated on real runs (H200, 2026-11-29, `BENCHMARKS.md`): replaying
/// accelrt's own recordings of GPT-2 and ResNet-50 training with 250/500/1000/2000/5000 us,
/// 500 us gave the smallest errors against the runs' real peaks (-0.15%, -0.45%); on the
/// workloads held out (GPT-2 dynamic-shape inference, Llama and ViT dynamic training) it is
/// within 1% (-0.85%, +0.30%, +0.18%).
pub const DEFAULT_LAG_US: u64 = 500;

/// Default lag of the device behind the CPU for traces without times, in trace events.
/// Calibrated like [`DEFAULT_LAG_US`], against the real runs of the v1 traces' workloads:
/// 16 events (+0.06% GPT-2 training, -0.18% ResNet-50; held out, GPT-2 dynamic-shape
/// inference -0.12%), where 64 gave +2.0% on the held-out one.
pub const DEFAULT_LAG_EVENTS: u64 = 16;

/// Which device model a replay asks for (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceModel {
    /// Markers for traces that mark every free, else the default lag.
    #[default]
    Auto,
    /// Every fence completes at once: the allocator gets no event source.
    Instant,
    /// Completion markers only (and the allocator's own synchronizations).
    Markers,
    /// The device runs behind the CPU: by `us` microseconds on timed traces, by `events`
    /// events on untimed ones (`None`: the default for that kind).
    Lag {
        /// Lag on timed traces.
        us: Option<u64>,
        /// Lag on untimed traces.
        events: Option<u64>,
    },
}

/// The model a replay ran under, once [`DeviceModel`] met the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedModel {
    /// No simulated device.
    Instant,
    /// Markers and synchronizations.
    Markers,
    /// `lag:Nus`.
    LagUs(u64),
    /// `lag:Nev`.
    LagEvents(u64),
}

/// Why a replay ran under its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    /// `--device-model` (or [`super::ReplayOptions::device_model`]) named it.
    Asked,
    /// The trace's header says every free carries a marker.
    Trace,
    /// The default for this kind of trace.
    Default,
}

impl fmt::Display for ResolvedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolvedModel::Instant => write!(f, "instant"),
            ResolvedModel::Markers => write!(f, "markers"),
            ResolvedModel::LagUs(us) => write!(f, "lag:{us}us"),
            ResolvedModel::LagEvents(k) => write!(f, "lag:{k}ev"),
        }
    }
}

impl serde::Serialize for ResolvedModel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for DeviceModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceModel::Auto => write!(f, "auto"),
            DeviceModel::Instant => write!(f, "instant"),
            DeviceModel::Markers => write!(f, "markers"),
            DeviceModel::Lag { us, events } => {
                let parts: Vec<String> = us
                    .map(|u| format!("{u}us"))
                    .into_iter()
                    .chain(events.map(|k| format!("{k}ev")))
                    .collect();
                write!(f, "lag:{}", parts.join(","))
            }
        }
    }
}

impl FromStr for DeviceModel {
    type Err = FormatError;

    /// `auto`, `instant`, `markers`, `lag:2000us`, `lag:2ms`, `lag:64ev`, `lag:2000us,64ev`.
    fn from_str(text: &str) -> Result<DeviceModel> {
        let bad = |why: String| {
            FormatError::InvalidArgument(format!(
                "device model '{}' {why}: write auto, instant, markers, or lag: with a time \
                 (lag:2000us, lag:2ms) and/or an event count (lag:64ev), e.g. lag:2000us,64ev",
                super::shown(text)
            ))
        };
        let t = text.trim();
        match t {
            "auto" => return Ok(DeviceModel::Auto),
            "instant" => return Ok(DeviceModel::Instant),
            "markers" => return Ok(DeviceModel::Markers),
            _ => {}
        }
        let Some(spec) = t.strip_prefix("lag:") else {
            return Err(bad("is not a model".into()));
        };
        let (mut us, mut events) = (None, None);
        for part in spec.split(',').map(str::trim) {
            let digits = part.bytes().take_while(u8::is_ascii_digit).count();
            let (number, unit) = part.split_at(digits);
            let n: u64 = number
                .parse()
                .map_err(|_| bad(format!("has no number in '{}'", super::shown(part))))?;
            let (slot, scale) = match unit {
                "us" => (&mut us, 1),
                "ms" => (&mut us, 1_000),
                "s" => (&mut us, 1_000_000),
                "ev" | "events" => (&mut events, 1),
                other => {
                    return Err(bad(format!(
                        "has an unknown unit '{}' (us, ms, s or ev)",
                        super::shown(other)
                    )))
                }
            };
            if slot.is_some() {
                return Err(bad("gives the same kind of lag twice".into()));
            }
            let value = n
                .checked_mul(scale)
                .filter(|&v| v <= super::MAX_TIME_US)
                .ok_or_else(|| bad("is longer than 2^48 us".into()))?;
            *slot = Some(value);
        }
        Ok(DeviceModel::Lag { us, events })
    }
}

impl DeviceModel {
    /// The model for a trace: `timed` (v2) or not, and which frees its header says carry
    /// markers.
    pub fn resolve(self, timed: bool, markers: Markers) -> (ResolvedModel, ModelSource) {
        match self {
            DeviceModel::Instant => (ResolvedModel::Instant, ModelSource::Asked),
            DeviceModel::Markers => (ResolvedModel::Markers, ModelSource::Asked),
            DeviceModel::Lag { us, events } => match (timed, us, events) {
                (true, Some(l), _) => (ResolvedModel::LagUs(l), ModelSource::Asked),
                (true, None, _) => (ResolvedModel::LagUs(DEFAULT_LAG_US), ModelSource::Default),
                (false, _, Some(k)) => (ResolvedModel::LagEvents(k), ModelSource::Asked),
                (false, _, None) => (
                    ResolvedModel::LagEvents(DEFAULT_LAG_EVENTS),
                    ModelSource::Default,
                ),
            },
            DeviceModel::Auto if timed && markers == Markers::All => {
                (ResolvedModel::Markers, ModelSource::Trace)
            }
            DeviceModel::Auto if timed => {
                (ResolvedModel::LagUs(DEFAULT_LAG_US), ModelSource::Default)
            }
            DeviceModel::Auto => (
                ResolvedModel::LagEvents(DEFAULT_LAG_EVENTS),
                ModelSource::Default,
            ),
        }
    }
}

impl ModelSource {
    /// How the replay table says it: `from the trace`, `asked for`, ...
    pub fn describe(self, model: ResolvedModel) -> &'static str {
        match (self, model) {
            (ModelSource::Asked, _) => "asked for",
            (ModelSource::Trace, _) => "from the trace",
            (ModelSource::Default, ResolvedModel::LagEvents(_)) => {
                "default for traces without times"
            }
            (ModelSource::Default, _) => "default for timed traces without markers",
        }
    }
}
