"""Do CUDA's virtual-memory calls wait for queued GPU work?

accelrt's moves and lazy unmaps assume a driver call costs its idle price (tens of
microseconds) even while the GPU is busy. This probe checks that on the GPU machine: each call
(cuMemCreate, cuMemMap, cuMemSetAccess, cuMemUnmap, cuMemRelease, on memory no kernel uses) is
timed once with the GPU idle and once right after about BUSY_MS of matrix products were queued
on PyTorch's stream; a call that waits for the queue costs about the queue's remaining length.

    python3 scripts/vmm_busy_probe.py [REPS]

Prints one line per call and size: idle and busy microseconds, median (min-max) over REPS;
then whether remapping unused memory slows kernels running meanwhile (`gpu_stall`).
"""

import statistics
import sys
import time

import torch

try:
    from cuda.bindings import driver as cu
except ImportError:  # older cuda-python
    from cuda import cuda as cu

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
BUSY_MS = 100.0


def check(res):
    err = res[0] if isinstance(res, tuple) else res
    if int(err) != 0:
        raise SystemExit(f"driver call failed: {err}")
    return res[1] if isinstance(res, tuple) and len(res) == 2 else res


def main():
    torch.cuda.init()
    dev = torch.device("cuda", 0)
    torch.zeros(1, device=dev)  # the primary context, current on this thread
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(8192, 8192, device=dev)
    # Calibrate: how many products make BUSY_MS.
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(4):
        a @ a
    torch.cuda.synchronize()
    per = (time.perf_counter() - t) / 4 * 1e3
    n_busy = max(1, round(BUSY_MS / per))
    print(f"one 8192^2 fp32 product: {per:.2f} ms; {n_busy} queued make the GPU busy ~{n_busy * per:.0f} ms")

    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    gran = check(cu.cuMemGetAllocationGranularity(
        prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
    access = cu.CUmemAccessDesc()
    access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = 0
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE

    def busy():
        for _ in range(n_busy):
            a @ a

    def timed(f, busy_first):
        torch.cuda.synchronize()
        if busy_first:
            busy()
        t = time.perf_counter()
        f()
        dt = (time.perf_counter() - t) * 1e6
        t = time.perf_counter()
        torch.cuda.synchronize()
        left = (time.perf_counter() - t) * 1e3
        return dt, left

    rows = []
    for pages in (1, 32):
        size = gran * pages
        va = check(cu.cuMemAddressReserve(size, 0, 0, 0))
        res = {k: ([], []) for k in ("create", "map", "set_access", "unmap", "release")}
        lefts = []
        for _ in range(REPS):
            for which, busy_first in ((0, False), (1, True)):
                h = None

                def create():
                    nonlocal h
                    h = check(cu.cuMemCreate(size, prop, 0))

                steps = [
                    ("create", create),
                    ("map", lambda: check(cu.cuMemMap(va, size, 0, h, 0))),
                    ("set_access", lambda: check(cu.cuMemSetAccess(va, size, [access], 1))),
                    ("unmap", lambda: check(cu.cuMemUnmap(va, size))),
                    ("release", lambda: check(cu.cuMemRelease(h))),
                ]
                for name, f in steps:
                    dt, left = timed(f, busy_first)
                    res[name][which].append(dt)
                    if busy_first:
                        lefts.append(left)
        check(cu.cuMemAddressFree(va, size))
        for name, (idle, busy_) in res.items():
            fmt = lambda xs: f"{statistics.median(xs):.0f} ({min(xs):.0f}-{max(xs):.0f})"
            rows.append(f"{name} | {size >> 20} MiB | {fmt(idle)} | {fmt(busy_)}")
        print(f"{size >> 20} MiB: GPU work left after the busy calls, ms: "
              f"{statistics.median(lefts):.1f} ({min(lefts):.1f}-{max(lefts):.1f})")
    stall = gpu_stall(cu, prop, access, gran)
    print(f"\ncall | size | idle us | busy us (GPU queue ~{n_busy * per:.0f} ms deep)")
    for r in rows:
        print(r)
    print(stall)


def gpu_stall(cu, prop, access, gran):
    """Does remapping memory no kernel uses slow the kernels running meanwhile? The GPU time
    of a queue of small kernels (CUDA events around it), alone and with the host creating,
    mapping (with access), unmapping and releasing one 2 MiB page per cycle meanwhile."""
    dev = torch.device("cuda", 0)
    x = torch.randn(1 << 25, device=dev)  # 128 MiB: each kernel ~0.1 ms, longer than its launch
    va = check(cu.cuMemAddressReserve(gran, 0, 0, 0))

    def cycle():
        h = check(cu.cuMemCreate(gran, prop, 0))
        check(cu.cuMemMap(va, gran, 0, h, 0))
        check(cu.cuMemSetAccess(va, gran, [access], 1))
        check(cu.cuMemUnmap(va, gran))
        check(cu.cuMemRelease(h))

    def queue(n_kernels, cycles):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(50):  # keep the GPU busy before the timed part
            x.mul_(1.0000001)
        start.record()
        for i in range(n_kernels):
            x.mul_(1.0000001)
            if cycles and i % (n_kernels // cycles) == 0:
                cycle()
        end.record()
        t = time.perf_counter()
        torch.cuda.synchronize()
        return start.elapsed_time(end), (time.perf_counter() - t) * 1e3

    queue(200, 0)
    out = ["\nkernels queued | remap cycles meanwhile | GPU ms for the queue, median (min-max) | host left waiting ms"]
    for cycles in (0, 20, 100, 0, 20, 100):
        gpu, left = zip(*[queue(1000, cycles) for _ in range(REPS)])
        fmt = lambda xs: f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"
        out.append(f"1000 | {cycles} | {fmt(gpu)} | {fmt(left)}")
    check(cu.cuMemAddressFree(va, gran))
    return "\n".join(out)


if __name__ == "__main__":
    main()
