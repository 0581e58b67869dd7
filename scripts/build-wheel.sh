#!/usr/bin/env bash
# Build, here, the accelrt_torch wheel the GPU machine installs (it has no cargo): the
# package with libaccelrt_torch.so inside (release, CUDA backend, no debug info), into
# .gpu-bin/ (git-ignored through .git/info/exclude). Run it after scripts/gpu-build.sh, which
# empties .gpu-bin/. There: pip install --no-deps --no-index .gpu-bin/accelrt_torch-*.whl
# (scripts/torch-suite.sh does it in a virtual environment that sees the system's PyTorch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/wheel}
export CARGO_PROFILE_RELEASE_DEBUG=0
export CARGO_PROFILE_RELEASE_STRIP=true
cargo build --release -p accelrt-torch
lib="$CARGO_TARGET_DIR/release/libaccelrt_torch.so"
mkdir -p .gpu-bin
rm -f .gpu-bin/accelrt_torch-*.whl .gpu-bin/accelrt_torch-*.whl
# The library just built goes in as it is (no second cargo run inside pip's build).
ACCELRT_TORCH_PREBUILT="$PWD/$lib" python3 -m pip wheel ./python --no-deps --no-build-isolation \
    -w .gpu-bin 2>/dev/null \
    || ACCELRT_TORCH_PREBUILT="$PWD/$lib" python3 -m pip wheel ./python --no-deps -w .gpu-bin
rm -rf python/build python/*.egg-info
if [ -d .git ] || [ -f .git ]; then
    exclude=$(git rev-parse --git-common-dir)/info/exclude
    grep -qxF '/.gpu-bin/' "$exclude" 2>/dev/null || echo '/.gpu-bin/' >> "$exclude"
fi
ls -la .gpu-bin/accelrt_torch-*.whl
python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); print('\n'.join(n for n in z.namelist() if not n.endswith('/')))" .gpu-bin/accelrt_torch-*.whl
