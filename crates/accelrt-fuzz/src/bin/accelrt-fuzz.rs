//! `accelrt-fuzz`: run the fuzz targets for as long as asked (see `scripts/fuzz.sh`).
//!
//! ```text
//! accelrt-fuzz [TARGET|all]... [--seconds N] [--cases N] [--seed S] [--crashes DIR]
//!              [--memory-mib N]
//! accelrt-fuzz --replay TARGET FILE...     run saved inputs once each
//! accelrt-fuzz --list
//! ```
//! Exit status 1 when a run found something not listed in `accelrt_fuzz::KNOWN`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use accelrt_fuzz::targets::{by_name, ALL};
use accelrt_fuzz::{fuzz, run_one, Budget};

fn usage() -> ExitCode {
    eprintln!(
        "usage: accelrt-fuzz [TARGET|all]... [--seconds N] [--cases N] [--seed S] \
         [--crashes DIR] [--memory-mib N]\n       accelrt-fuzz --replay TARGET FILE...\n       \
         accelrt-fuzz --list\ntargets: {}",
        ALL.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--list") {
        for t in ALL {
            println!("{:16} {}", t.name, t.about);
        }
        return ExitCode::SUCCESS;
    }
    if args.first().map(String::as_str) == Some("--replay") {
        let Some(target) = args.get(1).and_then(|n| by_name(n)) else {
            return usage();
        };
        let mut failed = false;
        for file in &args[2..] {
            let input = match std::fs::read(file) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("{file}: {e}");
                    return ExitCode::from(2);
                }
            };
            match run_one(target, &input) {
                Ok(sig) => println!("{file}: ok ({sig})"),
                Err((kind, message)) => {
                    failed = true;
                    println!("{file}: {kind:?}: {message}");
                }
            }
        }
        return if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    let mut names = Vec::new();
    let mut seconds = 10u64;
    let mut cases = None;
    let mut seed = None;
    let mut crashes = PathBuf::from("fuzz-crashes");
    let mut memory_mib = 4096u64;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| it.next().ok_or_else(|| format!("{a} needs {what}"));
        let parsed = match a.as_str() {
            "--seconds" => value("a number")
                .and_then(|v| v.parse().map_err(|e| format!("--seconds {v}: {e}")))
                .map(|v| seconds = v),
            "--cases" => value("a number")
                .and_then(|v| v.parse().map_err(|e| format!("--cases {v}: {e}")))
                .map(|v| cases = Some(v)),
            // Decimal, or hexadecimal with 0x as the summaries print seeds.
            "--seed" => value("a number")
                .and_then(|v| {
                    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
                        Some(hex) => u64::from_str_radix(hex, 16),
                        None => v.parse(),
                    }
                    .map_err(|e| format!("--seed {v}: {e} (decimal, or hexadecimal after 0x)"))
                })
                .map(|v| seed = Some(v)),
            "--crashes" => value("a folder").map(|v| crashes = PathBuf::from(v)),
            "--memory-mib" => value("a number")
                .and_then(|v| v.parse().map_err(|e| format!("--memory-mib {v}: {e}")))
                .map(|v| memory_mib = v),
            "all" => {
                names.extend(ALL.iter().map(|t| t.name.to_string()));
                Ok(())
            }
            name if by_name(name).is_some() => {
                names.push(name.to_string());
                Ok(())
            }
            other => Err(format!("unknown argument '{other}'")),
        };
        if let Err(e) = parsed {
            eprintln!("accelrt-fuzz: {e}");
            return usage();
        }
    }
    if names.is_empty() {
        return usage();
    }
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut unknown = 0;
    for name in names {
        let target = by_name(&name).expect("checked above");
        let report = fuzz(
            target,
            seed,
            Budget {
                cases,
                time: Duration::from_secs(seconds),
            },
            Some(&crashes),
            memory_mib << 20,
        );
        println!("{}", report.summary());
        for f in &report.findings {
            println!(
                "  {:?}{}: {} (input {} bytes, saved to {:?})",
                f.kind,
                f.known.map_or(String::new(), |k| format!(" [known: {k}]")),
                f.message.chars().take(300).collect::<String>(),
                f.input.len(),
                f.saved
            );
        }
        unknown += report.unknown_findings().count();
    }
    if unknown > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
