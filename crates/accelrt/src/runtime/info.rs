//! `show_config`: the backend, its devices, the environment and the allocator
//! configuration as text, which `runtime.rs` forwards here.

use super::*;

impl<D: Driver> Runtime<D> {
    pub(super) fn show_config_impl(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "accelrt {}", env!("CARGO_PKG_VERSION"));
        let vars: Vec<&str> = match self.state() {
            Ok(r) => {
                let (major, minor) = r.core.driver.runtime_version();
                let _ = writeln!(
                    out,
                    "backend: {} (available), runtime {major}.{minor}",
                    D::KIND
                );
                let _ = writeln!(out, "devices: {}", r.core.count);
                for d in 0..r.core.count {
                    match r.core.driver.device_properties(d) {
                        Ok(p) => {
                            let _ = writeln!(
                                out,
                                "  {}:{d}: {}, {} memory, {} cores, capability {}.{}",
                                D::KIND,
                                p.name,
                                format_size(p.total_memory),
                                p.multiprocessor_count,
                                p.capability.0,
                                p.capability.1
                            );
                        }
                        Err(e) => {
                            let _ = writeln!(out, "  {}:{d}: properties unavailable: {e}", D::KIND);
                        }
                    }
                }
                r.core.driver.env_vars().to_vec()
            }
            Err(reason) => {
                let _ = writeln!(out, "backend: {} (unavailable: {reason})", self.kind);
                Vec::new()
            }
        };
        let _ = writeln!(out, "environment:");
        for var in vars.iter().copied().chain([ALLOC_CONF_ENV]) {
            match std::env::var_os(var) {
                Some(v) => {
                    let _ = writeln!(out, "  {var}={}", v.to_string_lossy());
                }
                None => {
                    let _ = writeln!(out, "  {var} (unset)");
                }
            }
        }
        match AllocatorConfig::from_env() {
            Ok(c) => {
                let _ = writeln!(out, "allocator: {}", c.to_conf_string());
            }
            Err(e) => {
                let _ = writeln!(out, "allocator: {e}");
            }
        }
        out
    }
}
