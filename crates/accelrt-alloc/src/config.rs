//! Allocator configuration: a builder and the `ACCELRT_ALLOC_CONF` string.
//!
//! The string syntax is PyTorch's `PYTORCH_CUDA_ALLOC_CONF`: `key:value,key:value`, with
//! list values in brackets (`roundup_power2_divisions:[256:1,512:2,>:8]`). Options that mean
//! the same as PyTorch's carry PyTorch's names. Unknown keys and malformed values are errors
//! that name them: nothing is silently ignored.

use crate::error::{AllocError, Result};

/// Environment variable read by [`AllocatorConfig::from_env`].
pub const ALLOC_CONF_ENV: &str = "ACCELRT_ALLOC_CONF";

const MIB: u64 = 1 << 20;

/// Number of size intervals in the round-up table: interval `k` holds sizes in
/// `[2^k MiB, 2^(k+1) MiB)`, with sizes below 1 MiB in interval 0.
pub const ROUNDUP_INTERVALS: usize = 32;

/// The default of `chunk_div` ([`AllocatorConfig::chunk_div`]): once a pool's first cycle is
/// over, new chunks of short runs are at most 1/256 of reserved memory.
pub const DEFAULT_CHUNK_DIV: u64 = 256;

/// The `roundup_power2_divisions` interval of a request: log2 of its size in MiB, from 0
/// (below 2 MiB) to `ROUNDUP_INTERVALS - 1`, as PyTorch indexes its table.
#[inline(always)]
pub fn division_interval(size: u64) -> usize {
    let mb = size >> 20;
    let idx = if mb == 0 {
        0
    } else {
        63 - mb.leading_zeros() as usize
    };
    idx.min(ROUNDUP_INTERVALS - 1)
}

