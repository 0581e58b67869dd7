#!/usr/bin/env python3
"""Where a real run's time goes: one of `real_runs.py`'s workloads under one allocator, its
steady steps under `torch.profiler`, on the GPU machine. Prints one JSON line: the steps'
wall time, how long the GPU was busy (the union of kernel intervals) and the kernels' sum, and
the operators with the most host time of their own (an allocation's host time counts in the
operator that asked for it, e.g. `aten::empty_strided`).

    python3 scripts/profile_run.py WORKLOAD CONFIG [--steps 12] [--profiled 9]

CONFIG: native | expandable | accelrt | accelrt:CONF (accelrt under ACCELRT_ALLOC_CONF=CONF,
e.g. accelrt:release_at_peak:false). Environment as for real_runs.py (ACCELRT_TORCH_LIB,
PYTHONPATH with python/ and scripts/); e.g. through the device tool, after real-runs.sh built
the shim:

    PYTHONPATH=python:scripts ACCELRT_TORCH_LIB=$PWD/.gpu-bin/libaccelrt_torch.so \\
        python3 scripts/profile_run.py llama_varlen_train accelrt
"""
import argparse
import json
import os
import random
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workload")
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--profiled", type=int, default=9, help="the last PROFILED steps are profiled")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    config, _, conf = args.config.partition(":")
    if config == "expandable":
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    elif config not in ("native", "accelrt"):
        raise SystemExit(f"unknown config {args.config!r}: native | expandable | accelrt[:CONF]")
    if conf:
        os.environ["ACCELRT_ALLOC_CONF"] = conf
    import torch
    from torch.profiler import ProfilerActivity, profile

    if config == "accelrt":
        import accelrt_torch

        accelrt_torch.enable()
    import real_runs

    torch.manual_seed(0)
    steps = real_runs.steps_of(args.workload, args.steps, random.Random(0))
    next(steps)  # set up
    warm = max(args.steps - args.profiled, 0)
    for _ in range(warm):
        next(steps)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in steps:
            pass
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy, start, end = 0, None, None
    for s, e in sorted((k.time_range.start, k.time_range.end) for k in kernels):
        if end is None or s > end:
            busy += (end - start) if end is not None else 0
            start, end = s, e
        else:
            end = max(end, e)
    busy += (end - start) if end is not None else 0
    top = sorted(prof.key_averages(), key=lambda k: -k.self_cpu_time_total)[: args.top]
    print(json.dumps({
        "workload": args.workload, "config": args.config, "profiled_steps": args.steps - warm,
        "wall_ms": round(wall_ms, 1), "gpu_busy_ms": round(busy / 1e3, 1),
        "kernel_sum_ms": round(sum(k.device_time_total for k in kernels) / 1e3, 1), "kernels": len(kernels),
        "host_self_ms": [[k.key, k.count, round(k.self_cpu_time_total / 1e3, 2)] for k in top],
    }))


if __name__ == "__main__":
    sys.exit(main())
