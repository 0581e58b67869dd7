#!/usr/bin/env bash
# One GPU call for what issue 10 and 11 still need measured: the CUDA tests (with
# compute-sanitizer), accelrt bench --backend cuda next to PyTorch's allocator benchmark,
# trace replays on the GPU next to PyTorch replaying the same traces, and the recordings
# (native, expandable_segments and accelrt) the replay's predictions are checked against.
# Build here with scripts/gpu-build.sh and scripts/build-torch-lib.sh; carry .gpu-bin.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/accelrt-gpu-final}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CLI=.gpu-bin/accelrt

# 1. Tests, then sanitizer.
OUT="$OUT" timeout 170 bash scripts/gpu-tests.sh > "$OUT/tests.txt" 2>&1
grep -E "^test-binary|^moves under|ERROR SUMMARY" "$OUT/tests.txt"

# 2. Recordings for the replay's predictions.
OUT="$OUT" bash scripts/real-runs.sh record "${RECORD_SECONDS:-150}" > "$OUT/record.txt" 2>&1
tail -3 "$OUT/record.txt"

# 3. Allocator speed: accelrt on the GPU, PyTorch native and expandable in the same call.
timeout 90 "$CLI" bench --backend cuda --json > "$OUT/bench_cuda.json" 2> "$OUT/bench_cuda.err" || echo "bench failed: $(tail -2 "$OUT/bench_cuda.err")"
for conf in native expandable_segments:True; do
    if [ "$conf" = native ]; then unset PYTORCH_CUDA_ALLOC_CONF; else export PYTORCH_CUDA_ALLOC_CONF=$conf; fi
    echo "== $conf" >> "$OUT/torch_bench.txt"
    timeout 50 python3 scripts/torch_alloc_bench.py >> "$OUT/torch_bench.txt" 2>&1 || echo "torch bench $conf failed"
done
unset PYTORCH_CUDA_ALLOC_CONF

# 4. Replaying the shipped traces on the GPU: accelrt, then PyTorch's allocator.
timeout 60 "$CLI" replay --backend cuda traces/*.trace.gz --json > "$OUT/replay_cuda.jsonl" 2> "$OUT/replay_cuda.err" || echo "replay --backend cuda failed: $(tail -2 "$OUT/replay_cuda.err")"
timeout 60 python3 scripts/torch_replay.py traces/*.trace.gz > "$OUT/torch_replay.txt" 2>&1 || echo "torch replay failed"

# 5. Summary, last.
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
try:
    b = json.load(open(os.path.join(out, "bench_cuda.json")))
    print("accelrt bench --backend cuda:", json.dumps(b)[:1500])
except Exception as e:
    print("bench: none", e)
print(open(os.path.join(out, "torch_bench.txt")).read()[-2500:])
for line in open(os.path.join(out, "replay_cuda.jsonl")):
    try:
        r = json.loads(line)
        print(f"replay cuda {r['trace']:20} {r['ratio']:.4f} {r['seconds']:.3f} s {r['ns_per_call']:.0f} ns/call calls {(r.get('driver_calls') or {}).get('total')}")
    except Exception:
        pass
print(open(os.path.join(out, "torch_replay.txt")).read()[-2000:])
PY
