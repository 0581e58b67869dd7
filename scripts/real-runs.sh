#!/usr/bin/env bash
# Real runs on the GPU machine (issue 10's harness): PyTorch native, PyTorch
# expandable_segments:True and accelrt on the same work, one process per run, interleaved,
# at least 3 repetitions; and the recordings `accelrt replay` checks its predictions against.
#
# Build here first (the GPU machine has no Rust toolchain):
#     bash scripts/gpu-build.sh && bash scripts/build-torch-lib.sh
# then through the device tool, with `carry: [".gpu-bin"]`:
#     bash scripts/real-runs.sh matrix [REPS] [SECONDS] [ARGS]  # the tables, printed last: every
#         run's figures, then issue 10's targets against PyTorch in the same call
#         ARGS for real_runs.py matrix, e.g. --variant base=.gpu-bin/libaccelrt_torch-base.so,
#         or --breakdown (where accelrt's overhead lay at its last new peak; costs time)
#     bash scripts/real-runs.sh record [SECONDS] [ARGS]    # v2 traces -> $OUT/recorded-*.tar
#         ARGS for real_runs.py record, e.g. --workloads gpt2_train --configs accelrt
# Logs and results go to $OUT (matrix.jsonl, recorded.jsonl). Each matrix row keeps every
# step's time (`step_ms`), and accelrt's rows its driver calls in the steady state (from the
# third step) and the time of their virtual-memory calls (`steady_vm_call_ms`).
# --variant-conf NAME=CONF runs the same build under another ACCELRT_ALLOC_CONF (e.g.
# nomove=release_at_peak:false).
# Whether virtual-memory calls wait for queued GPU work or slow kernels down:
#     python3 scripts/probe_vmm_busy.py
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/accelrt-real-runs}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/python:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
export ACCELRT_TORCH_LIB="$PWD/.gpu-bin/libaccelrt_torch.so"
export ACCELRT_BIN="$PWD/.gpu-bin/accelrt"
export TORCH_EXTENSIONS_DIR=/tmp/accelrt-torch-ext
export PYTHONUNBUFFERED=1
[ -f "$ACCELRT_TORCH_LIB" ] || { echo "no $ACCELRT_TORCH_LIB: run scripts/build-torch-lib.sh and carry .gpu-bin" >&2; exit 2; }

# The C++ shim is compiled once per machine (about a minute), then loaded by every run.
if ! timeout 240 python3 -m accelrt_torch --build-shim > "$OUT/shim.log" 2>&1; then
    echo "building the shim failed:"; tail -30 "$OUT/shim.log"; exit 1
fi
grep -iE "shim|torch|cuda" "$OUT/shim.log" | head -5

case "${1:-matrix}" in
matrix)
    reps=${2:-3}
    secs=${3:-480}
    shift $(( $# < 3 ? $# : 3 ))  # the rest goes to real_runs.py (--workloads, --configs, --variant)
    timeout "$secs" python3 scripts/real_runs.py matrix "$OUT" --reps "$reps" "$@" > "$OUT/matrix.log" 2>&1
    python3 scripts/real_runs.py table "$OUT"
    ;;
record)
    secs=${2:-480}
    shift $(( $# < 2 ? $# : 2 ))  # the rest goes to real_runs.py (--workloads, --configs)
    # One process at a time, as users run: three at once on one GPU recorded different runs
    # (2026-11-30 12:46 UTC: Llama 1.0245x allocated against 1.031 alone, ResNet-50 1.010
    # against 1.014-1.020), and a replay under another configuration keeps the recording's
    # timing. `--parallel N` after the seconds still overrides it.
    timeout "$secs" python3 scripts/real_runs.py record "$OUT/traces" --parallel 1 "$@" > "$OUT/record.log" 2>&1
    tail -5 "$OUT/record.log"
    cp "$OUT/traces/recorded.jsonl" "$OUT/" 2>/dev/null
    for c in accelrt pytorch-native pytorch-expandable; do
        (cd "$OUT/traces" && tar -cf "$OUT/recorded-$c.tar" $(ls *."$c".trace.gz 2>/dev/null))
    done
    ls -la "$OUT/traces" | tail -40
    ;;
*)
    echo "usage: real-runs.sh matrix [REPS] [SECONDS] [real_runs.py matrix options] | record [SECONDS] [real_runs.py record options]" >&2; exit 2 ;;
esac
