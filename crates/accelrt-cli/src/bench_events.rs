//! Event fast paths on the host backend: pooled acquire + release (RAII and id API) and
//! record + query of a non-timing event on an idle stream.
//!
//! Each measurement times batches of [`BATCH`] operations and reports the median batch, in
//! nanoseconds per operation, so a preempted batch does not skew the result.

use std::hint::black_box;
use std::time::Instant;

use accelrt::{DeviceType, Error, StreamPriority};
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

fn measure(iters: u64) -> Result<Value, Error> {
    let runtime = accelrt::registry::host();
    let pool = runtime.event_pool()?;
    let raii = median_ns(iters, || {
        black_box(pool.acquire(0, false)?);
        Ok(())
    })?;

    let backend = accelrt::backend(DeviceType::Host);
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

    Ok(json!({
        "event_acquire_release_ns": raii,
        "event_id_acquire_release_ns": id_api,
        "event_record_query_ns": record_query?,
    }))
}

/// Run the event benches for about `iters` operations each. A failure (host backend
/// unavailable) gives `null` timings and an `event_bench_error` that says why.
pub fn run_event_benches(iters: u64) -> Value {
    measure(iters).unwrap_or_else(|e| {
        json!({
            "event_acquire_release_ns": null,
            "event_id_acquire_release_ns": null,
            "event_record_query_ns": null,
            "event_bench_error": e.to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_three_timings_as_positive_numbers() {
        let v = run_event_benches(2000);
        for key in [
            "event_acquire_release_ns",
            "event_id_acquire_release_ns",
            "event_record_query_ns",
        ] {
            let ns = v[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing in {v}"));
            assert!(ns > 0.0 && ns < 1e6, "{key} = {ns}");
        }
    }
}
