#!/usr/bin/env python3
"""accelrt_torch.py and libaccelrt_torch.so through ctypes, without PyTorch or a GPU.

Run by `cargo test -p accelrt-torch` (tests/python.rs) with ACCELRT_TORCH_LIB set to the
library it built and ACCELRT_TORCH_BACKEND=host; or by hand:

    ACCELRT_TORCH_BACKEND=host ACCELRT_TORCH_LIB=target/debug/libaccelrt_torch.so \
        python3 python/tests/test_accelrt_torch.py

Exits non-zero on the first failure.
"""

import ctypes
import os
import pickle
import sys
import tempfile
import traceback
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import accelrt_torch as at  # noqa: E402

MiB = 1 << 20
TORCH_KEYS = [
    f"{stat}.{pool}.{field}"
    for stat in (
        "allocation", "segment", "active", "inactive_split", "allocated_bytes",
        "reserved_bytes", "active_bytes", "inactive_split_bytes", "requested_bytes",
    )
    for pool in ("all", "small_pool", "large_pool")
    for field in ("current", "peak", "allocated", "freed")
] + ["num_alloc_retries", "num_ooms", "num_sync_all_streams", "num_device_alloc", "num_device_free"]


def lib():
    return at.load_library()


def alloc(size):
    p = lib().accelrt_torch_alloc(size, 0, None)
    assert p, f"alloc({size}) failed: {at.last_error()}"
    return p


def free(p):
    lib().accelrt_torch_free(p, 0, 0, None)


def test_loads_without_torch_and_reports_itself():
    l = lib()
    assert at.find_library() == at.status()["library"]
    assert at.status()["mode"] is None and not at.is_enabled()
    assert at.status()["version"] == l.accelrt_torch_version().decode()
    assert l.accelrt_torch_device_count() >= 1, at.last_error()


def test_statistics_have_pytorchs_keys_and_move_with_allocations():
    stats = at.memory_stats()
    missing = [k for k in TORCH_KEYS if k not in stats]
    assert not missing, f"keys torch.cuda.memory_stats() has and accelrt lacks: {missing}"
    assert list(stats) == sorted(stats), "sorted like PyTorch's"
    before = at.memory_allocated()
    p = alloc(3 * MiB)
    assert at.memory_allocated() >= before + 3 * MiB
    assert at.max_memory_allocated() >= at.memory_allocated()
    assert at.memory_reserved() >= at.memory_allocated()
    assert at.max_memory_reserved() >= at.memory_reserved()
    assert at.memory_stats("cuda:0") == at.memory_stats(0)
    free(p)
    at.reset_peak_memory_stats()
    s = at.memory_stats()
    assert s["allocated_bytes.all.peak"] == s["allocated_bytes.all.current"]
    at.empty_cache()

    array = (ctypes.c_int64 * at.STATS_LEN)()
    assert lib().accelrt_torch_stats_array(0, array, at.STATS_LEN) == at.STATS_LEN
    s = at.memory_stats()
    assert array[(5 * 3 + 0) * 4 + 0] == s["reserved_bytes.all.current"]
    assert array[109] == s["num_ooms"]


def test_snapshots_load_with_pythons_pickle():
    at.record_memory_history(True, 1000)
    live = alloc(5 * MiB)
    gone = alloc(4096)
    free(gone)
    snap = at.memory_snapshot()
    at.record_memory_history(False)
    assert {"segments", "device_traces", "allocator_settings"} <= set(snap), list(snap)
    blocks = [b for seg in snap["segments"] for b in seg["blocks"]]
    assert any(b["address"] == live and b["state"] == "active_allocated" for b in blocks)
    actions = [e["action"] for e in snap["device_traces"][0]]
    assert "alloc" in actions and "free_requested" in actions, actions
    assert snap["allocator_settings"]["allocator"] == "accelrt"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "snap.pickle"
        at.dump_snapshot(path)
        with open(path, "rb") as f:
            again = pickle.load(f)
        assert len(again["segments"]) == len(snap["segments"])
    free(live)


def test_bad_calls_raise_or_return_null_with_the_reason():
    assert lib().accelrt_torch_alloc(-1, 0, None) is None
    assert "negative" in at.last_error(), at.last_error()
    try:
        at.memory_stats(5)
    except at.AccelrtError as e:
        assert "invalid device index 5" in str(e), e
    else:
        raise AssertionError("memory_stats(5) on one device did not raise")
    try:
        at.record_memory_history(True, 0)
    except at.AccelrtError as e:
        assert "max_entries is 0" in str(e), e
    else:
        raise AssertionError("max_entries 0 was accepted")
    lib().accelrt_torch_free(0x10, 16, 0, None)
    assert at.last_error().startswith("cannot free 0x10"), at.last_error()
    try:
        at.find_library("/nonexistent/libaccelrt_torch.so")
    except FileNotFoundError as e:
        assert "cargo build --release -p accelrt-torch" in str(e), e
    else:
        raise AssertionError("a missing library was found")


def test_shim_features_follow_the_installed_headers():
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        assert at._feature_flags([d]) == [], "no headers: no optional override"
        (root / "torch/csrc/cuda").mkdir(parents=True)
        (root / "c10/cuda").mkdir(parents=True)
        (root / "c10/core").mkdir(parents=True)
        (root / "torch/csrc/cuda/CUDAPluggableAllocator.h").write_text(
            "double getMemoryFraction(c10::DeviceIndex device) override;"
        )
        (root / "c10/cuda/CUDACachingAllocator.h").write_text(
            "virtual int getPoolUseCount(\n c10::DeviceIndex device,\n MempoolId_t id) {}\n"
            "virtual void createOrIncrefPool(\n c10::DeviceIndex d,\n MempoolId_t id,\n"
            " std::shared_ptr<CUDAAllocator> allocator = nullptr) {}\n"
            "virtual void setUseOnOOM(c10::DeviceIndex d, MempoolId_t id, bool use_on_oom) {}\n"
        )
        (root / "c10/core/CachingDeviceAllocator.h").write_text(
            "int64_t num_sync_all_streams = 0; int64_t num_device_alloc = 0;"
        )
        flags = at._feature_flags([d])
        assert flags == [
            "-DACCELRT_HAS_GET_MEMORY_FRACTION",
            "-DACCELRT_HAS_CREATE_OR_INCREF_POOL",
            "-DACCELRT_HAS_GET_POOL_USE_COUNT",
            "-DACCELRT_HAS_SET_USE_ON_OOM",
            "-DACCELRT_HAS_NUM_SYNC_ALL_STREAMS",
        ], flags  # no num_device_free: no ACCELRT_HAS_NUM_DEVICE_ALLOC


def main():
    if os.environ.get("ACCELRT_TORCH_BACKEND") != "host":
        print("set ACCELRT_TORCH_BACKEND=host: these tests need no GPU and use the host backend")
        return 2
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    for t in tests:
        try:
            t()
        except Exception:
            print(f"FAIL {t.__name__}")
            traceback.print_exc()
            return 1
        print(f"ok   {t.__name__}")
    print(f"{len(tests)} passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
