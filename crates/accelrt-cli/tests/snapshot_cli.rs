//! `accelrt replay` on PyTorch snapshots, its --snapshot/--html/--profile outputs,
//! `accelrt snapshot render|convert`, and the page as a browser draws it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::{accelrt, shipped, stderr};

/// Peak of live requested bytes of the shipped snapshot (traces/FORMAT.md).
const MLP_PEAK: u64 = 237_080_576;

fn dir(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("snapcli_{}_{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn json_lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn replaying_the_pytorch_snapshot_reaches_its_recorded_peak() {
    let out = accelrt(&["replay", "--json", &shipped("mlp_train.snapshot.pickle")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    let v = &lines[0];
    assert_eq!(v["input"], "PyTorch snapshot");
    assert_eq!(v["trace"], "mlp_train");
    assert_eq!(v["ops"], 244);
    assert_eq!(v["peak_allocated_bytes"], MLP_PEAK);
    assert_eq!(v["torch_peak_allocated_bytes"], MLP_PEAK);
    assert_eq!(v["torch_conf"], "native");
    // The table names PyTorch's recorded run too.
    let out = accelrt(&["replay", &shipped("mlp_train.snapshot.pickle")]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("PyTorch (native, recorded)"), "{table}");
    assert!(table.contains("226.10 MiB"), "{table}");
}

#[test]
fn outputs_are_written_per_config_and_read_back() {
    let d = dir("outputs");
    let snap = d.join("r.pickle");
    let html = d.join("r.html");
    let profile = d.join("r.trace.json");
    let out = accelrt(&[
        "replay",
        "--json",
        &shipped("resnet50_train.trace.gz"),
        "--alloc-conf",
        "",
        "--alloc-conf",
        "max_split_size_mb:64",
        "--snapshot",
        snap.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
        "--profile",
        profile.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2);
    for (v, suffix) in lines.iter().zip(["default", "max_split_size_mb-64"]) {
        let snap_file = d.join(format!("r.{suffix}.pickle"));
        assert_eq!(v["snapshot_file"], snap_file.display().to_string());
        assert_eq!(
            v["html_file"],
            d.join(format!("r.{suffix}.html")).display().to_string()
        );
        // The snapshot replays again to the same peak.
        let again = accelrt(&["replay", "--json", snap_file.to_str().unwrap()]);
        assert!(again.status.success(), "{}", stderr(&again));
        assert_eq!(
            json_lines(&again)[0]["peak_allocated_bytes"],
            v["peak_allocated_bytes"]
        );
        // The profile is a Chrome trace whose memory counter peaks at the peak allocated.
        let trace: Value = serde_json::from_slice(
            &std::fs::read(d.join(format!("r.trace.{suffix}.json"))).unwrap(),
        )
        .unwrap();
        let peak = trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ph"] == "C")
            .map(|e| e["args"]["allocated"].as_u64().unwrap())
            .max();
        assert_eq!(peak, v["peak_allocated_bytes"].as_u64());
    }
    // accelrt snapshot render and convert take what replay wrote.
    let page = d.join("render.html");
    let out = accelrt(&[
        "snapshot",
        "render",
        d.join("r.default.pickle").to_str().unwrap(),
        "-o",
        page.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read_to_string(&page)
        .unwrap()
        .contains("Memory over time"));
    let json = d.join("r.json");
    let out = accelrt(&[
        "snapshot",
        "convert",
        d.join("r.default.pickle").to_str().unwrap(),
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = accelrt(&[
        "snapshot",
        "render",
        json.to_str().unwrap(),
        "-o",
        page.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn hostile_inputs_fail_cleanly() {
    let d = dir("hostile");
    let fixture = std::fs::read(shipped("mlp_train.snapshot.pickle")).unwrap();
    // A snapshot whose first free names an address nothing allocated (as when recording
    // starts late), in PyTorch's layout.
    let mut w = accelrt::snapshot::pickle::PickleWriter::new();
    w.json(&serde_json::json!({
        "segments": [],
        "device_traces": [[
            {"action": "free_requested", "addr": 4096, "size": 16, "stream": 0},
            {"action": "alloc", "addr": 8192, "size": 16, "stream": 0},
        ]],
    }));
    let late = w.finish();
    // (case, file contents, what stderr says)
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated pickle",
            fixture[..fixture.len() / 2].to_vec(),
            "truncated",
        ),
        (
            "garbage with the pickle magic",
            b"\x80\x04\xfe\xfe\xfe".to_vec(),
            "unknown opcode",
        ),
        ("late recording", late.to_vec(), "no earlier alloc entry"),
        (
            "not JSON",
            b"{ nope".to_vec(),
            "not a valid accelrt JSON snapshot",
        ),
    ];
    for (case, bytes, what) in cases {
        let path = d.join(format!("{}.pickle", case.replace(' ', "_")));
        std::fs::write(&path, &bytes).unwrap();
        for args in [
            vec!["replay", path.to_str().unwrap()],
            vec![
                "snapshot",
                "render",
                path.to_str().unwrap(),
                "-o",
                "/dev/null",
            ],
        ] {
            let out = accelrt(&args);
            let err = stderr(&out);
            // `render` of the late recording draws it (a picture needs no complete history).
            if case == "late recording" && args[0] == "snapshot" {
                assert!(out.status.success(), "{case}: {err}");
                continue;
            }
            assert!(!out.status.success(), "{case}: {args:?} succeeded");
            assert!(err.contains(what), "{case}: wanted '{what}' in: {err}");
            assert!(
                err.contains(path.to_str().unwrap()),
                "{case}: the file is named: {err}"
            );
            assert!(!err.contains("panicked"), "{case}: {err}");
        }
    }
}

/// The page drawn by a real browser: headless Chromium takes a screenshot, which must be a
/// sane PNG with a picture in it (not a blank page).
#[test]
fn the_html_page_renders_in_a_browser() {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(chromium) = chromium else {
        println!(
            "SKIPPED the_html_page_renders_in_a_browser: no chromium at /usr/bin/chromium \
             (install it with `apt-get install -y chromium`; .ci/run does)"
        );
        return;
    };
    let d = dir("browser");
    let page = d.join("mlp.html");
    let out = accelrt(&[
        "replay",
        &shipped("mlp_train.snapshot.pickle"),
        "--html",
        page.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let png_path = d.join("mlp.png");
    let profile_dir = d.join("chromium-profile");
    let shot = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile_dir.display()),
            &format!("--screenshot={}", png_path.display()),
            "--window-size=1400,1000",
            &format!("file://{}", page.display()),
        ])
        .output()
        .expect("run chromium");
    assert!(
        png_path.exists(),
        "chromium wrote no screenshot (status {}): {}",
        shot.status,
        stderr(&shot)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1400, 1000));
    let channels = info.line_size / info.width as usize;
    assert!(channels >= 3, "{channels} channels");
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(channels).collect();
    let mut colours: std::collections::HashSet<[u8; 3]> = std::collections::HashSet::new();
    let mut non_background = 0usize;
    for p in &pixels {
        colours.insert([p[0] >> 3, p[1] >> 3, p[2] >> 3]);
        // The page background is #f5f7fa and the panels white.
        if !(p[0] >= 0xf0 && p[1] >= 0xf0 && p[2] >= 0xf0) {
            non_background += 1;
        }
    }
    assert!(
        colours.len() >= 40,
        "only {} distinct colours: a blank or broken page",
        colours.len()
    );
    let share = non_background as f64 / pixels.len() as f64;
    assert!(
        share > 0.08,
        "only {:.1}% of the page is drawn",
        share * 100.0
    );
    // The chart's reserved line (#d9480f) is on screen.
    assert!(
        pixels
            .iter()
            .any(|p| p[0] > 0xc8 && (0x38..0x58).contains(&p[1]) && p[2] < 0x30),
        "the reserved line is not drawn"
    );
}
