#!/usr/bin/env python3
"""The accelrt_torch package and libaccelrt_torch.so through ctypes, without PyTorch or a GPU.

Run by `cargo test -p accelrt-torch` (tests/python.rs) with ACCELRT_TORCH_LIB set to the
library it built and ACCELRT_TORCH_BACKEND=host; by CI against the installed package
(`pip install ./python` in a fresh virtual environment, ACCELRT_TEST_INSTALLED=1: the package
and its bundled library are imported from site-packages, and the .pth opt-in is checked); or
by hand:

    ACCELRT_TORCH_BACKEND=host ACCELRT_TORCH_LIB=target/debug/libaccelrt_torch.so \
        python3 python/tests/test_accelrt_torch.py

Tests that need PyTorch print SKIP with the reason when it is not importable. Exits non-zero
on the first failure; the last line is "N passed, N failed, N skipped".
"""

import ctypes
import gzip
import json
import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

sys.dont_write_bytecode = True
INSTALLED = os.environ.get("ACCELRT_TEST_INSTALLED") == "1"
SOURCE = Path(__file__).resolve().parent.parent
if not INSTALLED:
    sys.path.insert(0, str(SOURCE))
import accelrt_torch as at  # noqa: E402


class Skip(Exception):
    """The test cannot run here (the reason is the message)."""

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


def test_the_peak_breakdown_says_where_reserved_memory_was():
    at.empty_cache()
    at.reset_peak_memory_stats()
    at.record_peak_breakdown(True)
    try:
        p = alloc(at.memory_reserved() + 40 * MiB)  # a new peak
        b = at.peak_breakdown()
        assert b is not None, "a peak was recorded"
        parts = [k for k in b if k != "reserved"]
        assert sorted(parts) == sorted([
            "allocated", "free_in_shared_pages", "free_in_used_chunks", "idle_chunks",
            "spare_chunks", "free_in_segments", "other"]), b
        assert sum(b[k] for k in parts) == b["reserved"], b
        assert b["reserved"] == at.max_memory_reserved(), (b, at.max_memory_reserved())
        free(p)
    finally:
        at.record_peak_breakdown(False)
        at.empty_cache()
    assert at.peak_breakdown() is None, "off: forgotten"
    try:
        at.peak_breakdown(5)
    except at.AccelrtError as e:
        assert "device" in str(e), e
    else:
        raise AssertionError("peak_breakdown(5) on one device did not raise")


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


def test_find_library_says_how_to_get_one():
    try:
        at.find_library("/nonexistent/libaccelrt_torch.so")
    except FileNotFoundError as e:
        assert "pip install ./python" in str(e), e
    else:
        raise AssertionError("a missing library was found")


