"""accelrt as PyTorch's CUDA allocator.

    import torch, accelrt_torch
    accelrt_torch.enable()            # before any CUDA memory is used
    ...train...
    print(accelrt_torch.max_memory_reserved())
    accelrt_torch.dump_snapshot("snap.pickle")   # https://pytorch.org/memory_viz

``enable()`` loads ``libaccelrt_torch.so`` (built with ``cargo build --release -p
accelrt-torch``), compiles a small C++ shim against the installed PyTorch (with
``torch.utils.cpp_extension``; needs a C++ compiler and the CUDA headers, cached after the
first build) and installs accelrt's caching allocator with every hook PyTorch's pluggable
allocator accepts: init, empty_cache, the memory fraction, ``record_stream``, and the private
pools that ``torch.cuda.graph`` and ``torch.cuda.MemPool`` use. Through the shim,
``torch.cuda.memory_stats()``, ``max_memory_reserved()``, ``reset_peak_memory_stats()``,
out-of-memory observers and cuDNN's workspace sizing answer from accelrt, and a failed
allocation raises ``torch.OutOfMemoryError`` with accelrt's report. Without a compiler,
``enable()`` falls back to ``torch.cuda.memory.CUDAPluggableAllocator`` with the two required
functions and warns about what is lost. The functions of this module (``memory_stats()``,
``memory_snapshot()``, ...) work either way.

The allocator reads ``ACCELRT_ALLOC_CONF`` (PyTorch's ``PYTORCH_CUDA_ALLOC_CONF`` syntax; unset:
accelrt's defaults, expandable segments with ``release_at_peak``). The library alone (``load_library``, the statistics and snapshot functions) does not need
PyTorch; ``ACCELRT_TORCH_BACKEND=host`` runs it on accelrt's host backend, for tests.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "enable",
    "is_enabled",
    "status",
    "find_library",
    "load_library",
    "memory_stats",
    "memory_allocated",
    "max_memory_allocated",
    "memory_reserved",
    "max_memory_reserved",
    "reset_peak_memory_stats",
    "empty_cache",
    "memory_snapshot",
    "dump_snapshot",
    "record_memory_history",
    "last_error",
    "AccelrtError",
]

# What enable() puts before ACCELRT_ALLOC_CONF (a key set there wins): nothing, accelrt's
# defaults serve training as they are. (Page moves between blocks never wait for a stream:
# they take only pages behind a completed fence; measured on an H200 in BENCHMARKS.md,
# "PyTorch on accelrt".)
TORCH_ALLOC_CONF = ""
LIBRARY_NAME = "libaccelrt_torch.so"
LIBRARY_ENV = "ACCELRT_TORCH_LIB"
STATS_LEN = 113
_HERE = Path(__file__).resolve().parent
_SHIM_SOURCE = _HERE / "accelrt_torch_shim.cpp"

_lib: ctypes.CDLL | None = None
_lib_path: str | None = None
_mode: str | None = None  # "shim", "shim-basic" or "plain" once enabled
_missing: list[str] = []


class AccelrtError(RuntimeError):
    """A call into libaccelrt_torch.so failed; the message is the library's."""


# ---- the library ------------------------------------------------------------------------