/// How the allocator sizes, splits, caches and limits memory. Build with
/// [`AllocatorConfig::default`], the `with_*` methods, or [`AllocatorConfig::parse`].
#[derive(Debug, Clone, PartialEq)]
pub struct AllocatorConfig {
    /// Cached blocks this large or larger are never split (`max_split_size_mb`). `None`: no limit.
    /// A remedy for plain segments' fragmentation: expandable segments, which reuse pages
    /// rather than address ranges, do not apply it.
    pub max_split_size: Option<u64>,
    /// A request may take an unsplittable cached block at most this much larger
    /// (`max_non_split_rounding_mb`, default 20 MiB).
    pub max_non_split_rounding: u64,
    /// Round-up divisions per power-of-two size interval (`roundup_power2_divisions`);
    /// 0 or 1 rounds to 512 bytes only.
    pub roundup_power2_divisions: [u32; ROUNDUP_INTERVALS],
    /// With a memory fraction set: above this share of the allowed memory, cached blocks are
    /// freed oldest first (`garbage_collection_threshold`, in (0, 1)).
    pub garbage_collection_threshold: Option<f64>,
    /// Carve blocks from reserved address ranges backed by physical pages mapped on demand,
    /// where the backend has virtual memory (`expandable_segments`, default true): pages, not
    /// segments, are reused, which keeps peak reserved within 1% of peak allocated on the
    /// shipped traces (plain segments: 4 to 31% above). Off, or without virtual memory, the
    /// allocator uses plain segments.
    pub expandable_segments: bool,
    /// Physical page size of expandable segments (`expandable_page_mb`; `None`: the device's
    /// granularity, 2 MiB on CUDA). Larger pages mean fewer, cheaper-per-byte page creations
    /// (each is a driver call) at the cost of more memory stranded at block boundaries;
    /// must be a multiple of the device's granularity.
    pub expandable_page_size: Option<u64>,
    /// The physical chunk size of expandable segments (`chunk_mb`; `None`: the largest,
    /// `max_chunk_size`). The allocator halves it by itself when memory lies stranded in
    /// partly used chunks at a new peak. Set below the largest, it is the memory-first mode:
    /// short runs of pages get chunks this size, a long run about 12 chunks of up to the
    /// largest. Smaller chunks strand less memory (a chunk only moves whole) and cost more
    /// driver calls: on the H200, `chunk_mb:4` reserved 0.6-2.8% over allocated on five real
    /// workloads against 1.5-5.7% by default, with steady state 3-14% slower, and made
    /// random churn at the peak 13-22x slower (`BENCHMARKS.md`, "Night of 2026-11-29").
    pub chunk_size: Option<u64>,
    /// The largest physical chunk expandable segments create (`max_chunk_mb`; `None`:
    /// 64 MiB). `max_chunk_mb:2` backs everything with 2 MiB chunks: the least memory
    /// (0.5-1.2% over allocated on the same five) for the most driver calls (steady state up
    /// to 2.2x as long on GPT-2 training).
    pub max_chunk_size: Option<u64>,
    /// Chunks follow reserved memory once a pool's first cycle is over (`chunk_div`, default
    /// [`DEFAULT_CHUNK_DIV`]; `chunk_div:off`, `None`: they never do): from then on, a short
    /// run's new chunks are at most reserved memory / this (at least a page, at most
    /// `chunk_mb`), below the largest chunk a long run is cut into about 12, as in the
    /// memory-first mode, and where memory strands at a new peak the chunk size may halve
    /// down to reserved / this. A small workload then gets small chunks, which strand
    /// little, and a large one keeps larger ones. During the first cycle (while a pool only
    /// grows) chunks keep the fixed size: chunks made while little is reserved would stay
    /// small, and every later move would map them one by one. On the H200 (`BENCHMARKS.md`,
    /// "chunk_div by default"), against `chunk_div:off`: GPT-2 inference 1.012-1.017x
    /// allocated (off: 1.033-1.072), ResNet-50 and ViT 1.010-1.014 (1.008-1.016), GPT-2
    /// training and Llama-style training the same; from the start instead of after the
    /// first cycle, `chunk_div:256` made GPT-2 training's steady state 3-14% slower.
    pub chunk_div: Option<u64>,
    /// Where memory strands in partly used chunks at a new peak, the chunk size halves, never
    /// below reserved memory / this (`halving_div`; `None`: 32), and once a pool's first cycle
    /// is over never below reserved / `chunk_div` either. Finer chunks made during the first
    /// cycle strand less later where smaller blocks reuse their memory, but every move maps
    /// them one by one. On the H200 (`BENCHMARKS.md`, "Llama's 1.02 on the GPU"), 256:
    /// Llama-style training with varying sequence lengths 1.011x allocated instead of 1.029x
    /// at no cost in time, but GPT-2 training's steady state 39% slower (its 1.5 GiB blocks
    /// move every step, then as 2 MiB chunks). Replay a trace under it before using it.
    pub halving_div: Option<u64>,
    /// The share of the time passing, in percent, that moving idle memory (expandable
    /// segments) may take in driver calls (`move_time_pct`; `None`: 10). When moves have used
    /// it up, new memory is created instead until time has passed. Moves save memory and cost
    /// about 60 us of driver calls per chunk; while the device runs behind the CPU they hide
    /// behind its work, but when the CPU is the bottleneck (churn at the peak) they are the
    /// time. 100 lets moves take all of it (on the H200, random churn of blocks up to 64 MiB
    /// then reserved 2.2-2.5% less at up to 1.3x the time, of blocks up to 256 MiB no less at
    /// 5-7x the time); 0 allows only the 25 ms of moves in hand at the start. In the
    /// memory-first mode the share is multiplied by 64 MiB / `chunk_mb`.
    pub move_time_pct: Option<f64>,
    /// Cap on reserved memory as a share of device memory (`per_process_memory_fraction`,
    /// [0, 1] as in PyTorch; 0 allows nothing).
    pub per_process_memory_fraction: Option<f64>,
    /// Hard limit as a ratio of the device's recommended maximum (0 disables, at most 2).
    pub high_watermark_ratio: f64,
    /// Soft limit: above it, cached blocks are released oldest first before a new segment
    /// is taken (0 disables; at most `high_watermark_ratio` when that is set).
    pub low_watermark_ratio: f64,
    /// Before reserved memory grows past its previous peak, give back whole cached segments
    /// (least recently used first) instead of keeping them beside the new one
    /// (`release_at_peak`, default true). Lowers peak reserved memory a lot (GPT-2 training
    /// 1.12 -> 1.06 of allocated, ResNet-50 1.19 -> 1.04) for a few more device calls while
    /// a workload is still setting its peak; a steady loop below its peak never pays.
    pub release_at_peak: bool,
    /// Check the allocator's invariants after every call (slow; for tests and debugging).
    /// Calls on several threads are fine: each check holds the others off until it is done
    /// (so checks serialize the calls around them), and never sees a call half done.
    pub debug_checks: bool,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            max_split_size: None,
            max_non_split_rounding: 20 * MIB,
            roundup_power2_divisions: [0; ROUNDUP_INTERVALS],
            garbage_collection_threshold: None,
            expandable_segments: true,
            expandable_page_size: None,
            chunk_size: None,
            max_chunk_size: None,
            chunk_div: Some(DEFAULT_CHUNK_DIV),
            halving_div: None,
            move_time_pct: None,
            per_process_memory_fraction: None,
            high_watermark_ratio: 0.0,
            low_watermark_ratio: 0.0,
            release_at_peak: true,
            debug_checks: false,
        }
    }
}

