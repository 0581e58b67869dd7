//! Version-2 traces: hostile input, headers read into fields, round trips.

use super::*;

const V2: &str = "#accelrt-trace v2\n";

#[test]
fn v2_hostile_inputs_name_line_and_problem() {
    let many_keys: String = (0..=trace::MAX_HEADER_KEYS)
        .map(|i| format!("#! k{i}=v\n"))
        .collect();
    // (input, line of the error, what the message says)
    let cases: Vec<(String, u64, &str)> = vec![
        (
            "#accelrt-trace v3\na 0 1 0\n".into(),
            1,
            "unsupported trace format 'v3'",
        ),
        (
            format!("{V2}a 1 2 0\n"),
            2,
            "needs 4 fields after 'a' in a v2 trace (ID BYTES STREAM T), found 3",
        ),
        (
            format!("{V2}a 1 2 0 0\nf 1\n"),
            3,
            "a free needs 2 fields after 'f' in a v2 trace (ID T), found 1",
        ),
        (
            format!("{V2}a 1 2 0 x\n"),
            2,
            "time 'x' is not a non-negative integer",
        ),
        (format!("{V2}a 1 2 0 -5\n"), 2, "time -5 is negative"),
        (
            format!("{V2}a 1 2 0 281474976710657\n"),
            2,
            "over 2^48 microseconds",
        ),
        (
            format!("{V2}a 1 2 0 10\na 2 2 0 9\n"),
            3,
            "time 9 is earlier than 10, the time of the event at line 2",
        ),
        (
            format!("{V2}a 1 2 0 10\nu 1 1 9\n"),
            3,
            "time 9 is earlier than 10",
        ),
        (
            format!("{V2}a 1 2 0 0\nu 1 0\n"),
            3,
            "a record_stream needs 3 fields after 'u' (ID STREAM T), found 2",
        ),
        (
            format!("{V2}a 1 2 0 0\nu 1 4096 1\n"),
            3,
            "stream 4096 is over 4095",
        ),
        (
            format!("{V2}u 7 1 0\n"),
            2,
            "'u' (record_stream) of unknown id 7",
        ),
        (
            format!("{V2}a 1 2 0 0\nf 1 1\nu 1 1 2\n"),
            4,
            "which is not live: it was freed at line 3",
        ),
        (
            format!("{V2}a 1 2 0 0\nc 1 5\n"),
            3,
            "completion marker for id 1, which is live (allocated at line 2)",
        ),
        (
            format!("{V2}a 1 2 0 0\nc 9 0\n"),
            3,
            "completion marker for id 9, which no earlier line frees",
        ),
        (
            format!("{V2}a 1 2 0 0\nf 1 10\nc 1 9\n"),
            4,
            "whose free at line 3 is at time 10",
        ),
        (
            format!("{V2}a 1 2 0 0\nf 1 10\nc 1 11\nc 1 12\n"),
            5,
            "second completion marker for id 1 (the first is at line 4)",
        ),
        (
            format!("{V2}a 1 2 0 0\nf 1 10\nc 1\n"),
            4,
            "a completion marker needs 2 fields after 'c' (ID T), found 1",
        ),
        (
            format!("{V2}#! real_peak_reserved=lots\na 1 2 0 0\n"),
            2,
            "real_peak_reserved 'lots' is not a non-negative integer",
        ),
        (
            format!("{V2}#! real_peak_allocated=2000000000000000000\n"),
            2,
            "is over 2^60 bytes",
        ),
        (
            format!("{V2}#! time_unit=ms\n"),
            2,
            "time_unit 'ms' is not supported",
        ),
        (
            format!("{V2}#! markers=some\n"),
            2,
            "markers 'some' is not one of all, cross_stream, none",
        ),
        (
            format!("{V2}#! conf\n"),
            2,
            "has no '=': expected '#! key=value'",
        ),
        (
            format!("{V2}#! Bad-Key=1\n"),
            2,
            "header key 'Bad-Key' is not a name",
        ),
        (
            format!("{V2}#! workload=a\n#! workload=b\n"),
            3,
            "header key 'workload' is given twice (first at line 2)",
        ),
        (
            format!("{V2}a 1 2 0 0\n#! late=1\n"),
            3,
            "header line after the first event",
        ),
        (
            format!("{V2}{many_keys}"),
            258,
            "more than 256 header lines",
        ),
        (
            format!("{V2}x 1\n"),
            2,
            "unknown event 'x': expected 'a ID BYTES STREAM T'",
        ),
        (format!("{V2}#! workload=w\n"), 2, "no events in 2 line(s)"),
        (
            "a 1 2 0\nu 1 1\n".into(),
            2,
            "'u' lines exist only in v2 traces",
        ),
        ("c 1\n".into(), 1, "'c' lines exist only in v2 traces"),
        (
            "a 1 2 0 5\n".into(),
            1,
            "needs 3 fields after 'a' (ID BYTES STREAM), found 4",
        ),
    ];
    for (input, want_line, want) in cases {
        for bytes in [input.as_bytes().to_vec(), gzip(input.as_bytes())] {
            let (line, message) = parse_error(&bytes);
            let shown: String = input.chars().take(60).collect();
            assert!(
                message.contains(want),
                "input {shown:?}: {message:?} lacks {want:?}"
            );
            assert_eq!(line, want_line, "input {shown:?}: {message:?}");
        }
    }
}

