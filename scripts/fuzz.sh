#!/usr/bin/env bash
# Fuzz every accelrt input surface for as long as asked, with random seeds.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     SECONDS per target (default 60), all targets
#
# Builds release binaries, runs `accelrt-fuzz` per target and saves failing inputs under
# fuzz-crashes/TARGET/ (kind-HASH: panic, violation, hang, memory). Replay one with
#   target/release/accelrt-fuzz --replay TARGET fuzz-crashes/TARGET/FILE
# and turn it into a test (crates/accelrt-fuzz/regressions/TARGET/, run by
# crates/accelrt-fuzz/tests/regressions.rs). Exit status 1 when a target found something
# not listed in accelrt_fuzz::KNOWN. The summary lines go to fuzz-crashes/summary.log too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(trace_text trace_gzip snapshot_pickle snapshot_json config cli cabi cabi_threads)
fi

cargo build --release -q -p accelrt-cli -p accelrt-fuzz
export ACCELRT_FUZZ_BIN="$PWD/target/release/accelrt"
mkdir -p fuzz-crashes
status=0
for t in "${targets[@]}"; do
    seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
    # One process per target: a hang or a memory blow-up aborts only that run.
    if ! target/release/accelrt-fuzz "$t" --seconds "$seconds" --seed "$seed" \
        --crashes fuzz-crashes 2> >(grep -v '^accelrt_torch: ' >&2) | tee -a fuzz-crashes/summary.log; then
        status=1
        echo "fuzz.sh: $t found something (or aborted); inputs are in fuzz-crashes/$t/" >&2
    fi
done
exit $status
