#!/usr/bin/env python3
"""Do the CUDA virtual-memory calls wait for the GPU? Times cuMemCreate, cuMemMap,
cuMemSetAccess, cuMemUnmap and cuMemRelease of one 2 MiB and one 64 MiB handle, first with
the device idle, then while a kernel keeps the device busy for about 300 ms (torch.cuda._sleep
on the current stream), and says whether the stream was still busy after each call (a call
that waited for the GPU takes about the kernel's time and finds the stream done). Then
whether remapping memory no kernel uses slows the kernels running meanwhile (`gpu_stall`),
whether they slow the host's kernel launches after them (`launch_cost`), whether many
mappings in the process slow the host's work on other memory (`host_cost_by_mappings`:
cuDNN attention, GEMMs, pointer queries), what one set-access and one unmap cost over 1 to
64 handles at once and what event calls cost (`call_costs`), and whether
kernels run slower on memory mapped from small physical handles than on
cudaMalloc's (`kernel_speed`: a random gather, which the GPU's address translation limits,
a streaming read over 4 GiB, and bf16 GEMMs on operands in different handles).

    python3 scripts/probe_vmm_busy.py              # on the GPU machine; prints tables, then JSON
    python3 scripts/probe_vmm_busy.py call_costs   # only the call costs (a few seconds)
"""
import json
import statistics
import sys
import time

import torch

try:
    from cuda.bindings import driver as cu
except ImportError:  # older cuda-python
    from cuda import cuda as cu


def check(r):
    err = r[0] if isinstance(r, tuple) else r
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver error {err}")
    return r[1] if isinstance(r, tuple) and len(r) == 2 else r


def main():
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # the primary context is current from here
    dev = torch.cuda.current_device()
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = dev
    access = cu.CUmemAccessDesc()
    access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = dev
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    stream = torch.cuda.current_stream()
    costs = call_costs(prop, access)
    print("handles in one range | set-access us | unmap us | map us per handle  (median (min-max) of 7)")
    for n, kinds in costs["by_handles"].items():
        cells = " | ".join(f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})" for v in kinds.values())
        print(f"{n} | {cells}")
    print("event call | us per call, median (min-max) of 7 batches")
    for name, v in costs["events"].items():
        print(f"{name} | {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})")
    print("probe " + json.dumps({"call_costs": costs}))
    if sys.argv[1:] == ["call_costs"]:
        return
    # About 300 ms of spinning: calibrate the cycles once.
    t = time.perf_counter(); torch.cuda._sleep(100_000_000); torch.cuda.synchronize()
    cycles = int(100_000_000 * 0.3 / (time.perf_counter() - t))
    rows = []
    for size in (2 << 20, 64 << 20):
        va = check(cu.cuMemAddressReserve(size, 0, 0, 0))
        for busy in (False, True, False, True, False, True):
            if busy:
                torch.cuda._sleep(cycles)
            times, still_busy = {}, {}
            def timed(name, f):
                t0 = time.perf_counter()
                r = f()
                times[name] = (time.perf_counter() - t0) * 1e6
                still_busy[name] = not stream.query()
                return r
            h = timed("create", lambda: check(cu.cuMemCreate(size, prop, 0)))
            timed("map", lambda: check(cu.cuMemMap(va, size, 0, h, 0)))
            timed("set_access", lambda: check(cu.cuMemSetAccess(va, size, [access], 1)))
            timed("unmap", lambda: check(cu.cuMemUnmap(va, size)))
            timed("release", lambda: check(cu.cuMemRelease(h)))
            torch.cuda.synchronize()
            rows.append({"size_mib": size >> 20, "busy": busy, "us": times, "stream_still_busy_after": still_busy})
        check(cu.cuMemAddressFree(va, size))
    print("size | device | create us | map us | set_access us | unmap us | release us  (busy after? y/n)")
    for r in rows:
        cells = " | ".join(f"{r['us'][k]:.0f} ({'y' if r['stream_still_busy_after'][k] else 'n'})"
                           for k in ("create", "map", "set_access", "unmap", "release"))
        print(f"{r['size_mib']} MiB | {'busy' if r['busy'] else 'idle'} | {cells}")
    stall = gpu_stall(prop, access)
    print("\nremap cycles while 1,000 kernels run | GPU ms for the kernels, median (min-max) of 5")
    for cycles, ms in stall.items():
        print(f"{cycles} | {statistics.median(ms):.2f} ({min(ms):.2f}-{max(ms):.2f})")
    launch = launch_cost(prop, access)
    print("\nremap cycles among 4,000 small ops (host-bound) | host ms for the ops, less the remap calls' own time, median (min-max) of 5 | the remap calls' own ms")
    for cycles, (ms, calls_ms) in launch.items():
        print(f"{cycles} | {statistics.median(ms):.2f} ({min(ms):.2f}-{max(ms):.2f}) | {statistics.median(calls_ms):.2f}")
    mapped_many = host_cost_by_mappings(prop, access)
    print("\nother 2 MiB mappings in the process | host ms of 200 cuDNN attention forwards | of 200 bf16 GEMMs | of 2,000 pointer-attribute queries  (median (min-max) of 5)")
    for n, kinds in mapped_many.items():
        cells = " | ".join(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in kinds.values())
        print(f"{n} | {cells}")
    speed = kernel_speed(prop, access)
    print("\n4 GiB backed by | random gather ms | streaming read ms | 50 bf16 GEMMs ms  (median (min-max) of 7)")
    for name, kinds in speed.items():
        cells = " | ".join(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in kinds.values())
        print(f"{name} | {cells}")
    for r in rows:
        print("probe " + json.dumps(r))
    print("probe " + json.dumps({"gpu_ms_by_remap_cycles": stall}))
    print("probe " + json.dumps({"kernel_ms_by_backing": speed}))
    print("probe " + json.dumps({"host_ms_by_remap_cycles": {c: v[0] for c, v in launch.items()}}))
    print("probe " + json.dumps({"host_ms_by_other_mappings": mapped_many}))


