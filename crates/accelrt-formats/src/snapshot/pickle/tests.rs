use super::*;

#[test]
fn integers_round_trip_at_every_width() {
    let cases: [i128; 16] = [
        0,
        1,
        255,
        256,
        65535,
        65536,
        -1,
        -128,
        -129,
        i32::MAX as i128,
        i32::MIN as i128,
        i32::MAX as i128 + 1,
        i32::MIN as i128 - 1,
        u64::MAX as i128,
        i64::MIN as i128,
        1 << 100,
    ];
    for v in cases {
        let mut w = PickleWriter::new();
        w.int(v);
        let p = Pickle::parse(&w.finish()).unwrap();
        assert_eq!(p.as_int(p.root()), Some(v), "{v}");
    }
}

#[test]
fn big_lists_and_dicts_are_batched() {
    let mut w = PickleWriter::new();
    w.dict_begin();
    for i in 0..2500 {
        w.str(&format!("k{i}"));
        w.list_begin();
        for j in 0..(i % 3) {
            w.int(j);
        }
        w.list_end();
    }
    w.str("long");
    w.list_begin();
    for j in 0..2345 {
        w.int(j);
    }
    w.list_end();
    w.dict_end();
    let bytes = w.finish();
    let p = Pickle::parse(&bytes).unwrap();
    assert_eq!(p.as_dict(p.root()).unwrap().len(), 2501);
    let long = p.get(p.root(), "long").unwrap();
    let items = p.as_seq(long).unwrap();
    assert_eq!(items.len(), 2345);
    assert_eq!(p.as_int(items[2344]), Some(2344));
    assert_eq!(p.as_seq(p.get(p.root(), "k2").unwrap()).unwrap().len(), 2);
}

#[test]
fn repeated_strings_come_from_the_memo() {
    let mut w = PickleWriter::new();
    w.list_begin();
    for _ in 0..300 {
        w.str("a fairly long stack frame name that repeats");
    }
    w.list_end();
    let bytes = w.finish();
    assert!(bytes.len() < 300 * 6 + 100, "{} bytes", bytes.len());
    let p = Pickle::parse(&bytes).unwrap();
    let items = p.as_seq(p.root()).unwrap();
    assert_eq!(items.len(), 300);
    assert!(items
        .iter()
        .all(|&v| p.as_str(v) == Some("a fairly long stack frame name that repeats")));
}

