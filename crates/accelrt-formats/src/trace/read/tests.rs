use super::*;

#[test]
fn header_fields_are_optional() {
    let p = parse_torch_header(
        " lines: 'a ID' = allocate. torch peak_allocated=10 peak_reserved=20 conf=native",
    )
    .unwrap();
    assert_eq!(p.peak_allocated, Some(10));
    assert_eq!(p.peak_reserved, Some(20));
    assert_eq!(p.conf.as_deref(), Some("native"));
    assert_eq!(p.ratio(), Some(2.0));
    let p = parse_torch_header(" torch peak_reserved=x conf=expandable_segments:True").unwrap();
    assert_eq!(p.peak_reserved, None);
    assert_eq!(p.conf.as_deref(), Some("expandable_segments:True"));
    assert!(parse_torch_header(" recorded with torch 2.11").is_none());
    assert!(parse_torch_header("").is_none());
}

#[test]
fn number_fields() {
    // (token, parsed or a word of the error)
    let cases: [(&str, std::result::Result<u64, &str>); 8] = [
        ("007", Ok(7)),
        ("0", Ok(0)),
        ("-3", Err("negative")),
        ("+3", Err("not a non-negative integer")),
        ("1e3", Err("not a non-negative integer")),
        ("", Err("is empty")),
        ("18446744073709551616", Err("64 bits")),
        ("18446744073709551615", Ok(u64::MAX)),
    ];
    for (token, want) in cases {
        match (parse_u64_field("id", token), want) {
            (Ok(n), Ok(w)) => assert_eq!(n, w, "{token}"),
            (Err(e), Err(w)) => assert!(e.contains(w), "{token}: {e}"),
            (got, want) => panic!("{token}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn one_byte_reader_parses_plain_and_gzip() {
    use std::io::Write;
    // A reader that hands out one byte at a time must still be read correctly.
    struct OneByte<'a>(&'a [u8]);
    impl Read for OneByte<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.0[0];
            self.0 = &self.0[1..];
            Ok(1)
        }
    }
    let text = b"a 1 2 0\nf 1\n";
    let t = crate::trace::parse_reader("t", "t", OneByte(text)).unwrap();
    assert_eq!(t.ops.len(), 2);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(text).unwrap();
    let gz = gz.finish().unwrap();
    let t2 = crate::trace::parse_reader("t", "t", OneByte(&gz)).unwrap();
    assert_eq!(t2, t);
}
