//! The CLI's size and configuration arguments, through the real binary.

use std::io::Read;
use std::time::Duration;

use super::first_chars;
use crate::{Outcome, Target};

/// Environment variable naming the `accelrt` binary for the CLI target.
pub const BIN_ENV: &str = "ACCELRT_FUZZ_BIN";

fn cli_seeds() -> Vec<Vec<u8>> {
    [
        "24GiB\n\na 0 1 0\nf 0\n",
        "512MiB\nexpandable_segments:false\na 0 1048576 0\na 1 512 1\nf 0\n",
        "1GB\nmax_split_size_mb:20\na 0 30000000 0\nf 0\n",
        "4096\n\na 0 8192 0\n",
        "1.5GiB\nroundup_power2_divisions:4\na 0 123456 0\nf 0\n",
        "\n\na 0 1 0\n",
        "64 MiB\nexpandable_page_mb:4\na 0 10485760 0\nf 0\na 1 10485760 0\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Line 1: `--capacity`, line 2: `--alloc-conf`, the rest: a trace. Runs the real binary
/// (`ACCELRT_FUZZ_BIN`): exit 0 or 1 with a message; never a panic, a signal or a hang.
fn check_cli(bytes: &[u8]) -> Outcome {
    let Ok(bin) = std::env::var(BIN_ENV) else {
        return Err(format!(
            "{BIN_ENV} is not set: point it at the accelrt binary"
        ));
    };
    // A command line cannot hold NUL bytes: what a shell could pass, and only that.
    let text = String::from_utf8_lossy(bytes).replace('\0', "");
    let mut lines = text.splitn(3, '\n');
    let capacity = lines.next().unwrap_or("").to_string();
    let conf = lines.next().unwrap_or("").to_string();
    let body = lines.next().unwrap_or("");
    let dir = std::env::temp_dir().join(format!("accelrt-fuzz-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
    let file = dir.join("case.trace");
    std::fs::write(&file, body).map_err(|e| format!("temp file: {e}"))?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("replay").arg(&file).arg("--json");
    if !capacity.is_empty() {
        cmd.arg(format!("--capacity={capacity}"));
    }
    if !conf.is_empty() {
        cmd.arg(format!("--alloc-conf={conf}"));
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {bin}: {e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("accelrt replay ran past 15 s (a hang)".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    use std::os::unix::process::ExitStatusExt;
    if let Some(signal) = status.signal() {
        return Err(format!("accelrt replay died of signal {signal}: {stderr}"));
    }
    if stderr.contains("panicked") {
        panic!("accelrt replay panicked: {}", first_chars(&stderr, 600));
    }
    match status.code() {
        Some(0) => Ok("ok".into()),
        Some(1) | Some(2) => {
            if stderr.trim().is_empty() {
                return Err("accelrt replay failed without saying why".into());
            }
            Ok(format!(
                "exit {:?}: {}",
                status.code(),
                first_chars(stderr.trim(), 60)
            ))
        }
        other => Err(format!("accelrt replay exited with {other:?}: {stderr}")),
    }
}

/// The CLI: `--capacity` size strings and `--alloc-conf` strings, end to end.
pub const CLI: Target = Target {
    name: "cli",
    about: "accelrt replay --capacity SIZE --alloc-conf CONF on a small trace (the real binary)",
    seeds: cli_seeds,
    run: check_cli,
    max_len: 4 << 10,
    dictionary: &[
        b"KiB",
        b"MiB",
        b"GiB",
        b"TiB",
        b"KB",
        b"MB",
        b"GB",
        b"TB",
        b"K",
        b"G",
        b".",
        b"_",
        b" ",
        b"e",
        b"-",
        b"expandable_segments:",
        b"max_split_size_mb:",
        b",",
        b"\n",
    ],
    case_timeout: Duration::from_secs(30),
};