#[test]
fn hostile_inputs_are_errors() {
    // (input, expected fragment of the message)
    let cases: &[(&[u8], &str)] = &[
        (b"", "empty"),
        (b"\x80\x04", "truncated"),
        (b"\x80\x09N.", "protocol 9"),
        (b"\x80\x04\x8c\x05ab", "truncated"),
        (b"\x80\x04X\xff\xff\xff\xff", "truncated"),
        (b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xff", "truncated"),
        (
            b"\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00N.",
            "FRAME announces",
        ),
        (b"\x80\x04.", "stack underflow"),
        (b"\x80\x04a.", "stack underflow"),
        (b"\x80\x04]Na]Na", "truncated"),
        (b"\x80\x04Nu.", "no MARK"),
        (b"\x80\x04(N.", "MARK"),
        (b"\x80\x04}(Nu.", "pairs"),
        (b"\x80\x04N(Ne.", "expects a list"),
        (b"\x80\x04h\x07.", "memo entry 7"),
        (b"\x80\x04\x8c\x02\xff\xfe.", "UTF-8"),
        (b"\x80\x04cos\nsystem\n.", "GLOBAL refused"),
        (b"\x80\x04\x8a\x20", "too large"),
        (b"\x80\x04\xfe", "unknown opcode"),
        (b"\x80\x04}]]s.", "cannot be a dict key"),
        (b"garbage!", "must start with the PROTO opcode"),
        (b"\x80\x04g0\n.", "protocol-0/1 text opcode"),
    ];
    for (input, want) in cases {
        let e = Pickle::parse(input).unwrap_err();
        assert!(
            e.to_string().contains(want),
            "{input:?}: wanted '{want}' in: {e}"
        );
    }
}

#[test]
fn deep_and_cyclic_documents_are_harmless() {
    // A list that contains itself (legal pickle), and 200,000 nested tuples (within a
    // raised depth limit).
    let p = Pickle::parse(b"\x80\x04]\x94h\x00a.").unwrap();
    let items = p.as_seq(p.root()).unwrap();
    assert_eq!(items, &[p.root()]);
    assert_eq!(p.to_json(p.root(), 4).to_string(), "[[[[null]]]]");
    let mut deep = b"\x80\x04N".to_vec();
    deep.extend(std::iter::repeat_n(op::TUPLE1, 200_000));
    deep.push(op::STOP);
    let limits = PickleLimits {
        max_depth: 300_000,
        ..PickleLimits::default()
    };
    let p = Pickle::parse_with(&deep, limits).unwrap();
    assert!(p.as_seq(p.root()).is_some());
    drop(p);
}

fn nested(open: &[u8], close: &[u8], n: usize) -> Vec<u8> {
    let mut v = b"\x80\x04".to_vec();
    for _ in 0..n {
        v.extend(open);
    }
    v.push(op::NONE);
    for _ in 0..n {
        v.extend(close);
    }
    v.push(op::STOP);
    v
}

/// Issue 13 item 6: memory follows the limits, not the input. Each limit is an error
/// naming it and the variable that raises it; just under a limit reads fine.
#[test]
fn every_resource_is_capped_with_a_named_limit() {
    let small = PickleLimits {
        max_objects: 1000,
        max_depth: 8,
        max_string_bytes: 16,
    };
    let many_items = {
        let mut v = b"\x80\x04](".to_vec();
        v.extend(std::iter::repeat_n(op::NONE, 2000));
        v.extend([op::APPENDS, op::STOP]);
        v
    };
    let many_memos = {
        let mut v = b"\x80\x04N".to_vec();
        v.extend(std::iter::repeat_n(op::MEMOIZE, 2000));
        v.push(op::STOP);
        v
    };
    let long_string = {
        let mut v = b"\x80\x04\x8c\x11".to_vec();
        v.extend([b'x'; 17]);
        v.push(op::STOP);
        v
    };
    // (input, fragment naming the limit, environment variable)
    let over: [(Vec<u8>, &str, &str); 6] = [
        (many_items, "more than 1000 objects", MAX_OBJECTS_ENV),
        (many_memos, "more than 1000 objects", MAX_OBJECTS_ENV),
        (
            nested(&[op::MARK], &[op::TUPLE], 9),
            "MARKs open",
            MAX_DEPTH_ENV,
        ),
        // EMPTY_LIST MARK ... APPENDS: how PyTorch's files nest
        (
            nested(&[op::EMPTY_LIST, op::MARK], &[op::APPENDS], 9),
            "MARKs open",
            MAX_DEPTH_ENV,
        ),
        (
            nested(&[], &[op::TUPLE1], 9),
            "nested more than 8 deep",
            MAX_DEPTH_ENV,
        ),
        (long_string, "a string of 17 bytes", MAX_STRING_ENV),
    ];
    for (input, want, env) in over {
        let e = Pickle::parse_with(&input, small).unwrap_err();
        assert_eq!(e.fault, PickleFault::Limit, "{e}");
        let text = e.to_string();
        assert!(text.contains(want), "'{want}' in: {text}");
        assert!(text.contains(env), "names {env}: {text}");
    }
    // Just under each limit.
    assert!(Pickle::parse_with(&nested(&[], &[op::TUPLE1], 8), small).is_ok());
    assert!(Pickle::parse_with(&nested(&[op::MARK], &[op::TUPLE], 7), small).is_ok());
    let mut s16 = b"\x80\x04\x8c\x10".to_vec();
    s16.extend([b'x'; 16]);
    s16.push(op::STOP);
    assert!(Pickle::parse_with(&s16, small).is_ok());
}

/// Issue 13 item 7: a refused opcode says it was refused, and why; a corrupt file says
/// it is corrupt.
#[test]
fn refusals_are_told_apart_from_corruption() {
    // (input, fault)
    let cases: [(&[u8], PickleFault); 8] = [
        (b"\x80\x04cos\nsystem\n(S'id'\ntR.", PickleFault::Refused),
        (
            b"\x80\x04\x8c\x02os\x8c\x06system\x93.",
            PickleFault::Refused,
        ),
        (b"\x80\x04(cos\nsystem\nS'id'\ni.", PickleFault::Refused),
        (b"\x80\x04N\x81.", PickleFault::Refused),
        (b"\x80\x04C\x01x.", PickleFault::Unsupported),
        (b"\x80\x04\x8f.", PickleFault::Unsupported),
        (b"\x80\x04\xfe", PickleFault::Malformed),
        (b"\x80\x04]", PickleFault::Malformed),
    ];
    for (input, fault) in cases {
        let e = Pickle::parse(input).unwrap_err();
        assert_eq!(e.fault, fault, "{input:?}: {e}");
        if fault == PickleFault::Refused {
            assert!(e.message.contains("refused"), "{e}");
        }
    }
}

#[test]
fn json_values_round_trip() {
    let v = serde_json::json!({"a": [1, -2, 3.5, "x", null, true], "b": {"c": 18446744073709551615u64}});
    let mut w = PickleWriter::new();
    w.json(&v);
    let p = Pickle::parse(&w.finish()).unwrap();
    assert_eq!(p.to_json(p.root(), 16), v);
}
