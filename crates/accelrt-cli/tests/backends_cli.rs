//! Backends registered by name from the command line: the workspace's `fault` backend is
//! listed by `info`, and `replay --backend fault` / `bench --backend fault` run on it
//! (with faults from `ACCELRT_FAULTS`); an unknown name lists the known ones.

mod common;

use std::process::{Command, Output};

use common::{accelrt, shipped, stderr, stdout};
use serde_json::Value;

/// Run `accelrt` with `ACCELRT_FAULTS` set to `faults`.
fn accelrt_with_faults(faults: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_accelrt"))
        .env("ACCELRT_FAULTS", faults)
        .args(args)
        .output()
        .expect("run the accelrt binary")
}

#[test]
fn info_lists_the_registered_fault_backend() {
    let out = accelrt(&["info", "--json"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let backends = v["backends"].as_array().unwrap();
    let names: Vec<&str> = backends
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names[..3], ["host", "cuda", "fault"], "{names:?}");
    let fault = &backends[2];
    assert_eq!(
        (fault["builtin"].clone(), fault["available"].clone()),
        (false.into(), true.into())
    );
    assert!(fault["config"].as_str().unwrap().contains("ACCELRT_FAULTS"));
    let text = stdout(&accelrt(&["info"]));
    assert!(text.contains("fault: available"), "{text}");
}

#[test]
fn replay_on_the_fault_backend_matches_the_host_and_injected_faults_show() {
    let trace = shipped("resnet50_train.trace.gz");
    let run = |faults: &str| -> (bool, Value) {
        let out = accelrt_with_faults(faults, &["replay", "--json", "--backend", "fault", &trace]);
        let line = stdout(&out);
        let v: Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{}", stderr(&out)));
        (out.status.success(), v)
    };
    // No faults: the same peak as the trace recorded, on fault:0.
    let (ok, v) = run("");
    assert!(ok, "{v}");
    assert_eq!(v["backend"], "fault");
    assert_eq!(v["completed"], true);
    assert_eq!(v["peak_allocated_bytes"], 3_192_592_912u64);
    // One refused device allocation: the allocator retries and the replay completes.
    let (ok, v) = run("allocation=1");
    assert!(ok && v["completed"] == true && v["ooms"] == 0, "{v}");
    // Every device allocation refused: an out-of-memory at the first allocation.
    let (ok, v) = run("allocation=1000000000");
    assert!(!ok, "{v}");
    assert_eq!(
        (v["completed"].clone(), v["ooms"].clone()),
        (false.into(), 1.into())
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("out of memory on fault:0"),
        "{v}"
    );
    // A malformed specification makes the backend unavailable, naming the problem.
    let out = accelrt_with_faults("typo=1", &["replay", "--backend", "fault", &trace]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("fault backend is unavailable") && err.contains("unknown fault 'typo'"),
        "{err}"
    );
}

#[test]
fn bench_runs_on_the_fault_backend() {
    let out = accelrt(&[
        "bench",
        "--json",
        "--quick",
        "--threads",
        "2",
        "--backend",
        "fault",
    ]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["backend"], "fault");
    assert!(
        v["device"].as_str().unwrap().contains("fault injection"),
        "{}",
        v["device"]
    );
    for key in ["event_pooled_cycle_ns", "event_id_acquire_release_ns"] {
        assert!(v[key].as_f64().is_some_and(|ns| ns > 0.0), "{key} in {v}");
    }
    assert!(v["fast_path_pair_ns"]["4096"].as_f64().unwrap() > 0.0);
    // Each random workload either ran or says it did not fit this machine's memory.
    for (name, r) in v["random"].as_object().unwrap() {
        let ran = r["ns_per_call"].as_f64().is_some_and(|ns| ns > 0.0);
        let did_not_fit = r["error"]
            .as_str()
            .is_some_and(|e| e.contains("out of memory"));
        assert!(ran != did_not_fit, "{name}: {r}");
    }
}

#[test]
fn an_unknown_backend_name_lists_the_known_ones() {
    let trace = shipped("resnet50_train.trace.gz");
    let commands: [&[&str]; 2] = [&["bench"], &["replay", &trace]];
    for command in commands {
        let out = accelrt(&[command, &["--backend", "nope"]].concat());
        assert!(!out.status.success(), "{command:?}");
        let err = stderr(&out);
        assert!(
            err.contains("unknown device type 'nope'") && err.contains("host, cuda, fault"),
            "{command:?}: {err}"
        );
    }
}