class _Raw:
    """A device pointer as a torch tensor (`__cuda_array_interface__`), float32."""

    def __init__(self, ptr, nbytes):
        self.__cuda_array_interface__ = {"shape": (nbytes // 4,), "typestr": "<f4",
                                         "data": (int(ptr), False), "version": 3}


def kernel_speed(prop, access, total=4 << 30, reps=7):
    """Kernel time on 4 GiB from cudaMalloc (PyTorch's allocator) and from virtual memory mapped
    in handles of 2 MiB, 64 MiB and 1 GiB, interleaved. Returns {backing: {kind: [ms]}}."""
    mapped = []

    def vmm(handle):
        va = check(cu.cuMemAddressReserve(total, 0, 0, 0))
        handles = []
        for off in range(0, total, handle):
            h = check(cu.cuMemCreate(handle, prop, 0))
            check(cu.cuMemMap(int(va) + off, handle, 0, h, 0))
            handles.append(h)
        check(cu.cuMemSetAccess(va, total, [access], 1))
        mapped.append((va, handles, handle))
        return torch.as_tensor(_Raw(int(va), total), device="cuda")

    backings = {"cudaMalloc (PyTorch)": torch.empty(total // 4, device="cuda")}
    for handle in (2 << 20, 64 << 20, 1 << 30):
        backings[f"VMM, {handle >> 20} MiB handles"] = vmm(handle)
    n = total // 4
    idx = torch.randint(0, n, (1 << 26,), device="cuda")
    for t in backings.values():
        t.fill_(1.0)

    def timed(f):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)

    # A training step's kind of kernel too: 50 bf16 GEMMs the size of a Llama MLP's (8,192 x
    # 768 by 768 x 2,048), their operands a GiB apart, so they lie in different handles.
    m, k, nn = 8192, 768, 2048

    def operands(t):
        h = t.view(torch.bfloat16)
        gib = (1 << 30) // 2
        return (h[:m * k].view(m, k), h[gib:gib + k * nn].view(k, nn), h[2 * gib:2 * gib + m * nn].view(m, nn))

    def gemms(a, b, c):
        for _ in range(50):
            torch.matmul(a, b, out=c)

    out = {name: {"gather": [], "read": [], "gemm": []} for name in backings}
    for rep in range(reps + 1):
        for name, t in backings.items():  # interleaved
            g = timed(lambda: t[idx].sum())
            r = timed(lambda: t.sum())
            a, b, c = operands(t)
            a.normal_(); b.normal_()
            mm = timed(lambda: gemms(a, b, c))
            if rep:  # the first round warms up
                out[name]["gather"].append(g)
                out[name]["read"].append(r)
                out[name]["gemm"].append(mm)
    del backings
    torch.cuda.synchronize()
    for va, handles, handle in mapped:
        check(cu.cuMemUnmap(va, total))
        for h in handles:
            check(cu.cuMemRelease(h))
        check(cu.cuMemAddressFree(va, total))
    return out


def gpu_stall(prop, access, reps=5):
    """Does remapping memory no kernel uses slow the kernels running meanwhile? The GPU time
    (CUDA events) of 1,000 element-wise kernels on 128 MiB (each longer than its launch, so the
    host stays ahead), with 0, 20 or 100 create-map-access-unmap-release cycles of another
    2 MiB page made by the host meanwhile. Returns {cycles: [ms per repetition]}."""
    size = 2 << 20
    x = torch.randn(1 << 25, device="cuda")
    va = check(cu.cuMemAddressReserve(size, 0, 0, 0))

    def cycle():
        h = check(cu.cuMemCreate(size, prop, 0))
        check(cu.cuMemMap(va, size, 0, h, 0))
        check(cu.cuMemSetAccess(va, size, [access], 1))
        check(cu.cuMemUnmap(va, size))
        check(cu.cuMemRelease(h))

    def queue(kernels, cycles):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(50):  # the device busy before the timed part
            x.mul_(1.0000001)
        start.record()
        for i in range(kernels):
            x.mul_(1.0000001)
            if cycles and i % (kernels // cycles) == 0:
                cycle()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    queue(200, 0)  # warm-up
    out = {c: [] for c in (0, 20, 100)}
    for _ in range(reps):
        for c in out:  # interleaved
            out[c].append(queue(1000, c))
    check(cu.cuMemAddressFree(va, size))
    return out


def host_cost_by_mappings(prop, access, reps=5):
    """Does the number of virtual-memory mappings in the process slow the host's work on
    other memory (a driver lookup that grows with them)? The host time (no synchronize inside)
    of 200 cuDNN attention forwards (8 x 12 x 512 x 64, bf16), of 200 bf16 GEMMs (2,048 x 768
    by 768 x 2,048) and of 2,000 `cuPointerGetAttribute` calls on a cudaMalloc tensor, with 0,
    500 or 2,000 other 2 MiB handles mapped (each at its own address). Returns {mappings:
    {kind: [ms]}}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(8, 12, 512, 64, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(2048, 768, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(768, 2048, device="cuda", dtype=torch.bfloat16)
    size = 2 << 20
    held = []  # (va, handle)

    def grow_to(n):
        while len(held) < n:
            va = check(cu.cuMemAddressReserve(size, 0, 0, 0))
            h = check(cu.cuMemCreate(size, prop, 0))
            check(cu.cuMemMap(va, size, 0, h, 0))
            check(cu.cuMemSetAccess(va, size, [access], 1))
            held.append((va, h))

    def host_ms(f, n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        ms = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        return ms

    attr = cu.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL

    def attention():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    kinds = {"attention": (attention, 200), "gemm": (lambda: torch.mm(a, b), 200),
             "pointer_attribute": (lambda: check(cu.cuPointerGetAttribute(attr, q.data_ptr())), 2000)}
    out = {}
    for n in (0, 500, 2000):
        grow_to(n)
        for f, k in kinds.values():
            host_ms(f, 20)  # warm-up
        out[n] = {name: [host_ms(f, k) for _ in range(reps)] for name, (f, k) in kinds.items()}
    torch.cuda.synchronize()
    for va, h in held:
        check(cu.cuMemUnmap(va, size))
        check(cu.cuMemRelease(h))
        check(cu.cuMemAddressFree(va, size))
    return out


def call_costs(prop, access, reps=7):
    """What the driver calls of a move cost in a PyTorch process, by how many 2 MiB handles
    one range holds: one cuMemSetAccess and one cuMemUnmap over 1, 4, 16 or 64 handles mapped
    side by side (the map calls are per handle anyway); and what the event calls the
    allocator's fences make cost: cuEventRecord, cuEventQuery on a completed event and on one
    still pending (the stream kept busy by torch.cuda._sleep). Returns {"by_handles": {n:
    {"set_access": [us], "unmap": [us], "map_per_handle": [us]}}, "events": {name: [us]}}."""
    size = 2 << 20
    by_handles = {}
    for n in (1, 4, 16, 64):
        va = check(cu.cuMemAddressReserve(n * size, 0, 0, 0))
        hs = [check(cu.cuMemCreate(size, prop, 0)) for _ in range(n)]
        out = {"set_access": [], "unmap": [], "map_per_handle": []}
        for _ in range(reps):
            t0 = time.perf_counter()
            for i, h in enumerate(hs):
                check(cu.cuMemMap(int(va) + i * size, size, 0, h, 0))
            t1 = time.perf_counter()
            check(cu.cuMemSetAccess(va, n * size, [access], 1))
            t2 = time.perf_counter()
            check(cu.cuMemUnmap(va, n * size))
            t3 = time.perf_counter()
            out["map_per_handle"].append((t1 - t0) * 1e6 / n)
            out["set_access"].append((t2 - t1) * 1e6)
            out["unmap"].append((t3 - t2) * 1e6)
        for h in hs:
            check(cu.cuMemRelease(h))
        check(cu.cuMemAddressFree(va, n * size))
        by_handles[n] = out
    stream = torch.cuda.current_stream()
    raw = stream.cuda_stream
    ev = check(cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DISABLE_TIMING))
    events = {"record": [], "query_done": [], "query_pending": []}
    calls = 1000
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            check(cu.cuEventRecord(ev, raw))
        events["record"].append((time.perf_counter() - t0) * 1e6 / calls)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            cu.cuEventQuery(ev)
        events["query_done"].append((time.perf_counter() - t0) * 1e6 / calls)
        torch.cuda._sleep(50_000_000)
        check(cu.cuEventRecord(ev, raw))
        t0 = time.perf_counter()
        for _ in range(calls):
            cu.cuEventQuery(ev)
        events["query_pending"].append((time.perf_counter() - t0) * 1e6 / calls)
        torch.cuda.synchronize()
    # The Python binding's own cost per call, for scale: a driver call that does nothing much.
    t0 = time.perf_counter()
    for _ in range(calls):
        cu.cuCtxGetDevice()
    events["binding_only (cuCtxGetDevice)"] = [(time.perf_counter() - t0) * 1e6 / calls]
    check(cu.cuEventDestroy(ev))
    return {"by_handles": by_handles, "events": events}


def launch_cost(prop, access, ops=2000, reps=5):
    """Do virtual-memory calls slow the host's kernel launches after them (a driver cache
    invalidated by a new mapping, say)? The host time of `ops` rounds of two small ops (an
    element-wise add and a 64 x 64 GEMM: the device keeps up, so the host's launches set the
    pace), with 0, 20 or 200 map-access-unmap cycles of a spare 2 MiB page among them, less
    the time the cycles' own calls took. Returns {cycles: ([host ms], [cycle calls ms])}."""
    size = 2 << 20
    x = torch.zeros(1024, device="cuda")
    a = torch.randn(64, 64, device="cuda")
    va = check(cu.cuMemAddressReserve(size, 0, 0, 0))
    h = check(cu.cuMemCreate(size, prop, 0))

    def cycle():
        check(cu.cuMemMap(va, size, 0, h, 0))
        check(cu.cuMemSetAccess(va, size, [access], 1))
        check(cu.cuMemUnmap(va, size))

    def run(cycles):
        torch.cuda.synchronize()
        in_calls = 0.0
        t0 = time.perf_counter()
        for i in range(ops):
            x.add_(1.0)
            torch.mm(a, a)
            if cycles and i % (ops // cycles) == 0:
                c0 = time.perf_counter()
                cycle()
                in_calls += time.perf_counter() - c0
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        return (host - in_calls) * 1e3, in_calls * 1e3

    run(0)  # warm-up
    out = {c: ([], []) for c in (0, 20, 200)}
    for _ in range(reps):
        for c in out:  # interleaved
            ms, calls = run(c)
            out[c][0].append(ms)
            out[c][1].append(calls)
    check(cu.cuMemRelease(h))
    check(cu.cuMemAddressFree(va, size))
    return out


if __name__ == "__main__":
    main()
