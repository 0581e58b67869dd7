#!/usr/bin/env bash
# Build, here, what scripts/gpu-check.sh and scripts/gpu-wgpu.sh run on the GPU machine (which
# has no Rust toolchain): the `accelrt` CLI (with the wgpu backend), the `cuda_*` test
# executables (with the `test-kernels` feature) and the wgpu backend's test executables (`wgpu_conformance`, `wgpu_backend`),
# release mode without debug info (they travel: the device tool carries at most 64 MiB),
# copied into .gpu-bin/ (ignored by git through .git/info/exclude). Then, through the device
# tool:
#     run(command: "bash scripts/gpu-check.sh", carry: [".gpu-bin"])
#     run(command: "bash scripts/gpu-wgpu.sh", carry: [".gpu-bin", ".gl"])
#
# Options: --no-wgpu (the CLI and the cuda_* tests only: minutes instead of a quarter of an
# hour on 2 cores, for scripts/gpu-verify.sh); --base BIN (copy BIN, an `accelrt` CLI built
# from another commit, stripped, as .gpu-bin/accelrt-base: the baseline gpu-verify.sh benches
# this build against, interleaved).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/gpu}
export CARGO_PROFILE_RELEASE_DEBUG=0
export CARGO_PROFILE_RELEASE_STRIP=true

WGPU=1
BASE=
while [ $# -gt 0 ]; do
    case "$1" in
        --no-wgpu) WGPU=0; shift ;;
        --base) BASE=$2; shift 2 ;;
        *) echo "usage: $0 [--no-wgpu] [--base ACCELRT_BINARY]" >&2; exit 2 ;;
    esac
done

if [ "$WGPU" = 1 ]; then
    cargo build --release -p accelrt-cli --features wgpu
else
    cargo build --release -p accelrt-cli
fi
# Test executables named $2* of package $1 (extra cargo arguments after), one path a line.
test_executables() {
    local package=$1 prefix=$2
    shift 2
    cargo test --release --no-run -p "$package" "$@" --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in t.get("kind", []) \
            and t.get("name", "").startswith(sys.argv[1]):
        print(m["executable"])
' "$prefix"
}
# With the test kernels (feature `test-kernels`): most cuda_* tests need real device work.
tests=$(test_executables accelrt cuda_ --test 'cuda_*' --features test-kernels)
[ -n "$tests" ] || { echo "no cuda_* test executables were built" >&2; exit 1; }
wgpu_tests=
if [ "$WGPU" = 1 ]; then
    wgpu_tests=$(test_executables accelrt-wgpu '')
    [ -n "$wgpu_tests" ] || { echo "no accelrt-wgpu test executables were built" >&2; exit 1; }
fi

rm -rf .gpu-bin
mkdir -p .gpu-bin
cp "$CARGO_TARGET_DIR/release/accelrt" .gpu-bin/
for t in $tests; do
    name=$(basename "$t")
    cp "$t" ".gpu-bin/${name%-*}"
done
for t in $wgpu_tests; do
    name=$(basename "$t")
    name=${name%-*}
    case $name in wgpu_*) ;; *) name="wgpu_$name" ;; esac
    cp "$t" ".gpu-bin/$name"
done
if [ -n "$BASE" ]; then
    strip -o .gpu-bin/accelrt-base "$BASE"
fi
if [ -d .git ]; then
    mkdir -p .git/info
    grep -qxF '/.gpu-bin/' .git/info/exclude 2>/dev/null || echo '/.gpu-bin/' >> .git/info/exclude
fi
ls -la .gpu-bin
du -sh .gpu-bin
