#!/usr/bin/env bash
# The CUDA tests on the GPU machine, a missing GPU being a failure, then the memory-safety
# ones again under compute-sanitizer (memcheck). Build here with scripts/gpu-build.sh, then
# through the device tool with `carry: [".gpu-bin"]`:  bash scripts/gpu-tests.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/accelrt-gpu-tests}
mkdir -p "$OUT"
BIN=${ACCELRT_GPU_BIN:-.gpu-bin}
: > "$OUT/tests.log"
for t in "$BIN"/cuda_*; do
    name=$(basename "$t")
    echo "== $name" >> "$OUT/tests.log"
    start=$SECONDS
    if ACCELRT_REQUIRE_GPU=1 timeout 240 "$t" --nocapture >> "$OUT/tests.log" 2>&1; then
        echo "test-binary $name PASS ($((SECONDS - start)) s)" | tee -a "$OUT/tests.log"
    else
        echo "test-binary $name FAIL (exit $?, $((SECONDS - start)) s)" | tee -a "$OUT/tests.log"
    fi
done
grep -E "^moves under|^record_stream|^control" "$OUT/tests.log"
# compute-sanitizer: every device access of the moves and virtual-memory tests checked.
: > "$OUT/sanitizer.log"
for name in cuda_moves cuda_vmm; do
    [ -x "$BIN/$name" ] || continue
    echo "== $name" >> "$OUT/sanitizer.log"
    ACCELRT_REQUIRE_GPU=1 ACCELRT_MOVES_TRIALS=300 timeout 80 compute-sanitizer --tool memcheck \
        --leak-check no --error-exitcode 99 "$BIN/$name" --nocapture >> "$OUT/sanitizer.log" 2>&1
    rc=$?
    echo "sanitizer $name exit $rc; $(grep -c 'Invalid\|Error' "$OUT/sanitizer.log") error lines so far" | tee -a "$OUT/sanitizer.log"
done
grep -E "ERROR SUMMARY" "$OUT/sanitizer.log"
grep -E "FAIL|panicked" "$OUT/tests.log" | head -20
