#!/usr/bin/env bash
# PyTorch on accelrt, on the GPU machine, in one call: GPT-2 124M and ResNet-50 trained for
# $STEPS steps on PyTorch's native allocator (twice: the run-to-run spread) and on accelrt
# (libaccelrt_torch.so through accelrt_torch.enable()), each run its own process with the
# same seed and deterministic settings; then accelrt's features (torch.cuda.memory_stats,
# CUDA graphs, MemPool, a forced out-of-memory, record_stream, snapshots) and what PyTorch
# does without the C++ shim. The comparison table is printed last; logs go to $OUT.
#
# The GPU machine has no Rust toolchain: build here first,
#     cargo build --release -p accelrt-torch
# then through the device tool:
#     run(command: "bash scripts/torch-verify.sh", carry: ["target/release/libaccelrt_torch.so"])
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/accelrt-torch-verify}
STEPS=${STEPS:-20}
mkdir -p "$OUT"
export ACCELRT_TORCH_LIB=${ACCELRT_TORCH_LIB:-$PWD/target/release/libaccelrt_torch.so}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/accelrt-torch-extensions}
[ -f "$ACCELRT_TORCH_LIB" ] || {
    echo "no $ACCELRT_TORCH_LIB: build it with 'cargo build --release -p accelrt-torch' and carry it" >&2
    exit 2
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "cores: $(nproc)"
    grep -m1 'model name' /proc/cpuinfo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    python3 -c 'import torch, torchvision, torch.utils.cpp_extension as c; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, "CUDA_HOME", c.CUDA_HOME)' 2>&1
    echo "library: $ACCELRT_TORCH_LIB ($(stat -c %s "$ACCELRT_TORCH_LIB") bytes)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

# 1. Features first: it also builds the C++ shim, which the accelrt training runs reuse.
timeout 420 python3 scripts/torch_verify.py features --out "$OUT/features.json" \
    --snapshot "$OUT/snapshot.pickle" > "$OUT/features.log" 2>&1 \
    || echo "features run failed (exit $?)" | tee -a "$OUT/features.log"
grep -E '^\[(ok|FAIL)\]' "$OUT/features.log" || tail -20 "$OUT/features.log"
timeout 120 python3 scripts/torch_verify.py plain-oom --out "$OUT/plain_oom.json" >> "$OUT/features.log" 2>&1 \
    || echo "plain-oom run failed (exit $?)" | tee -a "$OUT/features.log"

# 2. Training: native; accelrt as accelrt_torch.enable() sets it up ("default"), with
#    accelrt's own release_at_peak ("steal") and with plain segments ("plain"); native again
#    (the second native run measures the run-to-run spread and brackets the accelrt runs in
#    time). gpt2-math is GPT-2 with the math attention kernel, whose backward is
#    deterministic (the fused ones are not under warn_only): its losses must match exactly.
: > "$OUT/runs.jsonl"
: > "$OUT/train.log"
for model in gpt2 gpt2-math resnet50; do
    runs="native:a accelrt:default accelrt:steal accelrt:plain native:b"
    [ "$model" = gpt2-math ] && runs="native:a accelrt:default native:b"
    for run in $runs; do
        allocator=${run%%:*}
        tag=${run##*:}
        echo "== $model $allocator $tag" >> "$OUT/train.log"
        timeout 300 python3 scripts/torch_verify.py train --model "$model" --allocator "$allocator" \
            --tag "$tag" --steps "$STEPS" --out "$OUT/runs.jsonl" >> "$OUT/train.log" 2>&1 \
            || echo "train $model $allocator $tag failed (exit $?)" | tee -a "$OUT/train.log"
        tail -1 "$OUT/train.log"
    done
done

# 3. The comparison table, last.
python3 scripts/torch_verify.py summary "$OUT" 2>&1 | tee "$OUT/summary.txt"