def test_the_installed_package_carries_its_library():
    if not INSTALLED:
        raise Skip("runs against the pip-installed package (ACCELRT_TEST_INSTALLED=1)")
    pkg = Path(at.__file__).resolve().parent
    assert pkg != SOURCE / "accelrt_torch", f"imported the source tree, not the install: {pkg}"
    env = {k: v for k, v in os.environ.items() if k != "ACCELRT_TORCH_LIB"}
    out = subprocess.run(
        [sys.executable, "-c", "import accelrt_torch as a; print(a.find_library())"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert out == str(pkg / at.LIBRARY_NAME), (out, pkg)


def run_module(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    if not INSTALLED:
        e["PYTHONPATH"] = os.pathsep.join([str(SOURCE), e.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "accelrt_torch", *args], env=e, capture_output=True, text=True
    )


def test_python_m_accelrt_torch_reports_what_it_found():
    r = run_module("--json")
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info["library"] == at.find_library(), info
    assert info["version"] == lib().accelrt_torch_version().decode()
    assert info["backend"] == "host" and info["devices"] >= 1, info
    assert "expandable_segments" in info["config"], info
    assert "torch" in info and "ACCELRT_ALLOC_CONF" in info
    r = run_module()
    assert r.returncode == 0 and "library" in r.stdout and "config" in r.stdout, r.stdout


def test_the_opt_in_reads_the_environment():
    from accelrt_torch import _autoload as al

    assert al.decision({}) == (False, False, None)
    assert al.decision({"ACCELRT_TORCH": "0"}) == (False, False, None)
    assert al.decision({"ACCELRT_TORCH": " On "}) == (True, False, None)
    assert al.decision({"ACCELRT_TORCH": "strict"}) == (True, True, None)
    assert al.decision({"ACCELRT_TRACE": "t.gz"}) == (True, False, "t.gz")
    try:
        al.decision({"ACCELRT_TORCH": "maybe"})
    except ValueError as e:
        assert "ACCELRT_TORCH='maybe'" in str(e), e
    else:
        raise AssertionError("ACCELRT_TORCH=maybe was accepted")


HOOK_SCRIPT = r"""
import sys, accelrt_torch, accelrt_torch._autoload as al
calls = []
accelrt_torch.enable = lambda: calls.append("enable")
accelrt_torch.record_trace = lambda p: calls.append("trace " + p)
print("installed", al.install())
print("before", calls, "torch" in sys.modules)
import torch
print("after", calls, torch.MARK)
"""


def test_the_hook_enables_right_after_import_torch():
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "torch").mkdir()
        (Path(d) / "torch" / "__init__.py").write_text("MARK = 'fake torch'\n")
        paths = [d] + ([] if INSTALLED else [str(SOURCE)])
        base = {k: v for k, v in os.environ.items() if k not in ("ACCELRT_TORCH", "ACCELRT_TRACE")}
        base["PYTHONPATH"] = os.pathsep.join(paths)

        def run(extra):
            return subprocess.run(
                [sys.executable, "-c", HOOK_SCRIPT], env={**base, **extra},
                capture_output=True, text=True,
            )

        r = run({"ACCELRT_TORCH": "1", "ACCELRT_TRACE": "run.trace"})
        assert r.returncode == 0, r.stderr
        assert "installed True" in r.stdout and "before [] False" in r.stdout, r.stdout
        assert "after ['enable', 'trace run.trace'] fake torch" in r.stdout, r.stdout
        r = run({})
        assert "installed False" in r.stdout and "after [] fake torch" in r.stdout, r.stdout


def test_the_pth_file_installs_the_hook_only_when_asked():
    if not INSTALLED:
        raise Skip("the .pth file exists only in an installed package (ACCELRT_TEST_INSTALLED=1)")
    check = "import sys; print(any(type(f).__name__ == '_TorchHook' for f in sys.meta_path))"
    base = {k: v for k, v in os.environ.items() if k not in ("ACCELRT_TORCH", "ACCELRT_TRACE")}
    for extra, want in [({}, "False"), ({"ACCELRT_TORCH": "1"}, "True"), ({"ACCELRT_TORCH": "0"}, "False")]:
        out = subprocess.run(
            [sys.executable, "-c", check], env={**base, **extra}, capture_output=True, text=True
        )
        assert out.stdout.strip() == want, (extra, out.stdout, out.stderr)


def test_record_trace_writes_a_v2_trace():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "py.trace.gz"
        with at.record_trace(path, workload="python test"):
            ps = [alloc(1 << 16) for _ in range(3)]
            for p in ps:
                free(p)
        text = gzip.decompress(path.read_bytes()).decode()
        lines = text.splitlines()
        assert lines[0] == "#accelrt-trace v2", lines[:3]
        assert "#! workload=python test" in lines and "#! allocator=accelrt" in lines
        events = [l for l in lines if not l.startswith("#")]
        assert [l.split()[0] for l in events].count("a") == 3, events
        assert [l.split()[0] for l in events].count("c") == 3, events
        try:
            at.stop_trace()
        except at.AccelrtError as e:
            assert "no trace is being recorded" in str(e), e
        else:
            raise AssertionError("stop_trace without a recording did not raise")


def test_enable_needs_torch():
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise Skip(f"PyTorch is not importable ({e}); enable() is tested on the GPU machine")
    # With PyTorch but no GPU here, enabling must fail with the backend's reason, not crash.
    if os.environ.get("ACCELRT_TORCH_BACKEND") == "host":
        raise Skip("enable() needs the CUDA backend; these tests run on the host backend")


def main():
    if os.environ.get("ACCELRT_TORCH_BACKEND") != "host":
        print("set ACCELRT_TORCH_BACKEND=host: these tests need no GPU and use the host backend")
        return 2
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    passed = failed = skipped = 0
    for t in tests:
        try:
            t()
        except Skip as s:
            skipped += 1
            print(f"SKIP {t.__name__}: {s}")
            continue
        except Exception:
            failed += 1
            print(f"FAIL {t.__name__}")
            traceback.print_exc()
            continue
        passed += 1
        print(f"ok   {t.__name__}")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
