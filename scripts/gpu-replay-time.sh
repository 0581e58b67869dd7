#!/usr/bin/env bash
# Replaying the shipped traces on the GPU: accelrt (`accelrt replay --backend cuda`, cuMemAlloc /
# virtual memory on device 0) and PyTorch's native allocator (scripts/torch_replay.py, with
# Python in its loop), interleaved, REPS times each. Build here first (`bash
# scripts/gpu-build.sh --no-wgpu`), then through the device tool, with `carry: [".gpu-bin"]`:
#     bash scripts/gpu-replay-time.sh [REPS]
# Whole-trace seconds, median (min-max); the table is printed last, logs go to $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/accelrt-replay-time}
mkdir -p "$OUT"
REPS=${1:-3}
for r in $(seq "$REPS"); do
    timeout 120 .gpu-bin/accelrt replay --backend cuda --json traces/*.trace.gz > "$OUT/cuda_replay_$r.jsonl" 2>> "$OUT/replay.err"
    PYTORCH_CUDA_ALLOC_CONF= timeout 120 python3 scripts/torch_replay.py traces/*.trace.gz > "$OUT/torch_replay_$r.txt" 2>> "$OUT/replay.err"
done
python3 - "$OUT" <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]
acc, tor = {}, {}
for f in glob.glob(os.path.join(out, "cuda_replay_*.jsonl")):
    for line in open(f):
        if line.strip():
            d = json.loads(line)
            acc.setdefault(d["trace"], []).append(d)
for f in glob.glob(os.path.join(out, "torch_replay_*.txt")):
    for line in open(f):
        if line.startswith("torch_replay "):
            d = json.loads(line[len("torch_replay "):])
            tor.setdefault(d["trace"].removesuffix(".trace.gz"), []).append(d["us_per_call"] * d["ops"] / 1e6)
def spread(xs):
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})" if xs else "-"
print("trace | accelrt on the GPU: seconds | ratio | driver calls | PyTorch native: seconds")
for t in sorted(acc):
    a = acc[t]
    print(f"{t} | {spread([d['seconds'] for d in a])} | {a[0]['ratio']:.4f} | "
          f"{a[0]['driver_calls']['total']} | {spread(tor.get(t, []))}")
PY
