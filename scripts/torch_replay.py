"""Replay v1 allocator traces (traces/FORMAT.md) through PyTorch's own CUDA caching allocator.

Runs on the GPU machine (python3 with torch). Each `a ID BYTES STREAM` becomes
`torch.cuda.caching_allocator_alloc(BYTES, 0, stream)`, each `f ID` a
`torch.cuda.caching_allocator_delete`; stream 0 is the default stream, every other number a
stream of its own. The allocator configuration is whatever PYTORCH_CUDA_ALLOC_CONF says
(set it before starting: e.g. `expandable_segments:True`); run once per configuration.

Prints one JSON object per trace, prefixed with `torch_replay `: peak reserved and peak
allocated bytes as PyTorch counts them, the peak of live requested bytes, and microseconds per
call (Python is in this loop, so the time is not comparable with accelrt's ns per call; the
peaks are).

Usage: python3 scripts/torch_replay.py traces/*.trace.gz
"""
import gzip
import json
import os
import sys
import time

import torch


def read_trace(path):
    opener = gzip.open if path.endswith(".gz") else open
    ops = []
    with opener(path, "rt") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if parts[0] == "a" and len(parts) == 4:
                ops.append((True, int(parts[1]), int(parts[2]), int(parts[3])))
            elif parts[0] == "f" and len(parts) == 2:
                ops.append((False, int(parts[1]), 0, 0))
            else:
                raise ValueError(f"{path}:{number}: not a v1 trace event: {line!r}")
    return ops


def replay(path):
    ops = read_trace(path)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    streams = {0: torch.cuda.default_stream(0)}
    live = {}
    requested = peak_requested = 0
    sizes = {}
    t0 = time.perf_counter()
    for is_alloc, ident, size, stream in ops:
        if is_alloc:
            s = streams.get(stream)
            if s is None:
                s = streams[stream] = torch.cuda.Stream(0)
            live[ident] = torch.cuda.caching_allocator_alloc(size, 0, s) if size > 0 else None
            sizes[ident] = size
            requested += size
            peak_requested = max(peak_requested, requested)
        else:
            ptr = live.pop(ident)
            requested -= sizes.pop(ident)
            if ptr is not None:
                torch.cuda.caching_allocator_delete(ptr)
    seconds = time.perf_counter() - t0
    reserved = torch.cuda.max_memory_reserved(0)
    allocated = torch.cuda.max_memory_allocated(0)
    for ptr in live.values():
        if ptr is not None:
            torch.cuda.caching_allocator_delete(ptr)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return {
        "trace": os.path.basename(path),
        "conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "native") or "native",
        "ops": len(ops),
        "peak_reserved_bytes": reserved,
        "peak_allocated_bytes": allocated,
        "peak_requested_bytes": peak_requested,
        "ratio_reserved_to_requested": round(reserved / max(1, peak_requested), 4),
        "us_per_call": round(seconds * 1e6 / max(1, len(ops)), 3),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
    }


def main(paths):
    if not paths:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    torch.empty(1, device="cuda")
    failed = 0
    for path in paths:
        try:
            print("torch_replay " + json.dumps(replay(path)), flush=True)
        except Exception as e:  # report and go on with the other traces
            failed += 1
            print(f"torch_replay error {path}: {e}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
