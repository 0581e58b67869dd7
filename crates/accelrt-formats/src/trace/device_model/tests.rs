use super::*;

use accelrt_alloc::stream::Stream;
use accelrt_alloc::StreamEvents;

use accelrt_alloc::device::{Device, DeviceType};

const DEV: Device = Device {
    kind: DeviceType::Host,
    index: 0,
};
fn s(index: u32) -> Stream {
    Stream { device: DEV, index }
}

#[test]
fn model_names_parse_and_print() {
    // (text, parsed, printed back)
    let cases = [
        ("auto", DeviceModel::Auto, "auto"),
        (" instant ", DeviceModel::Instant, "instant"),
        ("markers", DeviceModel::Markers, "markers"),
        (
            "lag:2000us",
            DeviceModel::Lag {
                us: Some(2000),
                events: None,
            },
            "lag:2000us",
        ),
        (
            "lag:2ms",
            DeviceModel::Lag {
                us: Some(2000),
                events: None,
            },
            "lag:2000us",
        ),
        (
            "lag:64ev, 1s",
            DeviceModel::Lag {
                us: Some(1_000_000),
                events: Some(64),
            },
            "lag:1000000us,64ev",
        ),
    ];
    for (text, want, printed) in cases {
        let got: DeviceModel = text.parse().unwrap();
        assert_eq!(got, want, "{text}");
        assert_eq!(got.to_string(), printed, "{text}");
    }
    for (text, why) in [
        ("fast", "is not a model"),
        ("lag:", "has no number"),
        ("lag:20", "unknown unit"),
        ("lag:5mins", "unknown unit"),
        ("lag:1us,2us", "same kind of lag twice"),
        ("lag:99999999999999s", "longer than 2^48"),
        ("lag:-5us", "has no number"),
    ] {
        let e = text.parse::<DeviceModel>().unwrap_err().to_string();
        assert!(
            e.contains(why) && e.contains("e.g. lag:2000us,64ev"),
            "{text}: {e}"
        );
    }
}

#[test]
fn models_resolve_per_trace() {
    use super::Markers as H;
    use ModelSource::*;
    use ResolvedModel::{Instant, LagEvents, LagUs};
    let lag_us = DeviceModel::Lag {
        us: Some(500),
        events: None,
    };
    // (asked, timed, markers header, resolved, source)
    let cases = [
        (
            DeviceModel::Auto,
            true,
            H::All,
            ResolvedModel::Markers,
            Trace,
        ),
        (
            DeviceModel::Auto,
            true,
            H::CrossStream,
            LagUs(DEFAULT_LAG_US),
            Default,
        ),
        (
            DeviceModel::Auto,
            true,
            H::Unstated,
            LagUs(DEFAULT_LAG_US),
            Default,
        ),
        (
            DeviceModel::Auto,
            false,
            H::Unstated,
            LagEvents(DEFAULT_LAG_EVENTS),
            Default,
        ),
        (DeviceModel::Instant, true, H::All, Instant, Asked),
        (
            DeviceModel::Markers,
            false,
            H::Unstated,
            ResolvedModel::Markers,
            Asked,
        ),
        (lag_us, true, H::All, LagUs(500), Asked),
        (
            lag_us,
            false,
            H::Unstated,
            LagEvents(DEFAULT_LAG_EVENTS),
            Default,
        ),
    ];
    for (asked, timed, markers, model, source) in cases {
        assert_eq!(
            asked.resolve(timed, markers),
            (model, source),
            "{asked} timed={timed} {markers:?}"
        );
    }
}

/// One step of a device-model scenario.
#[derive(Debug, Clone, Copy)]
enum Do {
    /// Clocks to (event, time).
    Now(u64, u64),
    /// Record on a stream; the ticket is named by its position in the scenario.
    Record(u32),
    /// A marker: the device passed event N on stream S.
    Pass(u32, u64),
    /// Query the ticket of step N: expected answer.
    Query(usize, bool),
    /// Synchronize the ticket of step N.
    Sync(usize),
    /// The whole device.
    SyncDevice,
    /// Stream S waits for the ticket of step N.
    Wait(u32, usize),
}

