#!/usr/bin/env bash
# The wgpu backend on the GPU machine, through Vulkan, in one call: which adapters wgpu finds,
# the backend's tests on them (a missing adapter is a failure), `accelrt bench --backend wgpu`,
# and `accelrt replay` of the shipped traces on wgpu next to the host backend (default and
# expandable_segments:false), with a peak comparison printed last. Logs go to $OUT.
#
# The GPU machine has no Rust toolchain and no Vulkan loader: build here with
# scripts/gpu-build.sh (fills .gpu-bin/), put the unpacked-later Debian packages of the loader
# (libvulkan1 and what it needs) in .gl/, then through the device tool:
#     run(command: "bash scripts/gpu-wgpu.sh", carry: [".gpu-bin", ".gl"])
# VK_DRIVER_FILES may name the NVIDIA ICD; without it the usual places are searched.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/accelrt-gpu-wgpu}
mkdir -p "$OUT"
BIN=${ACCELRT_GPU_BIN:-.gpu-bin}
CLI="$BIN/accelrt"
ERR="$OUT/errors.log"
: > "$ERR"
[ -x "$CLI" ] || { echo "no $CLI: build with scripts/gpu-build.sh and carry .gpu-bin" >&2; exit 2; }

# 1. The Vulkan loader (carried as .debs) and the NVIDIA ICD.
if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1'; then
    if compgen -G '.gl/*.deb' > /dev/null; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    else
        echo "no libvulkan.so.1 and no .gl/*.deb to unpack: wgpu will find no Vulkan adapter" | tee -a "$ERR"
    fi
fi
if [ -z "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ]; then
    # A headless machine (no X server): the NVIDIA Vulkan driver must be entered through
    # libEGL_nvidia.so.0. Through libGLX_nvidia.so.0 (what the stock manifest names) the
    # loader reports "Could not get 'vkCreateInstance' via 'vk_icdGetInstanceProcAddr'" and
    # finds no driver (seen on the H200 machine, driver 580.159.04). So describe the EGL entry
    # in a manifest of our own when the library is there.
    if ldconfig -p 2>/dev/null | grep -F 'libEGL_nvidia.so.0' > /dev/null; then
        printf '{"file_format_version": "1.0.0", "ICD": {"library_path": "libEGL_nvidia.so.0", "api_version": "1.3.0"}}\n' \
            > "$OUT/nvidia_icd.json"
        export VK_DRIVER_FILES="$OUT/nvidia_icd.json"
    else
        for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json \
                /etc/vulkan/icd.d/nvidia_icd.json; do
            if [ -f "$icd" ]; then export VK_DRIVER_FILES=$icd; break; fi
        done
    fi
    [ -n "${VK_DRIVER_FILES:-}" ] || echo "no NVIDIA Vulkan driver found (libEGL_nvidia.so.0 or an ICD manifest): wgpu will find no NVIDIA adapter" | tee -a "$ERR"
fi
export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-} VK_ICD_FILENAMES=${VK_ICD_FILENAMES:-} WGPU_BACKEND=$WGPU_BACKEND"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$CLI" info 2>&1
} > "$OUT/machine.txt"
echo "== adapters wgpu found (accelrt info, wgpu section)"
sed -n '/^wgpu:/,/^  configuration:/p' "$OUT/machine.txt"

# 2. The backend's tests (one at a time: they share the device's allocator).
: > "$OUT/tests.log"
for t in "$BIN"/wgpu_*; do
    name=$(basename "$t")
    echo "== $name" >> "$OUT/tests.log"
    if ACCELRT_REQUIRE_WGPU=1 timeout 300 "$t" --nocapture --test-threads=1 >> "$OUT/tests.log" 2>&1; then
        echo "test-binary $name PASS" >> "$OUT/tests.log"
    else
        echo "test-binary $name FAIL (exit $?)" >> "$OUT/tests.log"
    fi
done
grep -E '^test-binary|^test result|^wgpu:[0-9]|GPU .* ms' "$OUT/tests.log"

# 3. Bench and replays.
timeout 300 "$CLI" bench --backend wgpu --json > "$OUT/bench_wgpu.json" 2>> "$ERR" \
    || echo "accelrt bench --backend wgpu failed (exit $?)" | tee -a "$ERR"
timeout 300 "$CLI" bench --backend host --json > "$OUT/bench_host.json" 2>> "$ERR" \
    || echo "accelrt bench --backend host failed (exit $?)" | tee -a "$ERR"
: > "$OUT/replay.jsonl"
timeout 300 "$CLI" replay --backend wgpu traces/*.trace.gz --json >> "$OUT/replay.jsonl" 2>> "$ERR" \
    || echo "accelrt replay --backend wgpu failed (exit $?)" | tee -a "$ERR"
timeout 300 "$CLI" replay --backend host traces/*.trace.gz --alloc-conf '' \
    --alloc-conf expandable_segments:false --json >> "$OUT/replay.jsonl" 2>> "$ERR" \
    || echo "accelrt replay --backend host failed (exit $?)" | tee -a "$ERR"

# 4. The comparison, last.
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception as e:
        print(f"(could not read {name}: {e})")
        return {}
rows = {}
for line in open(os.path.join(out, "replay.jsonl")):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    conf = r.get("config", "")
    key = "wgpu" if r.get("backend") == "wgpu" else ("host plain" if "expandable_segments:false" in conf else "host default")
    rows.setdefault(r.get("trace", "?"), {})[key] = r
print("peaks (GB): trace | allocated wgpu / host | reserved wgpu | host plain segments | host default")
for trace, by in sorted(rows.items()):
    g = lambda k, f: by.get(k, {}).get(f, float("nan")) / 1e9
    same = "same" if by.get("wgpu", {}).get("peak_reserved_bytes") == by.get("host plain", {}).get("peak_reserved_bytes") else "DIFFERENT"
    print(f"{trace} | {g('wgpu','peak_allocated_bytes'):.3f} / {g('host plain','peak_allocated_bytes'):.3f} | "
          f"{g('wgpu','peak_reserved_bytes'):.3f} | {g('host plain','peak_reserved_bytes'):.3f} ({same}) | "
          f"{g('host default','peak_reserved_bytes'):.3f}")
w, h = load("bench_wgpu.json"), load("bench_host.json")
print("device:", w.get("device"))
for k in ["wgpu_event_cycle_vs_submit_poll", "wgpu_fill_event_cycle_vs_fill_submit_poll",
          "wgpu_raw_submit_poll_ns", "wgpu_event_cycle_ns", "wgpu_raw_fill_submit_poll_ns",
          "wgpu_fill_event_cycle_ns", "event_pooled_vs_raw"]:
    print(f"{k}: {w.get(k)}")
for size, ns in sorted(w.get("fast_path_pair_ns", {}).items(), key=lambda kv: int(kv[0])):
    hn = h.get("fast_path_pair_ns", {}).get(size)
    ratio = ns / hn if isinstance(ns, (int, float)) and hn else float("nan")
    print(f"cached pair {size} B: wgpu {ns} ns, host {hn} ns, {ratio:.2f}x")
PY
