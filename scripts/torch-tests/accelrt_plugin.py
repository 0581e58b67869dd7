"""pytest plugin (-p accelrt_plugin): makes sure accelrt is PyTorch's allocator before any test
allocates, and writes one JSON line per test outcome as it happens (so a run cut short by its
time budget still reports what ran).

ACCELRT_TESTS_ALLOCATOR=accelrt: enable accelrt (the installed package's enable(); with the
.pth hook and ACCELRT_TORCH=strict it is already enabled by `import torch`); =native: check
that accelrt is not enabled. ACCELRT_TESTS_RESULTS=FILE: where the lines go.
"""

import importlib
import json
import os

# Names the test files import that the installed PyTorch's testing modules no longer have
# (the files come from the search index, not from the installed version's tag; found with
# scripts/torch-tests/missing_names.py). Each is supplied only when missing, with the meaning
# it had, and the report lists what was supplied.
COMPAT = {
    # Whether the run uses the cudaMallocAsync backend: neither accelrt nor PyTorch's
    # caching allocator is that.
    ("torch.testing._internal.common_utils", "TEST_CUDAMALLOCASYNC"): lambda mod: (
        "backend:cudamallocasync"
        in (os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + os.environ.get("TORCH_ALLOC_CONF", ""))
        .replace(" ", "")
        .lower()
    ),
    # Renamed HAS_CUDA_AND_TRITON.
    ("torch.testing._internal.inductor_utils", "HAS_CUDA"): lambda mod: mod.HAS_CUDA_AND_TRITON,
}


def supply_compat_names() -> list:
    supplied = []
    for (module, name), value in COMPAT.items():
        try:
            mod = importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the test file's own import reports it
            continue
        if not hasattr(mod, name):
            setattr(mod, name, value(mod))
            supplied.append(f"{module}.{name} = {getattr(mod, name)!r}")
    return supplied


def pytest_configure(config):
    want = os.environ.get("ACCELRT_TESTS_ALLOCATOR", "native")
    import torch

    if want == "accelrt":
        import accelrt_torch

        if not accelrt_torch.is_enabled():
            accelrt_torch.enable()
        st = accelrt_torch.status()
        if st["mode"] != "full":
            raise RuntimeError(f"accelrt is not PyTorch's full allocator: {st}")
    else:
        try:
            import accelrt_torch

            if accelrt_torch.is_enabled():
                raise RuntimeError("accelrt is enabled in the native run (ACCELRT_TORCH set?)")
        except ImportError:
            pass
    config._accelrt_results = os.environ.get("ACCELRT_TESTS_RESULTS")
    supplied = supply_compat_names()
    if supplied:
        print("accelrt_plugin: supplied names the test files import but this PyTorch lacks: "
              + "; ".join(supplied))
    del torch


def pytest_runtest_logreport(report):
    path = os.environ.get("ACCELRT_TESTS_RESULTS")
    if not path:
        return
    outcome = None
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfail" if report.skipped else "xpass"
    if outcome is None:
        return
    reason = ""
    if report.outcome == "failed":
        crash = getattr(report.longrepr, "reprcrash", None)
        reason = crash.message if crash is not None else str(report.longrepr)[-800:]
    elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
    with open(path, "a") as f:
        f.write(json.dumps({"id": report.nodeid, "outcome": outcome, "reason": reason[:1500]}) + "\n")
