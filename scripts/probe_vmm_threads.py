#!/usr/bin/env python3
"""Do the CUDA virtual-memory calls scale across host threads? Times creating, mapping,
granting access to, unmapping and releasing N physical handles, the work split over T
threads (each with the primary context current, each over its own part of one reserved
range), phase by phase behind a barrier, and the realistic order (each thread creates, maps
and grants access to its handles one after another). ctypes releases the GIL around every
driver call, so the threads call the driver concurrently.

    python3 scripts/probe_vmm_threads.py [N]     # on the GPU machine; a table, then JSON
"""
import ctypes
import json
import statistics
import sys
import threading
import time

import torch

cu = ctypes.CDLL("libcuda.so.1")


class Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class Prop(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int),
                ("location", Location), ("win32HandleMetaData", ctypes.c_void_p),
                ("allocFlags", AllocFlags)]


class Access(ctypes.Structure):
    _fields_ = [("location", Location), ("flags", ctypes.c_int)]


def ok(r, what):
    if r != 0:
        raise RuntimeError(f"{what}: CUDA driver error {r}")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    torch.zeros(1, device="cuda")
    dev = torch.cuda.current_device()
    ctx = ctypes.c_void_p()
    ok(cu.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    prop = Prop()
    prop.type = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location = Location(1, dev)  # CU_MEM_LOCATION_TYPE_DEVICE
    acc = Access(Location(1, dev), 3)  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    results = {}
    print("size | threads | create | map | set-access | unmap | release | all in one pass  (ms for all N handles, median of 3)")
    for size in (2 << 20, 32 << 20):
        va = ctypes.c_uint64()
        ok(cu.cuMemAddressReserve(ctypes.byref(va), ctypes.c_size_t(n * size), ctypes.c_size_t(0),
                                  ctypes.c_uint64(0), ctypes.c_ulonglong(0)), "reserve")
        for threads in (1, 2, 4, 8):
            handles = [ctypes.c_uint64() for _ in range(n)]
            # contiguous parts, so that each thread's set-access covers one range of its own
            per = n // threads
            parts = [range(t * per, (t + 1) * per if t < threads - 1 else n) for t in range(threads)]

            def create(i):
                ok(cu.cuMemCreate(ctypes.byref(handles[i]), ctypes.c_size_t(size), ctypes.byref(prop),
                                  ctypes.c_ulonglong(0)), "create")

            def map_(i):
                ok(cu.cuMemMap(ctypes.c_uint64(va.value + i * size), ctypes.c_size_t(size), ctypes.c_size_t(0),
                               handles[i], ctypes.c_ulonglong(0)), "map")

            def access(part):
                ok(cu.cuMemSetAccess(ctypes.c_uint64(va.value + part.start * size),
                                     ctypes.c_size_t(len(part) * size), ctypes.byref(acc), ctypes.c_size_t(1)),
                   "set-access")

            def unmap(part):
                ok(cu.cuMemUnmap(ctypes.c_uint64(va.value + part.start * size), ctypes.c_size_t(len(part) * size)),
                   "unmap")

            def release(i):
                ok(cu.cuMemRelease(handles[i]), "release")

            def one_pass(part):
                for i in part:
                    create(i)
                    map_(i)
                    ok(cu.cuMemSetAccess(ctypes.c_uint64(va.value + i * size), ctypes.c_size_t(size),
                                         ctypes.byref(acc), ctypes.c_size_t(1)), "set-access")

            phases = {
                "create": lambda part: [create(i) for i in part],
                "map": lambda part: [map_(i) for i in part],
                "set_access": access,
                "unmap": unmap,
                "release": lambda part: [release(i) for i in part],
            }

            def run_phase(f):
                barrier = threading.Barrier(threads + 1)
                errors = []

                def work(part):
                    ok(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
                    barrier.wait()
                    try:
                        f(part)
                    except Exception as e:  # reported after the phase
                        errors.append(e)
                ts = [threading.Thread(target=work, args=(p,)) for p in parts]
                for t in ts:
                    t.start()
                barrier.wait()
                t0 = time.perf_counter()
                for t in ts:
                    t.join()
                if errors:
                    raise errors[0]
                return (time.perf_counter() - t0) * 1e3

            times = {k: [] for k in list(phases) + ["one_pass"]}
            for _ in range(3):
                for name, f in phases.items():
                    times[name].append(run_phase(f))
                times["one_pass"].append(run_phase(one_pass))
                run_phase(phases["unmap"])
                run_phase(phases["release"])
            med = {k: statistics.median(v) for k, v in times.items()}
            results[f"{size >> 20}MiB/{threads}"] = times
            print(f"{size >> 20} MiB | {threads} | " + " | ".join(f"{med[k]:.1f}" for k in times))
        ok(cu.cuMemAddressFree(va, ctypes.c_size_t(n * size)), "address free")
    print("probe_threads " + json.dumps({"handles": n, "ms": results}))


if __name__ == "__main__":
    main()
