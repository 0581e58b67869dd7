#!/usr/bin/env bash
# Build, here, what scripts/gpu-verify.sh runs on the GPU machine: the `accelrt` CLI (CUDA,
# no wgpu: minutes instead of a quarter of an hour on 2 cores) and the `cuda_*` test
# executables, release mode, stripped, into .gpu-bin/ (ignored by git through
# .git/info/exclude). With an argument, that binary (an `accelrt` CLI built from another
# commit) is copied in stripped as `accelrt-base`, the baseline gpu-verify.sh benches against.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/gpu}
export CARGO_PROFILE_RELEASE_DEBUG=0
export CARGO_PROFILE_RELEASE_STRIP=true
cargo build --release -p accelrt-cli
tests=$(cargo test --release --no-run -p accelrt --test 'cuda_*' --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in t.get("kind", []) \
            and t.get("name", "").startswith("cuda_"):
        print(m["executable"])
')
[ -n "$tests" ] || { echo "no cuda_* test executables were built" >&2; exit 1; }
rm -rf .gpu-bin
mkdir -p .gpu-bin
cp "$CARGO_TARGET_DIR/release/accelrt" .gpu-bin/
for t in $tests; do
    name=$(basename "$t")
    cp "$t" ".gpu-bin/${name%-*}"
done
if [ $# -ge 1 ]; then
    strip -o .gpu-bin/accelrt-base "$1"
fi
du -sh .gpu-bin
