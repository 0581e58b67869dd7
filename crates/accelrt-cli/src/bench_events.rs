//! Event fast paths on a backend: pooled acquire + release (RAII and id API), record + query
//! of a non-timing event on an idle stream, and the full pooled cycle (acquire + record +
//! query + release) next to the driver's own record + query of one pre-made event (for CUDA:
//! `cuEventRecord` + `cuEventQuery` through the backend's one-line wrappers), in the same run.
//!
//! Each measurement times batches of [`BATCH`] operations and reports the median batch, in
//! nanoseconds per operation, so a preempted batch does not skew the result.

use std::hint::black_box;
use std::time::Instant;

use accelrt::driver::Driver;
use accelrt::runtime::Runtime;
use accelrt::{Backend, DeviceType, Error, Stream, StreamPriority};
use serde_json::{json, Value};

/// Operations per timed batch.
const BATCH: u64 = 1000;

/// Median over batches of the ns per call of `op`; `iters` calls in all (at least one batch).
fn median_ns(iters: u64, mut op: impl FnMut() -> Result<(), Error>) -> Result<f64, Error> {
    let batches = (iters / BATCH).max(1);
    // Warm up: fill the pool's free list, start worker threads, fault in code.
    for _ in 0..BATCH.min(iters.max(1)) {
        op()?;
    }
    let mut per_op = Vec::with_capacity(batches as usize);
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..BATCH {
            op()?;
        }
        per_op.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
    }
    per_op.sort_by(f64::total_cmp);
    Ok(per_op[per_op.len() / 2])
}

/// The id-API timings any backend has: (acquire + release, record + query on an idle stream
/// of its own), and that stream.
fn measure_ids(backend: &dyn Backend, iters: u64) -> Result<(f64, f64, Stream), Error> {
    backend.init()?;
    let id_api = median_ns(iters, || {
        let id = backend.event_acquire(0, false)?;
        backend.event_release(black_box(id))
    })?;

    // A stream of its own, so it is idle whatever else ran on the default stream.
    let stream = backend.new_stream(0, StreamPriority::Normal)?;
    let event = backend.event_acquire(0, false)?;
    let record_query = median_ns(iters, || {
        backend.event_record(event, stream)?;
        black_box(backend.event_query(event)?);
        Ok(())
    });
    backend.event_release(event)?;
    Ok((id_api, record_query?, stream))
}

fn measure<D: Driver>(runtime: &'static Runtime<D>, iters: u64) -> Result<Value, Error> {
    let backend: &dyn Backend = runtime;
    let (id_api, record_query, stream) = measure_ids(backend, iters)?;
    let pool = runtime.event_pool()?;
    let raii = median_ns(iters, || {
        black_box(pool.acquire(0, false)?);
        Ok(())
    })?;

    // The full pooled cycle, through the runtime's RAII events (its fast path) ...
    let pooled_cycle = median_ns(iters, || {
        let ev = runtime.event(0, false)?;
        ev.record(stream)?;
        black_box(ev.query()?);
        Ok(())
    })?;
    // ... and the driver's bare record + query of one event it made, on the same stream.
    let raw = runtime.with_stream(stream, |driver, raw_stream| {
        let ev = driver.event_create(0, false)?;
        median_ns(iters, || {
            driver.event_record(&ev, raw_stream)?;
            black_box(driver.event_query(&ev)?);
            Ok(())
        })
    })?;
    backend.stream_synchronize(stream)?;

    Ok(json!({
        "event_acquire_release_ns": raii,
        "event_id_acquire_release_ns": id_api,
        "event_record_query_ns": record_query,
        "event_pooled_cycle_ns": pooled_cycle,
        "event_raw_record_query_ns": raw,
        "event_pooled_vs_raw": pooled_cycle / raw.max(1e-9),
    }))
}

/// A registered backend whose runtime type the CLI does not know: the id API only (the RAII
/// and raw-driver timings need the concrete runtime), the others null with a note.
fn measure_hooks(backend: &dyn Backend, iters: u64) -> Result<Value, Error> {
    let (id_api, record_query, stream) = measure_ids(backend, iters)?;
    backend.stream_synchronize(stream)?;
    Ok(json!({
        "event_acquire_release_ns": null,
        "event_id_acquire_release_ns": id_api,
        "event_record_query_ns": record_query,
        "event_pooled_cycle_ns": null,
        "event_raw_record_query_ns": null,
        "event_pooled_vs_raw": null,
        "event_bench_note": format!(
            "{} is a registered backend: only its id API is timed (the RAII and raw-driver \
             timings need its concrete runtime)",
            backend.device_type()
        ),
    }))
}

fn measure_backend(iters: u64, kind: DeviceType) -> Result<Value, Error> {
    if kind == DeviceType::Host {
        return measure(accelrt::registry::host(), iters);
    }
    #[cfg(feature = "cuda")]
    if kind == DeviceType::Cuda {
        return measure(accelrt::registry::cuda(), iters);
    }
    if kind == accelrt_fault::KIND {
        return measure(accelrt_fault::register()?, iters);
    }
    #[cfg(feature = "wgpu")]
    if kind == accelrt_wgpu::KIND {
        return measure_wgpu(iters);
    }
    measure_hooks(accelrt::backend(kind), iters)
}

