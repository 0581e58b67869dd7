//! Timing events on a real GPU: a kernel that spins for 50 ms measures within a few percent
//! of a host clock around a synchronize.
#![cfg(feature = "cuda")]

mod cuda_common;

use accelrt::DeviceError;
use std::time::{Duration, Instant};

use accelrt::{Backend, Error, StreamPriority};
use cuda_common::gpu;

#[test]
fn events_time_a_50ms_kernel_like_the_host_clock() {
    let Some(rt) = gpu("events_time_a_50ms_kernel_like_the_host_clock") else {
        return;
    };
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    // Warm up: load the kernels, wake the GPU.
    rt.with_stream(s, |d, raw| d.spin(raw, Duration::from_millis(5)))
        .unwrap();
    rt.stream_synchronize(s).unwrap();

    const SPIN: Duration = Duration::from_millis(50);
    let mut results = Vec::new();
    for _ in 0..3 {
        let start = rt.event(0, true).unwrap();
        let end = rt.event(0, true).unwrap();
        let t0 = Instant::now();
        start.record(s).unwrap();
        rt.with_stream(s, |d, raw| d.spin(raw, SPIN)).unwrap();
        end.record(s).unwrap();
        // Still spinning: not complete, and no elapsed time yet.
        assert!(!end.query().unwrap());
        let early = start.elapsed_ms(&end).unwrap_err();
        assert!(early.to_string().contains("not completed"), "{early}");
        end.synchronize().unwrap();
        let host_ms = t0.elapsed().as_secs_f64() * 1e3;
        assert!(end.query().unwrap());
        let event_ms = start.elapsed_ms(&end).unwrap();
        eprintln!("spin 50 ms: events {event_ms:.3} ms, host clock {host_ms:.3} ms");
        results.push((event_ms, host_ms));
    }
    for (event_ms, host_ms) in results {
        assert!(
            (event_ms - 50.0).abs() / 50.0 < 0.05,
            "events measured {event_ms:.3} ms for a 50 ms kernel"
        );
        assert!(
            (event_ms - host_ms).abs() / host_ms < 0.05,
            "events {event_ms:.3} ms vs host clock {host_ms:.3} ms"
        );
    }
}

#[test]
fn elapsed_time_needs_timing_events() {
    let Some(rt) = gpu("elapsed_time_needs_timing_events") else {
        return;
    };
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let start = rt.event(0, false).unwrap();
    let end = rt.event(0, false).unwrap();
    start.record(s).unwrap();
    end.record(s).unwrap();
    end.synchronize().unwrap();
    let err = start.elapsed_ms(&end).unwrap_err();
    assert!(matches!(err, Error::Device(DeviceError::Event(_))), "{err}");
    assert!(err.to_string().contains("enable_timing"), "{err}");
}