fn run(model: ResolvedModel, steps: &[Do]) {
    let d = SimulatedDevice::new(model);
    let mut tickets = vec![u64::MAX; steps.len()];
    for (i, step) in steps.iter().enumerate() {
        match *step {
            Do::Now(o, t) => d.set_now(o, t),
            Do::Record(st) => tickets[i] = d.record(s(st)).unwrap(),
            Do::Pass(st, o) => d.pass(st, o),
            Do::Query(n, want) => assert_eq!(
                d.query(tickets[n]).unwrap(),
                want,
                "{model}: step {i} {step:?} in {steps:?}"
            ),
            Do::Sync(n) => d.synchronize(tickets[n]).unwrap(),
            Do::SyncDevice => d.synchronize_device(0).unwrap(),
            Do::Wait(st, n) => d.wait(s(st), tickets[n]).unwrap(),
        }
    }
}

#[test]
fn tickets_complete_as_the_model_says() {
    use Do::*;
    use ResolvedModel::*;
    let cases: Vec<(ResolvedModel, Vec<Do>)> = vec![
        // Markers: a ticket completes once a marker passes its event on its stream.
        (
            Markers,
            vec![
                Now(3, 30),
                Record(0),
                Query(1, false),
                Pass(1, 9), // another stream
                Query(1, false),
                Pass(0, 2), // an earlier event
                Query(1, false),
                Pass(0, 3),
                Query(1, true),
            ],
        ),
        // Markers: time alone completes nothing.
        (
            Markers,
            vec![
                Now(1, 0),
                Record(0),
                Now(1_000_000, 1 << 40),
                Query(1, false),
            ],
        ),
        // Lag in microseconds: complete once the CPU is L past the record.
        (
            LagUs(100),
            vec![
                Now(1, 1000),
                Record(2),
                Now(50, 1099),
                Query(1, false),
                Now(51, 1100),
                Query(1, true),
            ],
        ),
        // Lag in events.
        (
            LagEvents(4),
            vec![
                Now(10, 0),
                Record(0),
                Now(13, 0),
                Query(1, false),
                Now(14, 0),
                Query(1, true),
            ],
        ),
        // Synchronizing one ticket passes its stream up to it, and earlier tickets.
        (
            Markers,
            vec![
                Now(1, 0),
                Record(0),
                Now(2, 0),
                Record(0),
                Record(1),
                Sync(3),
                Query(1, true),
                Query(3, true),
                Query(4, false),
            ],
        ),
        // A device-wide synchronize passes everything recorded so far, not what comes later.
        (
            Markers,
            vec![
                Now(5, 0),
                Record(0),
                Record(7),
                SyncDevice,
                Now(6, 0),
                Record(0),
                Query(1, true),
                Query(2, true),
                Query(5, false),
            ],
        ),
        // Waits: stream 1 waits for a ticket of stream 0; its later tickets complete only
        // once that one has, even when stream 1 itself has passed them.
        (
            Markers,
            vec![
                Now(1, 0),
                Record(0),
                Now(2, 0),
                Record(1), // before the wait: not held
                Now(3, 0),
                Wait(1, 1),
                Now(4, 0),
                Record(1), // after the wait
                Pass(1, 4),
                Query(3, true),
                Query(7, false),
                Pass(0, 1),
                Query(7, true),
            ],
        ),
        // Synchronizing a ticket that waits passes what it waits on too.
        (
            Markers,
            vec![
                Now(1, 0),
                Record(0),
                Wait(1, 1),
                Now(2, 0),
                Record(1),
                Sync(4),
                Query(1, true),
                Query(4, true),
            ],
        ),
        // A wait on a completed ticket holds nothing.
        (
            LagEvents(1),
            vec![
                Now(1, 0),
                Record(0),
                Now(5, 0),
                Wait(1, 1),
                Record(1),
                Now(6, 0),
                Query(4, true),
            ],
        ),
    ];
    for (model, steps) in cases {
        run(model, &steps);
    }
}

#[test]
fn released_tickets_are_reused_and_refused() {
    let d = SimulatedDevice::new(ResolvedModel::Markers);
    let a = d.record(s(0)).unwrap();
    d.release(a);
    let e = d.query(a).unwrap_err().to_string();
    assert!(e.contains("not recorded"), "{e}");
    assert_eq!(d.record(s(0)).unwrap(), a, "the slot is reused");
    d.release(12345); // unknown: ignored
    let c = d.calls();
    assert_eq!((c.records, c.queries_done, c.queries_pending), (2, 0, 0));
}
