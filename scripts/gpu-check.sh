#!/usr/bin/env bash
# The CUDA backend on the GPU machine, in one call: its tests (a missing GPU is a failure),
# `accelrt bench --backend cuda`, `accelrt replay` of the shipped traces on the host and on
# the GPU, and PyTorch's own figures for the same work (its caching allocator benchmark and
# the same traces replayed through it, native and with expandable_segments). A comparison
# table is printed last; logs go to $OUT.
#
# The GPU machine has no Rust toolchain: build here first with scripts/gpu-build.sh (fills
# .gpu-bin/), then run through the device tool with `carry: [".gpu-bin"]`:
#     bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/accelrt-gpu-check}
mkdir -p "$OUT"
BIN=${ACCELRT_GPU_BIN:-.gpu-bin}
CLI="$BIN/accelrt"
ERR="$OUT/errors.log"
: > "$ERR"
[ -x "$CLI" ] || { echo "no $CLI: build with scripts/gpu-build.sh and carry .gpu-bin" >&2; exit 2; }

{
    echo "date: $(date -u +%FT%TZ)"
    echo "cores: $(nproc)"
    grep -m1 'model name' /proc/cpuinfo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$CLI" info 2>&1
} > "$OUT/machine.txt"
sed -n '1,6p' "$OUT/machine.txt"

# 1. The GPU tests: every cuda_* executable, with a missing GPU a failure.
: > "$OUT/tests.log"
for t in "$BIN"/cuda_*; do
    name=$(basename "$t")
    echo "== $name" >> "$OUT/tests.log"
    if ACCELRT_REQUIRE_GPU=1 timeout 300 "$t" --nocapture >> "$OUT/tests.log" 2>&1; then
        echo "test-binary $name PASS" >> "$OUT/tests.log"
    else
        echo "test-binary $name FAIL (exit $?)" >> "$OUT/tests.log"
    fi
done
grep -E '^test-binary|^test result' "$OUT/tests.log"

# 2. accelrt on the GPU, then the host replay for the peak-reserved comparison.
timeout 300 "$CLI" bench --backend cuda --json > "$OUT/bench_cuda.json" 2>> "$ERR" \
    || echo "accelrt bench --backend cuda failed (exit $?)" | tee -a "$ERR"
