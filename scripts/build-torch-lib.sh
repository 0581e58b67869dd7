#!/usr/bin/env bash
# Build libaccelrt_torch.so here (release, no debug info) into .gpu-bin/, next to what
# scripts/gpu-build.sh puts there, for scripts/real-runs.sh on the GPU machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/gpu}
export CARGO_PROFILE_RELEASE_DEBUG=0
export CARGO_PROFILE_RELEASE_STRIP=true
cargo build --release -p accelrt-torch
mkdir -p .gpu-bin
cp "$CARGO_TARGET_DIR/release/libaccelrt_torch.so" .gpu-bin/
