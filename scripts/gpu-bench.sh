#!/usr/bin/env bash
# Benchmarks that need the GPU machine: accelrt's allocator on its 16 cores (multi-thread
# scaling) and PyTorch's CUDA caching allocator timed in the same call, side by side.
#
# Build here first (the GPU machine has no Rust toolchain):
#     cargo build --release -p accelrt-cli
# then run through the device tool with `carry: ["target/release/accelrt"]`:
#     bash scripts/gpu-bench.sh
# Logs go to $OUT (the device tool brings them back); a short table is printed last.
set -uo pipefail
OUT=${OUT:-/tmp/accelrt-gpu-bench}
mkdir -p "$OUT"
BIN=${ACCELRT_BIN:-target/release/accelrt}
[ -x "$BIN" ] || { echo "no $BIN: build with 'cargo build --release -p accelrt-cli' and carry it" >&2; exit 2; }

{ echo "cores: $(nproc)"; grep -m1 'model name' /proc/cpuinfo; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null; } | tee "$OUT/machine.txt"

"$BIN" bench --json --threads 8 > "$OUT/bench_t8.json" 2> "$OUT/bench_t8.err"
"$BIN" bench --json --threads 16 > "$OUT/bench_t16.json" 2> "$OUT/bench_t16.err"
"$BIN" replay traces/*.trace.gz --json > "$OUT/replay.jsonl" 2> "$OUT/replay.err"

if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    PYTHONUNBUFFERED=1 python3 scripts/torch_alloc_bench.py > "$OUT/torch_native.txt" 2> "$OUT/torch_native.err"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 \
        python3 scripts/torch_alloc_bench.py > "$OUT/torch_expandable.txt" 2> "$OUT/torch_expandable.err"
else
    echo "torch with CUDA not found: PyTorch columns will be empty" | tee "$OUT/torch_native.err"
fi

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception as e:
        print(f"(could not read {name}: {e})"); return {}
def torch_lines(name):
    res = {}
    try:
        for line in open(os.path.join(out, name)):
            if line.startswith("torch "):
                d = json.loads(line[6:])
                if "fast_path_pair_ns" in d: res["pairs"] = d["fast_path_pair_ns"]
                if "random" in d: res[(d["random"]["live"], d["random"]["max_size"])] = d["random"]
    except FileNotFoundError:
        pass
    return res
t8, t16 = load("bench_t8.json"), load("bench_t16.json")
tn, te = torch_lines("torch_native.txt"), torch_lines("torch_expandable.txt")
print("\n== cached alloc+free pair, median ns (accelrt vs PyTorch native / expandable, same machine)")
print(f"{'size':>12} {'accelrt':>9} {'torch':>9} {'torch-exp':>10}")
for size, ns in (t8.get("fast_path_pair_ns") or {}).items():
    print(f"{size:>12} {ns:>9.1f} {tn.get('pairs', {}).get(size, float('nan')):>9} {te.get('pairs', {}).get(size, float('nan')):>10}")
print("\n== random workload, ns per call (ratio = peak reserved / peak allocated)")
r = t8.get("random_ns_per_call"); r1 = t8.get("random_1mib_ns_per_call")
def fmt(d):
    return f"{d.get('ns_per_call', float('nan'))} ns, {d.get('ratio', float('nan'))}x" if d else "-"
print(f"  1000 live, 1 B..64 MiB: accelrt {r} ns, {t8.get('random_ratio', '?')}x | torch {fmt(tn.get((1000, 64 << 20)))} | torch-exp {fmt(te.get((1000, 64 << 20)))}")
print(f"  1000 live, 1 B..1 MiB:  accelrt {r1} ns | torch {fmt(tn.get((1000, 1 << 20)))} | torch-exp {fmt(te.get((1000, 1 << 20)))}")
print("\n== threads, one stream each (4 KiB pairs)")
for t in (t8, t16):
    m = t.get("multi_thread") or {}
    print(f"  {m.get('threads')} threads: {m.get('pairs_per_sec_total', 0):,.0f} pairs/s total, single {m.get('single_thread_pairs_per_sec', 0):,.0f}, scaling {m.get('scaling', 0):.2f}x")
print("\n== events: acquire+release", t8.get("event_acquire_release_ns"), "ns; record+query", t8.get("event_record_query_ns"), "ns")
PY