/// The wgpu backend: the common timings, then the comparison on the same adapter: an
/// event cycle (acquire + record + query + release) against a raw submission and poll
/// (`Queue::submit` of nothing + `Device::poll`), both alone and each after one submission
/// of the same GPU work (a 4-byte fill), so the event waits for real work.
#[cfg(feature = "wgpu")]
fn measure_wgpu(iters: u64) -> Result<Value, Error> {
    let runtime = accelrt_wgpu::register()?;
    let mut out = measure(runtime, iters)?;
    let backend: &dyn Backend = runtime;
    let stream = backend.new_stream(0, StreamPriority::Normal)?;
    let allocator = backend.device_allocator(0)?;
    let scratch = allocator.raw_alloc(4096, stream)?;
    // Submissions cost tens of microseconds on lavapipe: fewer iterations keep this short.
    let n = (iters / 20).max(BATCH);
    let result: Result<_, Error> = runtime.with_stream(stream, |driver, raw| {
        let (device, queue) = driver.wgpu(0)?;
        let poll = || {
            device
                .poll(accelrt_wgpu::wgpu::PollType::Poll)
                .map(drop)
                .map_err(|e| {
                    Error::from(accelrt::DeviceError::Driver {
                        call: "wgpu::Device::poll",
                        code: None,
                        message: e.to_string(),
                    })
                })
        };
        let raw_submit_poll = median_ns(n, || {
            queue.submit(std::iter::empty());
            poll()
        })?;
        let cycle = median_ns(n, || {
            let ev = runtime.event(0, false)?;
            ev.record(stream)?;
            black_box(ev.query()?);
            Ok(())
        })?;
        let (buffer, offset) = driver.memory(0)?.resolve(scratch, 4)?;
        let raw_work = median_ns(n, || {
            let mut e = device.create_command_encoder(&Default::default());
            e.clear_buffer(&buffer, offset, Some(4));
            queue.submit(Some(e.finish()));
            poll()
        })?;
        let cycle_work = median_ns(n, || {
            driver.fill(raw, scratch, 4, 0)?;
            let ev = runtime.event(0, false)?;
            ev.record(stream)?;
            black_box(ev.query()?);
            Ok(())
        })?;
        Ok((raw_submit_poll, cycle, raw_work, cycle_work))
    });
    backend.stream_synchronize(stream)?;
    allocator.raw_free(scratch)?;
    let (raw_submit_poll, cycle, raw_work, cycle_work) = result?;
    let map = out.as_object_mut().expect("measure returns an object");
    map.insert("wgpu_raw_submit_poll_ns".into(), json!(raw_submit_poll));
    map.insert("wgpu_event_cycle_ns".into(), json!(cycle));
    map.insert(
        "wgpu_event_cycle_vs_submit_poll".into(),
        json!(cycle / raw_submit_poll.max(1e-9)),
    );
    map.insert("wgpu_raw_fill_submit_poll_ns".into(), json!(raw_work));
    map.insert("wgpu_fill_event_cycle_ns".into(), json!(cycle_work));
    map.insert(
        "wgpu_fill_event_cycle_vs_fill_submit_poll".into(),
        json!(cycle_work / raw_work.max(1e-9)),
    );
    Ok(out)
}

/// The keys [`run_event_benches`] reports.
pub const EVENT_KEYS: [&str; 6] = [
    "event_acquire_release_ns",
    "event_id_acquire_release_ns",
    "event_record_query_ns",
    "event_pooled_cycle_ns",
    "event_raw_record_query_ns",
    "event_pooled_vs_raw",
];

/// Run the event benches on `kind`'s device 0 for about `iters` operations each. A failure
/// (backend unavailable) gives `null` timings and an `event_bench_error` that says why.
pub fn run_event_benches(iters: u64, kind: DeviceType) -> Value {
    measure_backend(iters, kind).unwrap_or_else(|e| {
        let mut v = serde_json::Map::new();
        for key in EVENT_KEYS {
            v.insert(key.into(), Value::Null);
        }
        v.insert("event_bench_error".into(), json!(e.to_string()));
        Value::Object(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_timing_as_a_positive_number() {
        let v = run_event_benches(2000, DeviceType::Host);
        for key in EVENT_KEYS {
            let ns = v[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing in {v}"));
            assert!(ns > 0.0 && ns < 1e6, "{key} = {ns}");
        }
    }

    #[test]
    fn an_unavailable_backend_gives_nulls_and_the_reason() {
        if accelrt::backend(DeviceType::Cuda).is_available() {
            return; // a GPU machine: nothing unavailable to test with
        }
        let v = run_event_benches(10, DeviceType::Cuda);
        assert_eq!(v["event_pooled_cycle_ns"], Value::Null);
        let reason = v["event_bench_error"].as_str().unwrap();
        assert!(
            reason.contains("cannot execute init() without the cuda backend"),
            "{reason}"
        );
    }

    #[test]
    fn registered_backends_are_benched_too() {
        // The fault backend: its concrete runtime is known, every timing is there.
        let v = run_event_benches(2000, accelrt_fault::KIND);
        for key in EVENT_KEYS {
            assert!(v[key].as_f64().is_some_and(|ns| ns > 0.0), "{key} in {v}");
        }
        // A backend whose runtime type is unknown here: the id API, and a note for the rest.
        let v = measure_hooks(accelrt::registry::host(), 2000).unwrap();
        for key in ["event_id_acquire_release_ns", "event_record_query_ns"] {
            assert!(v[key].as_f64().is_some_and(|ns| ns > 0.0), "{key} in {v}");
        }
        assert_eq!(v["event_pooled_cycle_ns"], Value::Null);
        assert!(v["event_bench_note"].as_str().unwrap().contains("id API"));
    }
}
