//! What `accelrt bench` says about the machine, and its table for people.

use accelrt::alloc::format_size;
use serde_json::{json, Map, Value};

use crate::replay::group;

use super::{RandomResult, PAIR_SIZES};

/// The CPU model and core count of this machine.
pub(super) fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| {
                    l.starts_with("model name")
                        || l.starts_with("Model")
                        || l.starts_with("cpu model")
                })
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    json!({ "cpu": cpu, "cores": cores, "os": std::env::consts::OS, "arch": std::env::consts::ARCH })
}

/// Now, in UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
pub(super) fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

pub(super) fn print_human(
    out: &Map<String, Value>,
    event_keys: &[String],
    randoms: &[&RandomResult],
) {
    let machine = &out["machine"];
    println!(
        "accelrt bench: {} build, {}, {} ({} cores)",
        out["build"].as_str().unwrap_or("?"),
        out["date"].as_str().unwrap_or("?"),
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
    );
    println!("config: {}", out["config"].as_str().unwrap_or("?"));
    println!(
        "backend: {} ({})",
        out["backend"].as_str().unwrap_or("?"),
        out["device"].as_str().unwrap_or("?")
    );
    println!();
    println!("cached alloc+free pair on one stream (median ns per pair)");
    println!(
        "  {:>10}  {:>9}  {:>13}",
        "size", "accelrt", "system malloc"
    );
    for size in PAIR_SIZES {
        let key = size.to_string();
        println!(
            "  {:>10}  {:>9.1}  {:>13.1}",
            format_size(size as u64),
            num(&out["fast_path_pair_ns"][&key]),
            num(&out["system_malloc_pair_ns"][&key])
        );
    }
    println!();
    println!("cached pinned-host alloc+free pair (median ns per pair)");
    for (key, ns) in out["pinned_pair_ns"].as_object().into_iter().flatten() {
        let bytes: u64 = key.parse().unwrap_or(0);
        println!("  {:>10}  {:>9.1}", format_size(bytes), num(ns));
    }
    println!();
    println!("random allocations (RMM-style: free a random live allocation, allocate another)");
    println!(
        "  {:>5}  {:>14}  {:>9}  {:>8}  {:>14}  {:>14}  {:>8}  {:>13}  {:>12}",
        "live",
        "sizes",
        "ops",
        "ns/call",
        "peak reserved",
        "peak allocated",
        "ratio",
        "device allocs",
        "driver calls"
    );
    for r in randoms {
        println!(
            "  {:>5}  {:>14}  {:>9}  {:>8.1}  {:>14}  {:>14}  {:>7.3}x  {:>13}  {:>12}",
            r.live,
            format!("1 B..{}", format_size(r.max_size)),
            group(r.ops),
            r.ns_per_call,
            format_size(r.peak_reserved),
            format_size(r.peak_allocated),
            r.ratio(),
            group(r.device_allocs),
            group(r.driver_calls_total()),
        );
        if let Some(e) = &r.error {
            println!("         did not fit the device: {e}");
        }
    }
    println!();
    let m = &out["multi_thread"];
    println!(
        "threads, each on its own stream ({} pairs)",
        format_size(m["size_bytes"].as_u64().unwrap_or(0))
    );
    println!(
        "  1 thread: {:.0} pairs/s",
        num(&m["single_thread_pairs_per_sec"])
    );
    println!(
        "  {} threads: {:.0} pairs/s in total, scaling {:.2}x; the slowest thread {:.0} ns a pair \
         (one thread alone: {:.0}), started within {:.0} us of the first",
        m["threads"],
        num(&m["pairs_per_sec_total"]),
        num(&m["scaling"]),
        num(&m["slowest_thread_ns_per_pair"]),
        num(&m["single_thread_ns_per_pair"]),
        num(&m["start_spread_us"])
    );
    println!(
        "  control, an allocator per thread (what the machine allows): {:.0} pairs/s, scaling {:.2}x; \
         the slowest thread {:.0} ns a pair",
        num(&m["private_allocators_pairs_per_sec_total"]),
        num(&m["private_allocators_scaling"]),
        num(&m["private_allocators_slowest_thread_ns_per_pair"])
    );
    if !event_keys.is_empty() {
        println!();
        println!("events");
        for key in event_keys {
            println!("  {key}: {}", out[key]);
        }
    }
}