: > "$OUT/replay.jsonl"
for backend in cuda host; do
    timeout 300 "$CLI" replay --backend "$backend" traces/*.trace.gz --alloc-conf '' \
        --alloc-conf expandable_segments:true --json >> "$OUT/replay.jsonl" 2>> "$ERR" \
        || echo "accelrt replay --backend $backend failed (exit $?)" | tee -a "$ERR"
done

# 3. PyTorch in the same call: its allocator benchmark and the same traces, native and
#    with expandable segments (the configuration is read once, at CUDA initialisation).
: > "$OUT/torch.txt"
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>> "$ERR"; then
    for conf in native expandable_segments:True; do
        if [ "$conf" = native ]; then unset PYTORCH_CUDA_ALLOC_CONF; else export PYTORCH_CUDA_ALLOC_CONF=$conf; fi
        PYTHONUNBUFFERED=1 timeout 300 python3 scripts/torch_alloc_bench.py >> "$OUT/torch.txt" 2>> "$ERR" \
            || echo "torch_alloc_bench.py ($conf) failed" | tee -a "$ERR"
        PYTHONUNBUFFERED=1 timeout 300 python3 scripts/torch_replay.py traces/*.trace.gz >> "$OUT/torch.txt" 2>> "$ERR" \
            || echo "torch_replay.py ($conf) failed" | tee -a "$ERR"
    done
    unset PYTORCH_CUDA_ALLOC_CONF
else
    echo "torch with CUDA not found: the PyTorch columns stay empty" | tee -a "$ERR"
fi

# 4. The comparison table, last.
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
nan = float("nan")

def read_json(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception as e:
        print(f"(could not read {name}: {e})")
        return {}

def lines(name, prefix=""):
    try:
        for line in open(os.path.join(out, name)):
            if line.startswith(prefix):
                try:
                    yield json.loads(line[len(prefix):])
                except ValueError:
                    pass
    except FileNotFoundError:
        return

bench = read_json("bench_cuda.json")
torch_bench, torch_replay = {}, {}
for d in lines("torch.txt", "torch "):
    conf = "native" if d.get("conf", "native") == "native" else "expandable"
    tb = torch_bench.setdefault(conf, {})
    if "fast_path_pair_ns" in d:
        tb["pairs"] = d["fast_path_pair_ns"]
    if "random" in d:
        r = d["random"]
        tb[(r["live"], r["max_size"])] = r
for d in lines("torch.txt", "torch_replay "):
    conf = "native" if d["conf"] == "native" else "expandable"
    torch_replay[(d["trace"], conf)] = d
replays = {}
for d in lines("replay.jsonl"):
    replays[(os.path.basename(d["file"]), d.get("backend", "host"), d["config"])] = d

def ok(cond):
    return "ok" if cond else "MISSED"

tests = [l.strip() for l in open(os.path.join(out, "tests.log")) if l.startswith("test-binary")]
print("\n== accelrt CUDA backend on", bench.get("device", "?"), "| torch", next((d.get("torch") for d in lines("torch.txt", "torch ") if "torch" in d), "?"))
print("tests:", "; ".join(t.replace("test-binary ", "") for t in tests) or "none ran")

print("\n== cached alloc+free pair, median ns (target <= 60 at every size)")
print(f"{'size':>12} {'accelrt':>9} {'torch':>9} {'torch-exp':>10}")
pairs = bench.get("fast_path_pair_ns") or {}
for size, ns in pairs.items():
    tn = torch_bench.get("native", {}).get("pairs", {}).get(size, nan)
    te = torch_bench.get("expandable", {}).get("pairs", {}).get(size, nan)
    print(f"{size:>12} {ns:>9.1f} {tn:>9} {te:>10}")
print("  all sizes <= 60 ns:", ok(bool(pairs) and max(pairs.values()) <= 60))

print("\n== random workload, ns per call and peak reserved / peak allocated")
for key, (live, mx), target in [("1000_live_64MiB", (1000, 64 << 20), 150), ("1000_live_1MiB", (1000, 1 << 20), None), ("200_live_256MiB", (200, 256 << 20), None)]:
    a = (bench.get("random") or {}).get(key, {})
    tn = torch_bench.get("native", {}).get((live, mx), {})
    te = torch_bench.get("expandable", {}).get((live, mx), {})
    line = f"  {key:>16}: accelrt {a.get('ns_per_call', nan):7.1f} ns {a.get('ratio', nan):.3f}x | torch {tn.get('ns_per_call', nan)} ns {tn.get('ratio', nan)}x | torch-exp {te.get('ns_per_call', nan)} ns {te.get('ratio', nan)}x"
    if target:
        line += f"   (target <= {target} ns: {ok(a.get('ns_per_call', 1e9) <= target)})"
    print(line)

print("\n== events (ns)")
cyc, raw = bench.get("event_pooled_cycle_ns"), bench.get("event_raw_record_query_ns")
ratio = bench.get("event_pooled_vs_raw")
print(f"  pooled acquire+record+query+release {cyc} | raw cuEventRecord+cuEventQuery {raw} | ratio {ratio} (target <= 1.15: {ok(ratio is not None and ratio <= 1.15)})")
print(f"  acquire+release {bench.get('event_acquire_release_ns')} | id-API record+query {bench.get('event_record_query_ns')}")
if bench.get("event_bench_error"):
    print("  event bench error:", bench["event_bench_error"])

print("\n== trace replay: peak reserved (GB); cuda must equal host and be <= torch")
gb = lambda b: f"{b / 1e9:.3f}" if isinstance(b, (int, float)) else "-"
traces = sorted({k[0] for k in replays})
for conf, tconf in [("default", "native"), ("expandable_segments:true", "expandable")]:
    print(f"  accelrt {conf} vs torch {tconf}:")
    print(f"    {'trace':<28} {'host':>8} {'cuda':>8} {'torch':>8} {'cuda ns/call':>12}  checks")
    for t in traces:
        h = replays.get((t, "host", conf), {})
        c = replays.get((t, "cuda", conf), {})
        tr = torch_replay.get((t, tconf), {})
        hr, cr, trr = h.get("peak_reserved_bytes"), c.get("peak_reserved_bytes"), tr.get("peak_reserved_bytes")
        checks = f"cuda==host {ok(hr is not None and hr == cr)}, cuda<=torch {ok(cr is not None and trr is not None and cr <= trr)}"
        if c.get("error"):
            checks += f", error: {c['error']}"
        print(f"    {t:<28} {gb(hr):>8} {gb(cr):>8} {gb(trr):>8} {c.get('ns_per_call', nan):>12.1f}  {checks}")
errs = open(os.path.join(out, "errors.log")).read().strip()
if errs:
    print("\n(errors.log is not empty: see it for", len(errs.splitlines()), "lines)")
PY