def find_library(path: str | os.PathLike | None = None) -> str:
    """The path of libaccelrt_torch.so: `path`, else $ACCELRT_TORCH_LIB, else next to this
    file, else the repository's target/release or target/debug."""
    if path is not None:
        candidates = [Path(path)]
    else:
        candidates = [
            Path(p) for p in [os.environ.get(LIBRARY_ENV)] if p
        ] + [
            _HERE / LIBRARY_NAME,
            _HERE.parent / "target" / "release" / LIBRARY_NAME,
            _HERE.parent / "target" / "debug" / LIBRARY_NAME,
        ]
    for c in candidates:
        if c.is_file():
            return str(c.resolve())
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"{LIBRARY_NAME} not found (looked at: {looked}): build it with "
        "`cargo build --release -p accelrt-torch`, or pass its path to enable(path=...) "
        f"or set {LIBRARY_ENV}"
    )


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_int64, c_uint64 = ctypes.c_int, ctypes.c_int64, ctypes.c_uint64
    c_size, c_ssize, c_void_p = ctypes.c_size_t, ctypes.c_ssize_t, ctypes.c_void_p
    sig = {
        "accelrt_torch_alloc": (c_void_p, [c_ssize, c_int, c_void_p]),
        "accelrt_torch_free": (None, [c_void_p, c_ssize, c_int, c_void_p]),
        "accelrt_torch_init": (c_int, [c_int]),
        "accelrt_torch_empty_cache": (c_int, []),
        "accelrt_torch_set_memory_fraction": (c_int, [ctypes.c_double, c_int]),
        "accelrt_torch_get_memory_fraction": (ctypes.c_double, [c_int]),
        "accelrt_torch_record_stream": (c_int, [c_void_p, c_void_p]),
        "accelrt_torch_begin_allocate_to_pool": (
            c_int,
            [c_int, c_uint64, c_uint64, c_void_p, c_void_p, c_void_p],
        ),
        "accelrt_torch_end_allocate_to_pool": (c_int, [c_int, c_uint64, c_uint64]),
        "accelrt_torch_release_pool": (c_int, [c_int, c_uint64, c_uint64]),
        "accelrt_torch_create_or_incref_pool": (c_int, [c_int, c_uint64, c_uint64]),
        "accelrt_torch_pool_use_count": (c_int, [c_int, c_uint64, c_uint64]),
        "accelrt_torch_memory_stats_json": (c_void_p, [c_int]),
        "accelrt_torch_stats_array": (c_int, [c_int, ctypes.POINTER(c_int64), c_size]),
        "accelrt_torch_reset_peak_stats": (c_int, [c_int]),
        "accelrt_torch_reset_accumulated_stats": (c_int, [c_int]),
        "accelrt_torch_cache_info": (c_int, [c_int, ctypes.POINTER(c_size)]),
        "accelrt_torch_snapshot_pickle": (c_void_p, [c_int, ctypes.POINTER(c_size)]),
        "accelrt_torch_record_history": (c_int, [c_int, c_int, c_size]),
        "accelrt_torch_last_error": (ctypes.c_char_p, []),
        "accelrt_torch_last_oom": (c_int, [ctypes.POINTER(c_int64)]),
        "accelrt_torch_set_log_alloc_failures": (None, [c_int]),
        "accelrt_torch_free_buffer": (None, [c_void_p]),
        "accelrt_torch_version": (ctypes.c_char_p, []),
        "accelrt_torch_device_count": (c_int, []),
    }
    for name, (restype, argtypes) in sig.items():
        f = getattr(lib, name)
        f.restype = restype
        f.argtypes = argtypes


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Load libaccelrt_torch.so (once; PyTorch is not needed) and return it."""
    global _lib, _lib_path
    if _lib is not None:
        if path is not None and str(Path(path).resolve()) != _lib_path:
            raise AccelrtError(
                f"accelrt_torch already loaded {_lib_path}; a process uses one library"
            )
        return _lib
    found = find_library(path)
    lib = ctypes.CDLL(found)
    _declare(lib)
    _lib, _lib_path = lib, found
    return lib


def _library() -> ctypes.CDLL:
    return _lib if _lib is not None else load_library()


def last_error() -> str:
    """The library's last error message on this thread ("" when none)."""
    return (_library().accelrt_torch_last_error() or b"").decode("utf-8", "replace")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise AccelrtError(f"{what}: {last_error()}")


def _take_buffer(ptr: int | None, size: int | None = None) -> bytes:
    lib = _library()
    try:
        return ctypes.string_at(ptr, size) if size is not None else ctypes.string_at(ptr)
    finally:
        lib.accelrt_torch_free_buffer(ptr)


