#!/usr/bin/env bash
# accelrt bench on the CUDA backend under several allocator configurations, in one call on the
# GPU machine (carry target/release/accelrt). A short table is printed last; JSON under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/accelrt-gpu-configs}
mkdir -p "$OUT"
BIN=${ACCELRT_BIN:-target/release/accelrt}
configs=("" "expandable_page_mb:20" "expandable_segments:false" "expandable_segments:false,release_at_peak:false")
i=0
for c in "${configs[@]}"; do
    "$BIN" bench --backend cuda --json --alloc-conf "$c" > "$OUT/cuda_$i.json" 2> "$OUT/cuda_$i.err" || echo "config '$c' failed: $(tail -1 "$OUT/cuda_$i.err")"
    i=$((i + 1))
done
python3 - "$OUT" "${#configs[@]}" <<'PY'
import json, os, sys
out, n = sys.argv[1], int(sys.argv[2])
print(f"\n{'config':<50} {'pair ns (512B..1GiB)':<28} {'random 64MiB':<22} {'random 1MiB':<14} {'pinned':<8} {'events':<18}")
for i in range(n):
    try:
        d = json.load(open(os.path.join(out, f"cuda_{i}.json")))
    except Exception as e:
        print(f"config #{i}: no result ({e})"); continue
    pairs = [v for v in d["fast_path_pair_ns"].values()]
    pin = d.get("pinned_pair_ns", {}).get("4096", float("nan"))
    print(f"{d['config']:<50} {min(pairs):6.1f} .. {max(pairs):6.1f}{'':<14} "
          f"{d['random_ns_per_call']:7.1f} ns {d['random_ratio']:.3f}x  {d['random_1mib_ns_per_call']:7.1f} ns  {pin:6.1f}  "
          f"{d.get('event_pooled_vs_raw', float('nan')):.2f}x raw")
PY
