#!/usr/bin/env bash
# Build, here, what scripts/gpu-check.sh and scripts/gpu-wgpu.sh run on the GPU machine (which
# has no Rust toolchain): the `accelrt` CLI (with the wgpu backend), the `cuda_*` test
# executables and the wgpu backend's test executables (`wgpu_conformance`, `wgpu_backend`),
# release mode without debug info (they travel: the device tool carries at most 64 MiB),
# copied into .gpu-bin/ (ignored by git through .git/info/exclude). Then, through the device
# tool:
#     run(command: "bash scripts/gpu-check.sh", carry: [".gpu-bin"])
#     run(command: "bash scripts/gpu-wgpu.sh", carry: [".gpu-bin", ".gl"])
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/gpu}
export CARGO_PROFILE_RELEASE_DEBUG=0
export CARGO_PROFILE_RELEASE_STRIP=true

cargo build --release -p accelrt-cli --features wgpu
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
tests=$(test_executables accelrt cuda_ --test 'cuda_*')
[ -n "$tests" ] || { echo "no cuda_* test executables were built" >&2; exit 1; }
wgpu_tests=$(test_executables accelrt-wgpu '')
[ -n "$wgpu_tests" ] || { echo "no accelrt-wgpu test executables were built" >&2; exit 1; }

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
if [ -d .git ]; then
    mkdir -p .git/info
    grep -qxF '/.gpu-bin/' .git/info/exclude 2>/dev/null || echo '/.gpu-bin/' >> .git/info/exclude
fi
ls -la .gpu-bin
du -sh .gpu-bin