# ---- enabling it in PyTorch -----------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _feature_flags(include_dirs: list[str]) -> list[str]:
    """-D flags for the shim's optional overrides, from the installed PyTorch headers."""

    def header(rel: str) -> str:
        return "".join(_read(Path(d) / rel) for d in include_dirs)

    pluggable = header("torch/csrc/cuda/CUDAPluggableAllocator.h")
    caching = header("c10/cuda/CUDACachingAllocator.h")
    stats = header("c10/core/CachingDeviceAllocator.h") + caching
    flags = []
    if re.search(r"\bgetMemoryFraction\s*\(\s*c10::DeviceIndex", pluggable):
        flags.append("-DACCELRT_HAS_GET_MEMORY_FRACTION")
    if re.search(
        r"virtual\s+void\s+createOrIncrefPool\s*\([^)]*MempoolId_t[^)]*"
        r"std::shared_ptr<CUDAAllocator>",
        caching,
    ):
        flags.append("-DACCELRT_HAS_CREATE_OR_INCREF_POOL")
    if re.search(r"virtual\s+int\s+getPoolUseCount\s*\(\s*c10::DeviceIndex[^,]*,\s*MempoolId_t", caching):
        flags.append("-DACCELRT_HAS_GET_POOL_USE_COUNT")
    if re.search(
        r"virtual\s+void\s+setUseOnOOM\s*\(\s*c10::DeviceIndex[^,]*,\s*MempoolId_t[^,]*,\s*bool",
        caching,
    ):
        flags.append("-DACCELRT_HAS_SET_USE_ON_OOM")
    if re.search(r"virtual\s+void\s+setNoSplit\s*\(\s*c10::DeviceIndex[^,]*,\s*MempoolId_t", caching):
        flags.append("-DACCELRT_HAS_SET_NO_SPLIT")
    if re.search(r"int64_t\s+num_sync_all_streams\b", stats):
        flags.append("-DACCELRT_HAS_NUM_SYNC_ALL_STREAMS")
    if re.search(r"int64_t\s+num_device_alloc\b", stats) and re.search(
        r"int64_t\s+num_device_free\b", stats
    ):
        flags.append("-DACCELRT_HAS_NUM_DEVICE_ALLOC")
    return flags


