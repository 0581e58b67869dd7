//! `accelrt info`: every backend (available or not, with the reason), its devices and their
//! properties, and the configuration in effect.

use std::process::ExitCode;

use crate::error::CliError;
use accelrt::alloc::format_size;
use accelrt::Backend;
use serde_json::{json, Value};

/// Arguments of `accelrt info`.
#[derive(clap::Args, Debug, Clone)]
pub struct InfoArgs {
    /// Print one JSON object (`{"backends": [...]}`) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Register the backends that live outside the `accelrt` crate (the workspace's `fault`
/// backend), so `info` lists them and `--backend NAME` finds them. A failure is a warning:
/// the built-in backends still work.
pub fn register_backends() {
    if let Err(e) = accelrt_fault::register() {
        eprintln!("warning: the fault backend could not be registered: {e}");
    }
    #[cfg(feature = "wgpu")]
    if let Err(e) = accelrt_wgpu::register() {
        eprintln!("warning: the wgpu backend could not be registered: {e}");
    }
}

/// One device as JSON: its index and properties, or the error that hid them.
fn device_json(backend: &dyn Backend, index: u32) -> Value {
    match backend.device_properties(index) {
        Ok(props) => {
            let mut v = serde_json::to_value(props).unwrap_or(Value::Null);
            if let Value::Object(map) = &mut v {
                map.insert("index".into(), json!(index));
            }
            v
        }
        Err(e) => json!({ "index": index, "error": e.to_string() }),
    }
}

/// One backend as JSON.
fn backend_json(backend: &dyn Backend) -> Value {
    let count = backend.device_count();
    json!({
        "name": backend.device_type().name(),
        "builtin": backend.device_type().is_builtin(),
        "available": backend.is_available(),
        "device_count": count,
        "reason": backend.unavailable_reason(),
        "devices": (0..count).map(|i| device_json(backend, i)).collect::<Vec<_>>(),
        "config": backend.show_config(),
    })
}

/// The whole report: `{"backends": [...]}` in registry order.
pub fn report(backends: &[&dyn Backend]) -> Value {
    json!({ "backends": backends.iter().map(|b| backend_json(*b)).collect::<Vec<_>>() })
}

/// The report as text.
pub fn render_text(backends: &[&dyn Backend]) -> String {
    let mut out = String::new();
    for (i, b) in backends.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let kind = b.device_type();
        if !b.is_available() {
            let reason = b
                .unavailable_reason()
                .unwrap_or_else(|| "no reason given".into());
            out.push_str(&format!("{kind}: unavailable: {reason}\n"));
            continue;
        }
        out.push_str(&format!(
            "{kind}: available, {} device(s)\n",
            b.device_count()
        ));
        for d in 0..b.device_count() {
            match b.device_properties(d) {
                Ok(p) => {
                    out.push_str(&format!("  {kind}:{d}  {}\n", p.name));
                    let rows = [
                        ("total memory", format_size(p.total_memory)),
                        ("recommended max", format_size(p.recommended_max_memory)),
                        ("multiprocessors", p.multiprocessor_count.to_string()),
                        ("threads per group", p.max_threads_per_group.to_string()),
                        (
                            "capability",
                            match p.capability {
                                (0, 0) => "not reported by the backend".to_string(),
                                (major, minor) => format!("{major}.{minor}"),
                            },
                        ),
                        (
                            "L2 cache",
                            match p.l2_cache_bytes {
                                0 => "not reported by the backend".to_string(),
                                n => format_size(n),
                            },
                        ),
                        (
                            "host-visible memory",
                            if p.host_visible_memory { "yes" } else { "no" }.to_string(),
                        ),
                    ];
                    for (k, v) in rows {
                        out.push_str(&format!("    {k:<20} {v}\n"));
                    }
                }
                Err(e) => out.push_str(&format!("  {kind}:{d}  properties unavailable: {e}\n")),
            }
        }
        out.push_str("  configuration:\n");
        for line in b.show_config().lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

/// Run `accelrt info`. Unavailable backends are reported, not failures.
pub fn run(args: InfoArgs) -> Result<ExitCode, CliError> {
    let backends = accelrt::registry::backends();
    if args.json {
        println!("{}", report(&backends));
    } else {
        print!("{}", render_text(&backends));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lists_host_available_and_cuda_with_its_reason() {
        let v = report(&accelrt::registry::backends());
        let backends = v["backends"].as_array().expect("backends array");
        let host = backends
            .iter()
            .find(|b| b["name"] == "host")
            .expect("host entry");
        assert_eq!(host["available"], true);
        assert_eq!(host["reason"], Value::Null);
        let n = host["device_count"].as_u64().unwrap();
        assert!(n >= 1);
        let devices = host["devices"].as_array().unwrap();
        assert_eq!(devices.len() as u64, n);
        assert_eq!(devices[0]["index"], 0);
        assert_eq!(devices[0]["host_visible_memory"], true);
        assert!(devices[0]["name"].as_str().is_some_and(|s| !s.is_empty()));

        let cuda = backends
            .iter()
            .find(|b| b["name"] == "cuda")
            .expect("cuda entry");
        if cuda["available"] == true {
            // A machine with a GPU (and the cuda feature): devices are listed.
            assert_eq!(cuda["reason"], Value::Null);
            let n = cuda["device_count"].as_u64().unwrap();
            assert!(n >= 1);
            assert_eq!(cuda["devices"].as_array().unwrap().len() as u64, n);
            assert_eq!(cuda["devices"][0]["host_visible_memory"], false);
            return;
        }
        assert_eq!(cuda["device_count"], 0);
        assert_eq!(cuda["devices"], json!([]));
        let reason = cuda["reason"].as_str().unwrap();
        if cfg!(feature = "cuda") {
            // Built in, but no driver or no device here: the reason says which.
            assert!(
                reason.contains("driver") || reason.contains("device"),
                "{reason}"
            );
        } else {
            assert!(reason.contains("feature `cuda`"), "{reason}");
        }
    }

    #[test]
    fn registered_backends_are_listed_after_the_builtin_ones() {
        register_backends();
        let v = report(&accelrt::registry::backends());
        let names: Vec<&str> = v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap())
            .collect();
        assert_eq!(names[..2], ["host", "cuda"]);
        let fault = v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "fault")
            .expect("the fault backend is listed");
        assert_eq!(fault["builtin"], false);
        assert_eq!(fault["available"], true);
        assert!(fault["devices"][0]["name"]
            .as_str()
            .unwrap()
            .contains("fault injection over host"));
        let text = render_text(&accelrt::registry::backends());
        assert!(text.contains("fault: available"), "{text}");
    }

    #[test]
    fn text_names_every_backend() {
        let text = render_text(&accelrt::registry::backends());
        assert!(text.contains("host: available"), "{text}");
        if cfg!(feature = "cuda") {
            assert!(
                text.contains("cuda: available") || text.contains("cuda: unavailable: "),
                "{text}"
            );
        } else {
            assert!(
                text.contains("cuda: unavailable: accelrt was built without the cuda backend"),
                "{text}"
            );
        }
        assert!(text.contains("ACCELRT_ALLOC_CONF"), "{text}");
    }
}
