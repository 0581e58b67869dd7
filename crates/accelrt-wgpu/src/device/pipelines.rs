//! The compute pipelines of a device: the WGSL of the fill and byte-patch kernels, compiled
//! once per device (the device keeps them, `DeviceShared::kernels`), and [`pattern_word`],
//! the fill kernel's pattern computed on the host. The GPU work that dispatches them is
//! `kernels.rs`'s.

use super::DeviceShared;

/// The fill kernel: word `i` of the region gets `value` (mode 0) or the pattern word
/// `pattern_word(value, i, rounds)` (mode 1). `rounds` extra mixing rounds per word make the
/// kernel as slow as a test wants.
const FILL_WGSL: &str = r#"
struct Fill {
    first: u32,   // first word to write, counted from the start of the binding
    count: u32,   // words to write
    value: u32,   // the word (mode 0) or the pattern's seed (mode 1)
    mode: u32,
    rounds: u32,
    row: u32,     // invocations per row of the dispatch grid
    base: u32,    // index of this chunk's first word in the whole fill
    pad: u32,
}
@group(0) @binding(0) var<storage, read_write> words: array<u32>;
@group(0) @binding(1) var<uniform> fill: Fill;

fn mix(x: u32) -> u32 {
    var h = x;
    h = h ^ (h >> 16u);
    h = h * 0x7feb352du;
    h = h ^ (h >> 15u);
    h = h * 0x846ca68bu;
    h = h ^ (h >> 16u);
    return h;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * fill.row + gid.x;
    if (i >= fill.count) {
        return;
    }
    var v = fill.value;
    if (fill.mode == 1u) {
        v = mix((fill.base + i) ^ fill.value);
        for (var r = 0u; r < fill.rounds; r = r + 1u) {
            v = mix(v + r);
        }
    }
    words[fill.first + i] = v;
}
"#;

/// The patch kernel: one word keeps the bits of `keep` and gets `bits` (bytes of a write
/// that do not cover the whole word), with atomics so the other bytes of the word are kept
/// whatever else the word holds.
const PATCH_WGSL: &str = r#"
struct Patch {
    word: u32,
    keep: u32,
    bits: u32,
    pad: u32,
}
@group(0) @binding(0) var<storage, read_write> words: array<atomic<u32>>;
@group(0) @binding(1) var<uniform> edit: Patch;

@compute @workgroup_size(1)
fn main() {
    atomicAnd(&words[edit.word], edit.keep);
    atomicOr(&words[edit.word], edit.bits);
}
"#;

/// Workgroup size of the fill kernel.
pub(crate) const FILL_GROUP: u64 = 64;

/// The word the fill kernel writes at index `index` of a pattern fill with `seed`.
pub fn pattern_word(seed: u32, index: u32, rounds: u32) -> u32 {
    let mut v = mix(index ^ seed);
    for r in 0..rounds {
        v = mix(v.wrapping_add(r));
    }
    v
}

fn mix(x: u32) -> u32 {
    let mut h = x;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

/// The compute pipelines of one device.
pub(crate) struct Kernels {
    pub(crate) fill: wgpu::ComputePipeline,
    pub(crate) patch: wgpu::ComputePipeline,
}

impl Kernels {
    /// Compile both kernels; an error carries wgpu's (naga's) text.
    pub(crate) fn new(dev: &DeviceShared) -> std::result::Result<Self, String> {
        let pipeline = |label: &str, source: &str| {
            dev.scoped("wgpu::Device::create_compute_pipeline", || {
                let module = dev
                    .device
                    .create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(label),
                        source: wgpu::ShaderSource::Wgsl(source.into()),
                    });
                dev.device
                    .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some(label),
                        layout: None,
                        module: &module,
                        entry_point: Some("main"),
                        compilation_options: Default::default(),
                        cache: None,
                    })
            })
            .map_err(|e| format!("{label}: {e}"))
        };
        Ok(Kernels {
            fill: pipeline("accelrt fill", FILL_WGSL)?,
            patch: pipeline("accelrt patch", PATCH_WGSL)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_words_differ_by_index_seed_and_rounds() {
        let words: Vec<u32> = (0..64).map(|i| pattern_word(7, i, 0)).collect();
        let distinct: std::collections::HashSet<u32> = words.iter().copied().collect();
        assert_eq!(distinct.len(), 64);
        assert_ne!(pattern_word(7, 3, 0), pattern_word(8, 3, 0));
        assert_ne!(pattern_word(7, 3, 0), pattern_word(7, 3, 1));
        assert_eq!(pattern_word(7, 3, 2), pattern_word(7, 3, 2));
    }
}