#[test]
fn v2_headers_are_read_into_fields() {
    let text = format!(
        "{V2}# a comment\n#! workload=gpt2 train, batch=8\n#!recorded_on=NVIDIA H200\n\
         #! recorded_with=PyTorch 2.11.0+cu130\n#! allocator=accelrt\n#! conf=expandable_segments:true\n\
         #! real_peak_reserved=1024\n#! real_peak_allocated=512\n#! time_unit=us\n#! markers=all\n\
         #! newer_key=some value\n\na 0 10 0 7\n# torch peak_reserved=5 conf=native\nf 0 9\n"
    );
    let t = trace::parse_bytes("h", text.as_bytes()).unwrap();
    let want = trace::Header {
        version: 2,
        workload: Some("gpt2 train, batch=8".into()),
        recorded_on: Some("NVIDIA H200".into()),
        recorded_with: Some("PyTorch 2.11.0+cu130".into()),
        allocator: Some("accelrt".into()),
        conf: Some("expandable_segments:true".into()),
        real_peak_reserved: Some(1024),
        real_peak_allocated: Some(512),
        markers: trace::Markers::All,
        other: vec![("newer_key".into(), "some value".into())],
    };
    assert_eq!(t.header, want);
    assert_eq!(t.header.real_ratio(), Some(2.0));
    assert_eq!(t.torch, None, "a v1 '# torch' comment means nothing in v2");
    assert_eq!(t.times, vec![7, 9]);
    assert_eq!(t.lines, vec![14, 16]);
}

#[test]
fn v2_traces_round_trip_plain_and_gzip() {
    use trace::TraceOp::*;
    let header = trace::Header {
        workload: Some("round trip".into()),
        conf: Some("expandable_segments:false,release_at_peak:false".into()),
        real_peak_reserved: Some(4 << 20),
        markers: trace::Markers::CrossStream,
        other: vec![("source".into(), "x.pickle".into())],
        ..trace::Header::v2()
    };
    let ops = vec![
        (
            Alloc {
                id: 5,
                size: 4096,
                stream: 0,
            },
            0,
        ),
        (
            Alloc {
                id: 6,
                size: 1 << 20,
                stream: 2,
            },
            3,
        ),
        (RecordStream { id: 6, stream: 0 }, 3),
        (Free { id: 6 }, 10),
        (Free { id: 5 }, 11),
        (Complete { id: 6 }, 40),
        (
            Alloc {
                id: 6,
                size: 1,
                stream: 1,
            },
            20,
        ),
    ];
    let t = Trace::from_timed_ops("rt2", ops, header).unwrap();
    let text = t.to_text();
    assert!(text.starts_with("#accelrt-trace v2\n"), "{text}");
    for back in [
        trace::parse_bytes("rt2", text.as_bytes()).unwrap(),
        trace::parse_bytes("rt2", &gzip(text.as_bytes())).unwrap(),
    ] {
        assert_eq!(
            (&back.ops, &back.times, &back.header),
            (&t.ops, &t.times, &t.header)
        );
    }
    // A header value cannot break out of its line.
    let evil = trace::Header {
        workload: Some("two\nlines\nc 5 0".into()),
        ..trace::Header::v2()
    };
    let t = Trace::from_timed_ops(
        "evil",
        vec![(
            Alloc {
                id: 1,
                size: 1,
                stream: 0,
            },
            0,
        )],
        evil,
    )
    .unwrap();
    let back = trace::parse_bytes("evil", t.to_text().as_bytes()).unwrap();
    assert_eq!(back.ops, t.ops);
    assert_eq!(back.header.workload.as_deref(), Some("two_lines_c 5 0"));
}