/// Longest configuration string accepted, in bytes.
pub const MAX_CONF_LEN: usize = 4096;

impl AllocatorConfig {
    /// The default configuration with `ACCELRT_ALLOC_CONF` applied, if set.
    pub fn from_env() -> Result<Self> {
        match std::env::var(ALLOC_CONF_ENV) {
            Ok(s) => Self::parse(&s).map_err(|e| {
                AllocError::Config(format!("in {ALLOC_CONF_ENV}: {}", e.config_message()))
            }),
            Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Err(std::env::VarError::NotUnicode(_)) => Err(AllocError::Config(format!(
                "{ALLOC_CONF_ENV} is not valid UTF-8"
            ))),
        }
    }

    /// The default configuration with `conf` applied.
    pub fn parse(conf: &str) -> Result<Self> {
        let mut c = Self::default();
        c.apply(conf)?;
        Ok(c)
    }

    /// Apply `key:value,...` on top of this configuration. A string longer than
    /// [`MAX_CONF_LEN`] bytes is refused (every option at once fits in a few hundred).
    pub fn apply(&mut self, conf: &str) -> Result<()> {
        if conf.len() > MAX_CONF_LEN {
            return Err(AllocError::Config(format!(
                "the configuration is {} bytes long, over the {MAX_CONF_LEN} a configuration \
                 may have (every option at once fits in a few hundred): is it the right text?",
                conf.len()
            )));
        }
        for item in split_top_level(conf)? {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let (key, value) = item.split_once(':').ok_or_else(|| {
                AllocError::Config(format!(
                    "option '{item}' has no value: write it as key:value"
                ))
            })?;
            self.set(key.trim(), value.trim())?;
        }
        self.validate()
    }

    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "max_split_size_mb" => {
                let mb = parse_u64(key, value)?;
                if mb == 0 {
                    return Err(bad(key, value, "a size in MiB of at least 1"));
                }
                self.max_split_size = Some(
                    mb.checked_mul(MIB)
                        .ok_or_else(|| bad(key, value, "a size that fits in 64 bits"))?,
                );
            }
            "max_non_split_rounding_mb" => {
                self.max_non_split_rounding = parse_u64(key, value)?
                    .checked_mul(MIB)
                    .ok_or_else(|| bad(key, value, "a size that fits in 64 bits"))?;
            }
            "roundup_power2_divisions" => self.roundup_power2_divisions = parse_divisions(value)?,
            "garbage_collection_threshold" => {
                let t = parse_f64(key, value)?;
                if !(t > 0.0 && t < 1.0) {
                    return Err(bad(key, value, "a number strictly between 0 and 1"));
                }
                self.garbage_collection_threshold = Some(t);
            }
            "expandable_segments" => self.expandable_segments = parse_bool(key, value)?,
            "expandable_page_mb" => {
                let mb = parse_u64(key, value)?;
                if mb == 0 || mb > 1 << 20 {
                    return Err(bad(key, value, "a page size in MiB between 1 and 1048576"));
                }
                self.expandable_page_size = Some(mb * MIB);
            }
            "chunk_mb" | "max_chunk_mb" => {
                let mb = parse_u64(key, value)?;
                if mb == 0 || mb > 1 << 20 {
                    return Err(bad(key, value, "a chunk size in MiB between 1 and 1048576"));
                }
                if key == "chunk_mb" {
                    self.chunk_size = Some(mb * MIB);
                } else {
                    self.max_chunk_size = Some(mb * MIB);
                }
            }
            "chunk_div" => {
                if value.eq_ignore_ascii_case("off") {
                    self.chunk_div = None;
                    return Ok(());
                }
                let div = value
                    .parse::<u64>()
                    .map_err(|_| bad(key, value, "a divisor between 1 and 1048576, or off"))?;
                self.chunk_div = Some(divisor(
                    key,
                    value,
                    div,
                    ", or off (chunk_div:256, the default, keeps new chunks at most 1/256 of \
                     reserved memory)",
                )?);
            }
            "halving_div" => {
                self.halving_div = Some(divisor(
                    key,
                    value,
                    parse_u64(key, value)?,
                    " (halving_div:32, the default, lets chunks halve down to 1/32 of reserved \
                     memory)",
                )?);
            }
            "move_time_pct" => {
                let pct = parse_f64(key, value)?;
                if !(0.0..=100.0).contains(&pct) {
                    return Err(bad(key, value, "a percentage in [0, 100]"));
                }
                self.move_time_pct = Some(pct);
            }
            "per_process_memory_fraction" => {
                let f = parse_f64(key, value)?;
                if !(0.0..=1.0).contains(&f) {
                    return Err(bad(key, value, "a number in [0, 1]"));
                }
                self.per_process_memory_fraction = Some(f);
            }
            "high_watermark_ratio" => {
                let r = parse_f64(key, value)?;
                if !(0.0..=2.0).contains(&r) {
                    return Err(bad(key, value, "a number in [0, 2] (0 disables the limit)"));
                }
                self.high_watermark_ratio = r;
            }
            "low_watermark_ratio" => {
                let r = parse_f64(key, value)?;
                if !(0.0..=2.0).contains(&r) {
                    return Err(bad(
                        key,
                        value,
                        "a number in [0, 2] (0 disables garbage collection)",
                    ));
                }
                self.low_watermark_ratio = r;
            }
            "release_at_peak" => self.release_at_peak = parse_bool(key, value)?,
            "debug_checks" => self.debug_checks = parse_bool(key, value)?,
            _ => {
                return Err(AllocError::Config(format!(
                    "unknown option '{key}'; known options: {}",
                    KNOWN_OPTIONS.join(", ")
                )))
            }
        }
        Ok(())
    }

    /// Check relations between options.
    pub fn validate(&self) -> Result<()> {
        if self.high_watermark_ratio > 0.0 && self.low_watermark_ratio > self.high_watermark_ratio {
            return Err(AllocError::Config(format!(
                "low_watermark_ratio ({}) must not exceed high_watermark_ratio ({})",
                self.low_watermark_ratio, self.high_watermark_ratio
            )));
        }
        if self.garbage_collection_threshold.is_some() && self.per_process_memory_fraction.is_none()
        {
            // PyTorch accepts this but then never collects; say so instead.
            return Err(AllocError::Config(
                "garbage_collection_threshold only acts with per_process_memory_fraction set: add per_process_memory_fraction:F".into(),
            ));
        }
        Ok(())
    }

    /// The configuration as a `key:value` string that [`AllocatorConfig::parse`] accepts.
    pub fn to_conf_string(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = self.max_split_size {
            parts.push(format!("max_split_size_mb:{}", m / MIB));
        }
        if self.max_non_split_rounding != 20 * MIB {
            parts.push(format!(
                "max_non_split_rounding_mb:{}",
                self.max_non_split_rounding / MIB
            ));
        }
        if self.roundup_power2_divisions.iter().any(|&d| d > 1) {
            let list: Vec<String> = self
                .roundup_power2_divisions
                .iter()
                .enumerate()
                .map(|(i, d)| format!("{}:{}", 1u64 << i, d))
                .collect();
            parts.push(format!("roundup_power2_divisions:[{}]", list.join(",")));
        }
        if let Some(t) = self.garbage_collection_threshold {
            parts.push(format!("garbage_collection_threshold:{t}"));
        }
        parts.push(format!("expandable_segments:{}", self.expandable_segments));
        if let Some(p) = self.expandable_page_size {
            parts.push(format!("expandable_page_mb:{}", p / MIB));
        }
        if let Some(c) = self.chunk_size {
            parts.push(format!("chunk_mb:{}", c / MIB));
        }
        if let Some(c) = self.max_chunk_size {
            parts.push(format!("max_chunk_mb:{}", c / MIB));
        }
        match self.chunk_div {
            Some(DEFAULT_CHUNK_DIV) => {}
            Some(d) => parts.push(format!("chunk_div:{d}")),
            None => parts.push("chunk_div:off".into()),
        }
        if let Some(d) = self.halving_div {
            parts.push(format!("halving_div:{d}"));
        }
        if let Some(pct) = self.move_time_pct {
            parts.push(format!("move_time_pct:{pct}"));
        }
        if let Some(f) = self.per_process_memory_fraction {
            parts.push(format!("per_process_memory_fraction:{f}"));
        }
        if self.high_watermark_ratio > 0.0 {
            parts.push(format!(
                "high_watermark_ratio:{}",
                self.high_watermark_ratio
            ));
        }
        if self.low_watermark_ratio > 0.0 {
            parts.push(format!("low_watermark_ratio:{}", self.low_watermark_ratio));
        }
        if !self.release_at_peak {
            parts.push("release_at_peak:false".into());
        }
        if self.debug_checks {
            parts.push("debug_checks:true".into());
        }
        parts.join(",")
    }

    /// Divisions that apply to a request of `size` bytes.
    #[inline]
    pub fn divisions_for(&self, size: u64) -> u32 {
        self.roundup_power2_divisions[division_interval(size)]
    }
}

