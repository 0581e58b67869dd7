//! Issue 13 item 1 end to end: the 117-byte snapshot whose segment_map range wraps past 2^64
//! made `accelrt snapshot render` panic, and `snapshot convert` accepted it.

mod common;

use common::{accelrt, stderr};

/// `{'segments': [], 'device_traces': [[{'action': 'segment_map', 'addr': 2**64-4096,
/// 'size': 8192, 'stream': 0}]]}`, as Python's `pickle.dumps(..., protocol=4)` writes it.
fn wrapping_pickle() -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(
            "../accelrt-fuzz/regressions/snapshot_pickle/issue13-item1-segment-map-wraps-past-2-64.pickle",
        ),
    )
    .expect("the saved finding")
}

#[test]
fn render_and_convert_refuse_a_range_past_two_to_the_64() {
    let dir = std::env::temp_dir().join(format!("accelrt-hostile-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("wraps.pickle");
    let bytes = wrapping_pickle();
    assert_eq!(bytes.len(), 117, "the issue's file");
    std::fs::write(&input, bytes).unwrap();
    let input = input.to_str().unwrap();
    let html = dir.join("out.html");
    let json = dir.join("out.json");
    // (arguments, output that must not be written)
    let runs = [
        (
            vec!["snapshot", "render", input, "-o", html.to_str().unwrap()],
            &html,
        ),
        (
            vec!["snapshot", "convert", input, json.to_str().unwrap()],
            &json,
        ),
    ];
    for (args, out) in runs {
        let o = accelrt(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            err.contains("wraps.pickle: device_traces[0][0]") && err.contains("2^64"),
            "{args:?}: the message names the file, the entry and the fault: {err}"
        );
        assert!(!out.exists(), "{args:?} wrote {out:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