def _build_shim(full: bool, verbose: bool) -> str:
    from torch.utils import cpp_extension

    flags = ["-O2"]
    if full:
        flags += ["-DACCELRT_FULL"] + _feature_flags(cpp_extension.include_paths())
    # The shim has no device code, but without an architecture list cpp_extension asks each
    # device for its capability, which initialises CUDA, after which PyTorch refuses to swap
    # its allocator. Any list will do.
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not saved or saved == "native":
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    try:
        return cpp_extension.load(
            name="accelrt_torch_shim" if full else "accelrt_torch_shim_basic",
            sources=[str(_SHIM_SOURCE)],
            extra_cflags=flags,
            with_cuda=True,
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def _install_shim(verbose: bool) -> str:
    """Build and install the shim; returns the mode ("shim" or "shim-basic")."""
    errors = []
    for full in (True, False):
        try:
            path = _build_shim(full, verbose)
        except Exception as e:  # a compiler error, no CUDA headers, ...
            errors.append(f"{'full' if full else 'basic'} shim: {type(e).__name__}: {e}")
            continue
        import torch

        if torch.cuda.is_initialized():
            raise AccelrtError(
                "CUDA was initialised while the shim was built, so PyTorch's allocator can no "
                "longer be swapped: set TORCH_CUDA_ARCH_LIST (e.g. 9.0) and call enable() again "
                "in a new process"
            )
        shim = ctypes.CDLL(path)
        shim.accelrt_shim_install.restype = ctypes.c_int
        shim.accelrt_shim_install.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
        err = ctypes.create_string_buffer(4096)
        if shim.accelrt_shim_install(_lib_path.encode(), err, len(err)) != 0:
            raise AccelrtError(
                f"installing accelrt as PyTorch's allocator failed: {err.value.decode()}"
            )
        if not full:
            _missing.extend(
                [
                    "torch.cuda.memory_stats()/max_memory_reserved()/reset_peak_memory_stats()"
                    " (use accelrt_torch's functions)",
                    "out-of-memory observers",
                    "cuDNN cacheInfo (cudnn benchmark mode raises)",
                    "torch.cuda.MemPool",
                ]
            )
            warnings.warn(
                "accelrt_torch: the full shim did not build, the basic one did (every hook, "
                f"PyTorch's own statistics functions not): {errors[0][:2000]}",
                stacklevel=3,
            )
        return "shim" if full else "shim-basic"
    raise RuntimeError("; ".join(errors))


def enable(
    path: str | os.PathLike | None = None,
    *,
    alloc_conf: str | None = None,
    shim: bool = True,
    verbose: bool = False,
) -> dict:
    """Make accelrt PyTorch's CUDA allocator. Call it before CUDA memory is used (before
    the first CUDA tensor, ``torch.cuda.init()`` or any CUDA query that initialises it).

    ``path``: libaccelrt_torch.so (default: see ``find_library``). ``alloc_conf``: the
    allocator configuration (PyTorch's ``PYTORCH_CUDA_ALLOC_CONF`` syntax, e.g.
    ``"max_split_size_mb:256"``); default: ``$ACCELRT_ALLOC_CONF``. Either way it is applied
    on top of ``TORCH_ALLOC_CONF`` (see above), and the result goes to ``ACCELRT_ALLOC_CONF``
    for the library. ``shim=False`` skips the C++ shim: only alloc/free are installed (no
    graphs, MemPool, memory fraction, record_stream, empty_cache, PyTorch-side statistics,
    and a failed allocation gives PyTorch a NULL pointer instead of an exception). Returns
    ``status()``. Calling it again once enabled does nothing.
    """
    global _mode
    import torch

    if _mode is not None:
        return status()
    if alloc_conf is None:
        alloc_conf = os.environ.get("ACCELRT_ALLOC_CONF", "")
    # Read by the library when a device's allocator is created, at its first allocation.
    os.environ["ACCELRT_ALLOC_CONF"] = ",".join(c for c in (TORCH_ALLOC_CONF, alloc_conf) if c)
    if torch.cuda.is_initialized():
        raise RuntimeError(
            "accelrt_torch.enable() must run before PyTorch initialises CUDA, and "
            "torch.cuda.is_initialized() is already True (a CUDA tensor, torch.cuda.init() or "
            "a CUDA memory query ran first): call enable() right after `import torch`, "
            "before any CUDA work"
        )
    lib = load_library(path)
    if lib.accelrt_torch_device_count() < 0:
        raise AccelrtError(f"accelrt cannot drive the GPU: {last_error()}")
    _missing.clear()
    mode = None
    if shim:
        try:
            mode = _install_shim(verbose)
        except AccelrtError:
            raise
        except Exception as e:
            warnings.warn(
                f"accelrt_torch: the C++ shim could not be built ({str(e)[:2000]}); falling "
                "back to alloc/free only",
                stacklevel=2,
            )
    if mode is None:
        allocator = torch.cuda.memory.CUDAPluggableAllocator(
            _lib_path, "accelrt_torch_alloc", "accelrt_torch_free"
        )
        torch.cuda.memory.change_current_allocator(allocator)
        _missing.extend(
            [
                "torch.cuda.graph and torch.cuda.MemPool (private pools)",
                "torch.cuda.set_per_process_memory_fraction",
                "Tensor.record_stream",
                "torch.cuda.empty_cache (use accelrt_torch.empty_cache)",
                "torch.cuda.memory_stats() and friends (use accelrt_torch's functions)",
                "torch.OutOfMemoryError on a failed allocation",
            ]
        )
        mode = "plain"
    _mode = mode
    return status()


def is_enabled() -> bool:
    """Whether ``enable()`` made accelrt PyTorch's allocator in this process."""
    return _mode is not None


def status() -> dict:
    """How accelrt is wired: ``mode`` ("shim": every hook and PyTorch's statistics
    functions; "shim-basic": every hook; "plain": alloc/free only; None: not enabled),
    ``library``, ``version`` and ``missing`` (what does not work in this mode)."""
    version = None
    if _lib is not None:
        version = _lib.accelrt_torch_version().decode()
    return {
        "mode": _mode,
        "library": _lib_path,
        "version": version,
        "alloc_conf": os.environ.get("ACCELRT_ALLOC_CONF") if _mode is not None else None,
        "missing": list(_missing),
    }


# ---- statistics, snapshots -------------------------------------------------------------------


def _device_index(device: Any = None) -> int:
    if device is None:
        try:
            import torch

            if torch.cuda.is_initialized():
                return torch.cuda.current_device()
        except ImportError:
            pass
        return 0
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        device = device.split(":", 1)[1] if ":" in device else "0"
        return int(device)
    index = getattr(device, "index", None)  # torch.device
    return 0 if index is None else int(index)


def memory_stats(device: Any = None) -> dict[str, int]:
    """accelrt's statistics for `device` with ``torch.cuda.memory_stats()``'s keys
    (``allocated_bytes.all.current``, ``reserved_bytes.all.peak``, ``num_ooms``, ...), sorted
    like PyTorch's; plus accelrt's ``num_page_steals`` and ``num_pages_remapped``."""
    lib = _library()
    ptr = lib.accelrt_torch_memory_stats_json(_device_index(device))
    if not ptr:
        raise AccelrtError(f"memory_stats: {last_error()}")
    return dict(sorted(json.loads(_take_buffer(ptr)).items()))


def memory_allocated(device: Any = None) -> int:
    """Bytes of live allocations (rounded block sizes), like ``torch.cuda.memory_allocated``."""
    return memory_stats(device)["allocated_bytes.all.current"]


def max_memory_allocated(device: Any = None) -> int:
    """Peak of ``memory_allocated`` since the last peak reset."""
    return memory_stats(device)["allocated_bytes.all.peak"]


def memory_reserved(device: Any = None) -> int:
    """Bytes accelrt holds from the device, like ``torch.cuda.memory_reserved``."""
    return memory_stats(device)["reserved_bytes.all.current"]


def max_memory_reserved(device: Any = None) -> int:
    """Peak of ``memory_reserved`` since the last peak reset (exact)."""
    return memory_stats(device)["reserved_bytes.all.peak"]


def reset_peak_memory_stats(device: Any = None) -> None:
    """Set every peak statistic of `device` to its current value."""
    _check(_library().accelrt_torch_reset_peak_stats(_device_index(device)), "reset_peak_memory_stats")


def empty_cache() -> None:
    """Give every cached segment of every device back to the device."""
    _check(_library().accelrt_torch_empty_cache(), "empty_cache")


def record_memory_history(enabled: bool = True, max_entries: int = 100_000, device: Any = "all") -> None:
    """Record (or stop recording) allocations, frees and segment changes for snapshots;
    ``device="all"`` (default) covers every device, including ones used later."""
    d = -1 if device == "all" else _device_index(device)
    _check(
        _library().accelrt_torch_record_history(d, 1 if enabled else 0, max_entries),
        "record_memory_history",
    )


def _snapshot_bytes(device: Any) -> bytes:
    lib = _library()
    d = -1 if device == "all" else _device_index(device)
    size = ctypes.c_size_t(0)
    ptr = lib.accelrt_torch_snapshot_pickle(d, ctypes.byref(size))
    if not ptr:
        raise AccelrtError(f"memory_snapshot: {last_error()}")
    return _take_buffer(ptr, size.value)


def memory_snapshot(device: Any = "all") -> dict:
    """The allocator's state and history in ``torch.cuda.memory._snapshot()``'s layout
    (``segments``, ``device_traces``, ``allocator_settings``); every device by default."""
    return pickle.loads(_snapshot_bytes(device))


def dump_snapshot(path: str | os.PathLike, device: Any = "all") -> None:
    """Write ``memory_snapshot()`` as a pickle for https://pytorch.org/memory_viz (or
    ``accelrt snapshot render``)."""
    Path(path).write_bytes(_snapshot_bytes(device))