const KNOWN_OPTIONS: &[&str] = &[
    "max_split_size_mb",
    "max_non_split_rounding_mb",
    "roundup_power2_divisions",
    "garbage_collection_threshold",
    "expandable_segments",
    "expandable_page_mb",
    "chunk_mb",
    "max_chunk_mb",
    "chunk_div",
    "halving_div",
    "move_time_pct",
    "per_process_memory_fraction",
    "high_watermark_ratio",
    "low_watermark_ratio",
    "release_at_peak",
    "debug_checks",
];

fn bad(key: &str, value: &str, expected: &str) -> AllocError {
    AllocError::Config(format!(
        "option '{key}' has value '{value}': expected {expected}"
    ))
}

/// `div` if it is a divisor of reserved memory the allocator takes (1 to 2^20), else the
/// error for option `key`, whose text goes on with `example`.
fn divisor(key: &str, value: &str, div: u64, example: &str) -> Result<u64> {
    if (1..=1 << 20).contains(&div) {
        Ok(div)
    } else {
        Err(bad(
            key,
            value,
            &format!("a divisor between 1 and 1048576{example}"),
        ))
    }
}

fn parse_u64(key: &str, value: &str) -> Result<u64> {
    value
        .parse::<u64>()
        .map_err(|_| bad(key, value, "a non-negative integer"))
}

