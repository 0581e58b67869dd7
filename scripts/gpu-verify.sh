#!/usr/bin/env bash
# One short GPU call to check a change: the CUDA tests (a missing GPU is a failure), the
# moves test under compute-sanitizer, and `accelrt bench --backend cuda` of this build
# interleaved with a baseline build (before/after in one run) next to PyTorch's allocator
# timed the same way. Build here first:
#     bash scripts/gpu-build.sh --no-wgpu [--base BASELINE_ACCELRT_BINARY]
# then through the device tool, with `carry: [".gpu-bin"]`:  bash scripts/gpu-verify.sh
# Logs go to $OUT; the summary table is printed last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/accelrt-gpu-verify}
mkdir -p "$OUT"
BIN=.gpu-bin
REPS=${REPS:-2}

# 1. The CUDA tests, then the moves test under memcheck.
: > "$OUT/tests.log"
for t in "$BIN"/cuda_*; do
    name=$(basename "$t")
    start=$SECONDS
    if ACCELRT_REQUIRE_GPU=1 timeout 120 "$t" --nocapture >> "$OUT/tests.log" 2>&1; then
        echo "test-binary $name PASS ($((SECONDS - start)) s)" >> "$OUT/summary.txt"
    else
        echo "test-binary $name FAIL (exit $?, $((SECONDS - start)) s)" >> "$OUT/summary.txt"
    fi
done
grep -E "^moves under|^record_stream|^control" "$OUT/tests.log" >> "$OUT/summary.txt"
if [ -x "$BIN/cuda_moves" ]; then
    ACCELRT_REQUIRE_GPU=1 ACCELRT_MOVES_TRIALS=${SANITIZER_TRIALS:-150} timeout 90 \
        compute-sanitizer --tool memcheck --leak-check no --error-exitcode 99 \
        "$BIN/cuda_moves" --nocapture > "$OUT/sanitizer.log" 2>&1
    echo "sanitizer cuda_moves exit $?: $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)" >> "$OUT/summary.txt"
fi

# 2. Allocator speed, baseline and this build interleaved (quick runs), then PyTorch.
for rep in $(seq "$REPS"); do
    for b in accelrt-base accelrt; do
        [ -x "$BIN/$b" ] || continue
        timeout 60 "$BIN/$b" bench --backend cuda --quick --json > "$OUT/bench_${b}_$rep.json" 2>> "$OUT/bench.err"
    done
done
# PyTorch at the quick runs' length: random workloads of 20,000 operations, mostly growth.
timeout 100 python3 scripts/torch_alloc_bench.py --ops 20000 > "$OUT/torch_bench.txt" 2>&1 || echo "torch bench failed" >> "$OUT/summary.txt"

# 3. The table, last.
python3 - "$OUT" <<'PY' >> "$OUT/summary.txt"
import glob, json, os, sys
out = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    try:
        b = json.load(open(f))
    except Exception as e:
        print(f"{os.path.basename(f)}: unreadable ({e})")
        continue
    name = os.path.basename(f)[len("bench_"):].rsplit("_", 1)[0]
    pairs = b["fast_path_pair_ns"]
    r = b["random"]
    rows.setdefault(name, []).append(
        " ".join(f"{pairs[k]:.0f}" for k in sorted(pairs, key=int))
        + " | rand1MiB %.0f | rand64MiB %.0f (%.3fx) | rand256MiB %.0f"
        % (r["1000_live_1MiB"]["ns_per_call"], r["1000_live_64MiB"]["ns_per_call"],
           r["1000_live_64MiB"]["ratio"], r["200_live_256MiB"]["ns_per_call"]))
print("pairs ns (512 B, 4 KiB, 1 MiB, 2 MiB, 20 MiB, 64 MiB, 1 GiB) | random ns/call (quick: 20,000 operations each, PyTorch below at the same length)")
for name, rs in rows.items():
    for r in rs:
        print(f"{name:13} {r}")
for line in open(os.path.join(out, "torch_bench.txt")):
    if line.startswith("torch "):
        print(line.strip()[:400])
PY
cat "$OUT/summary.txt"