fn parse_f64(key: &str, value: &str) -> Result<f64> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(bad(key, value, "a finite number")),
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "on" | "yes" => Ok(true),
        "false" | "0" | "off" | "no" => Ok(false),
        _ => Err(bad(key, value, "true or false")),
    }
}

/// Split on commas that are not inside brackets.
fn split_top_level(conf: &str) -> Result<Vec<&str>> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, ch) in conf.char_indices() {
        match ch {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth < 0 {
                    return Err(AllocError::Config(format!(
                        "unbalanced ']' at byte {i} of '{conf}'"
                    )));
                }
            }
            ',' if depth == 0 => {
                out.push(&conf[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(AllocError::Config(format!("unclosed '[' in '{conf}'")));
    }
    out.push(&conf[start..]);
    Ok(out)
}

fn parse_division_count(value: &str) -> Result<u32> {
    let key = "roundup_power2_divisions";
    let d: u32 = value
        .trim()
        .parse()
        .map_err(|_| bad(key, value, "a power of two"))?;
    if d != 0 && !d.is_power_of_two() {
        return Err(bad(key, value, "a power of two (or 0 to disable)"));
    }
    Ok(d)
}

fn parse_divisions(value: &str) -> Result<[u32; ROUNDUP_INTERVALS]> {
    let key = "roundup_power2_divisions";
    let value = value.trim();
    let Some(inner) = value.strip_prefix('[') else {
        return Ok([parse_division_count(value)?; ROUNDUP_INTERVALS]);
    };
    let inner = inner
        .strip_suffix(']')
        .ok_or_else(|| bad(key, value, "a list like [256:1,512:2,>:8]"))?;
    let mut table = [0u32; ROUNDUP_INTERVALS];
    let mut last_set: Option<usize> = None;
    for entry in inner.split(',') {
        let (k, v) = entry
            .split_once(':')
            .ok_or_else(|| bad(key, entry, "an entry SIZE_MB:DIVISIONS or >:DIVISIONS"))?;
        let d = parse_division_count(v)?;
        let k = k.trim();
        if k == ">" {
            let from = last_set.map_or(0, |i| i + 1);
            for slot in table.iter_mut().skip(from) {
                *slot = d;
            }
            last_set = Some(ROUNDUP_INTERVALS - 1);
            continue;
        }
        let mb: u64 = k
            .parse()
            .map_err(|_| bad(key, k, "an interval start in MiB (a power of two)"))?;
        if !mb.is_power_of_two() {
            return Err(bad(
                key,
                k,
                "an interval start in MiB that is a power of two",
            ));
        }
        let idx = mb.trailing_zeros() as usize;
        if idx >= ROUNDUP_INTERVALS {
            return Err(bad(key, k, "an interval start below 2^32 MiB"));
        }
        if let Some(prev) = last_set {
            if idx <= prev {
                return Err(bad(key, k, "interval starts in increasing order"));
            }
            // An interval's divisions hold until the next listed interval.
            let prev_d = table[prev];
            for slot in table.iter_mut().take(idx).skip(prev + 1) {
                *slot = prev_d;
            }
        }
        table[idx] = d;
        last_set = Some(idx);
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pytorch_style_string() {
        let c = AllocatorConfig::parse(
            "max_split_size_mb:128, roundup_power2_divisions:[1:1,256:2,>:8],expandable_segments:true",
        )
        .unwrap();
        assert_eq!(c.max_split_size, Some(128 * MIB));
        assert!(c.expandable_segments);
        assert_eq!(c.divisions_for(512), 1);
        assert_eq!(c.divisions_for(300 * MIB), 2);
        assert_eq!(c.divisions_for(600 * MIB), 8);
        let again = AllocatorConfig::parse(&c.to_conf_string()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn chunk_options_parse_and_round_trip() {
        assert_eq!(AllocatorConfig::default().max_chunk_size, None);
        let c = AllocatorConfig::parse("max_chunk_mb:4,chunk_mb:2").unwrap();
        assert_eq!(
            (c.chunk_size, c.max_chunk_size),
            (Some(2 * MIB), Some(4 * MIB))
        );
        assert!(c.to_conf_string().contains("chunk_mb:2,max_chunk_mb:4"));
        assert_eq!(AllocatorConfig::parse(&c.to_conf_string()).unwrap(), c);
        assert_eq!(
            AllocatorConfig::default().chunk_div,
            Some(DEFAULT_CHUNK_DIV)
        );
        assert!(!AllocatorConfig::default()
            .to_conf_string()
            .contains("chunk_div"));
        for (conf, div, canonical) in [
            ("chunk_div:256", Some(256), None),
            ("chunk_div:64", Some(64), Some("chunk_div:64")),
            ("chunk_div:off", None, Some("chunk_div:off")),
            ("chunk_div:OFF", None, Some("chunk_div:off")),
        ] {
            let c = AllocatorConfig::parse(conf).unwrap();
            assert_eq!(c.chunk_div, div, "{conf}");
            let text = c.to_conf_string();
            match canonical {
                Some(part) => assert!(text.contains(part), "{conf}: {text}"),
                None => assert!(!text.contains("chunk_div"), "{conf}: {text}"),
            }
            assert_eq!(AllocatorConfig::parse(&text).unwrap(), c, "{conf}");
        }
    }

    #[test]
    fn halving_div_parses_and_round_trips() {
        assert_eq!(AllocatorConfig::default().halving_div, None);
        assert!(!AllocatorConfig::default()
            .to_conf_string()
            .contains("halving_div"));
        for (conf, div) in [("halving_div:256", 256), ("halving_div:1", 1)] {
            let c = AllocatorConfig::parse(conf).unwrap();
            assert_eq!(c.halving_div, Some(div), "{conf}");
            let text = c.to_conf_string();
            assert!(text.contains(conf), "{conf}: {text}");
            assert_eq!(AllocatorConfig::parse(&text).unwrap(), c, "{conf}");
        }
    }

    #[test]
    fn move_time_pct_parses_and_round_trips() {
        assert_eq!(AllocatorConfig::default().move_time_pct, None);
        for (conf, pct) in [
            ("move_time_pct:0", 0.0),
            ("move_time_pct:2.5", 2.5),
            ("move_time_pct:100", 100.0),
        ] {
            let c = AllocatorConfig::parse(conf).unwrap();
            assert_eq!(c.move_time_pct, Some(pct), "{conf}");
            assert_eq!(AllocatorConfig::parse(&c.to_conf_string()).unwrap(), c);
        }
    }

    #[test]
    fn single_division_value_applies_everywhere() {
        let c = AllocatorConfig::parse("roundup_power2_divisions:4").unwrap();
        assert!(c.roundup_power2_divisions.iter().all(|&d| d == 4));
    }

    #[test]
    fn bad_input_names_the_problem() {
        let cases = [
            ("bogus:1", "unknown option 'bogus'"),
            (
                "max_split_size_mb:abc",
                "'max_split_size_mb' has value 'abc'",
            ),
            ("max_split_size_mb", "has no value"),
            ("expandable_segments:maybe", "true or false"),
            ("per_process_memory_fraction:1.5", "[0, 1]"),
            ("high_watermark_ratio:3", "[0, 2]"),
            ("roundup_power2_divisions:3", "power of two"),
            ("roundup_power2_divisions:[256:1", "unclosed '['"),
            ("roundup_power2_divisions:[512:1,256:2]", "increasing order"),
            (
                "garbage_collection_threshold:0.5",
                "per_process_memory_fraction",
            ),
            (
                "high_watermark_ratio:1.0,low_watermark_ratio:1.5",
                "must not exceed",
            ),
            ("max_split_size_mb:99999999999999999", "fits in 64 bits"),
            ("max_chunk_mb:0", "between 1 and 1048576"),
            ("max_chunk_mb:2097152", "between 1 and 1048576"),
            ("max_chunk_mb:-2", "'max_chunk_mb' has value '-2'"),
            ("chunk_mb:0", "'chunk_mb' has value '0'"),
            ("chunk_div:0", "a divisor between 1 and 1048576"),
            ("chunk_div:99999999999", "a divisor between 1 and 1048576"),
            ("chunk_div:1.5", "'chunk_div' has value '1.5'"),
            ("halving_div:0", "a divisor between 1 and 1048576"),
            ("halving_div:2097152", "a divisor between 1 and 1048576"),
            ("halving_div:off", "'halving_div' has value 'off'"),
            ("move_time_pct:101", "a percentage in [0, 100]"),
            ("move_time_pct:-1", "a percentage in [0, 100]"),
            ("move_time_pct:NaN", "a finite number"),
            ("move_time_pct:inf", "a finite number"),
            ("move_time_pct:fast", "'move_time_pct' has value 'fast'"),
        ];
        for (conf, expected) in cases {
            let err = AllocatorConfig::parse(conf).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{conf}: got '{err}', want '{expected}'"
            );
        }
    }
}
