"""accelrt as PyTorch's CUDA allocator.

    import torch, accelrt_torch
    accelrt_torch.enable()            # before any CUDA memory is used
    ...train...
    print(torch.cuda.max_memory_reserved())      # answered by accelrt
    accelrt_torch.dump_snapshot("snap.pickle")   # https://pytorch.org/memory_viz

Or, for an unmodified script: ``ACCELRT_TORCH=1 python train.py`` (the ``.pth`` hook that
``pip install ./python`` puts in site-packages enables accelrt as soon as the script imports
torch), and ``ACCELRT_TRACE=run.trace.gz`` records an allocator trace of the run.

``enable()`` loads ``libaccelrt_torch.so`` (bundled in the installed package; or
``$ACCELRT_TORCH_LIB``; or the repository's ``target/release``), compiles a small C++ shim
against the installed PyTorch (with ``torch.utils.cpp_extension``; needs a C++ compiler and the
CUDA headers, cached after the first build) and installs accelrt's caching allocator as
PyTorch's CUDA allocator the way PyTorch installs its own: a complete
``c10::cuda::CUDACachingAllocator::CUDAAllocator``. Statistics, ``torch.cuda.graph``,
``torch.compile(mode="reduce-overhead")`` (cudagraph trees), ``MemPool``, ``record_stream``,
memory history and snapshots (with stack frames), out-of-memory errors and observers, trace
trackers, peer copies and IPC (``torch.multiprocessing``) go through accelrt. Without a
compiler, ``enable()`` falls back to ``torch.cuda.memory.CUDAPluggableAllocator`` with the two
required functions and warns about what is lost. The functions of this module
(``memory_stats()``, ``memory_snapshot()``, ``record_trace()``, ...) work either way.

The allocator reads ``ACCELRT_ALLOC_CONF`` (PyTorch's ``PYTORCH_CUDA_ALLOC_CONF`` syntax;
unset: accelrt's defaults, expandable segments with ``release_at_peak``). A run that does
not fit: ``enable(alloc_conf="chunk_mb:4")`` (memory first: on an H200, 0.6-2.8% reserved
over allocated on five real workloads instead of 1.5-5.7%, for 3-14% more step time),
``"halving_div:256"`` (finer chunks where memory strands: Llama-style training with varying
sequence lengths 1.011x instead of 1.029x at no cost in time, but training whose largest
blocks move every step, as GPT-2's do, 39% slower: replay a trace under it first), or
``"max_chunk_mb:2"`` (least memory, most driver calls). The library alone
(``load_library``, the statistics, snapshot and trace functions) does not need PyTorch;
``ACCELRT_TORCH_BACKEND=host`` runs it on accelrt's host backend, for tests.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "enable",
    "is_enabled",
    "status",
    "info",
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
    "record_trace",
    "stop_trace",
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
#: Opt-in for unmodified scripts (read by the .pth hook): 1/true/yes/on.
ENABLE_ENV = "ACCELRT_TORCH"
#: Record an allocator trace (format v2) of the run to this path (.gz: compressed).
TRACE_ENV = "ACCELRT_TRACE"
STATS_LEN = 113
#: Name of the compiled shim (changes with the interface it implements).
SHIM_NAME = "accelrt_torch_shim_v2"
_HERE = Path(__file__).resolve().parent
_SHIM_SOURCE = _HERE / "accelrt_torch_shim.cpp"

_lib: ctypes.CDLL | None = None
_lib_path: str | None = None
_mode: str | None = None  # "full" or "plain" once enabled
_shim_build: str | None = None
_missing: list[str] = []


class AccelrtError(RuntimeError):
    """A call into libaccelrt_torch.so failed; the message is the library's."""


# ---- the library ------------------------------------------------------------------------


def _library_candidates() -> list[Path]:
    env = os.environ.get(LIBRARY_ENV)
    repo = _HERE.parent.parent  # python/accelrt_torch -> the repository, in a checkout
    return [Path(p) for p in [env] if p] + [
        _HERE / LIBRARY_NAME,  # bundled by pip install
        repo / "target" / "release" / LIBRARY_NAME,
        repo / "target" / "debug" / LIBRARY_NAME,
    ]


def find_library(path: str | os.PathLike | None = None) -> str:
    """The path of libaccelrt_torch.so: `path`, else $ACCELRT_TORCH_LIB, else the one
    installed with this package, else the repository's target/release or target/debug."""
    candidates = [Path(path)] if path is not None else _library_candidates()
    for c in candidates:
        if c.is_file():
            return str(c.resolve())
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"{LIBRARY_NAME} not found (looked at: {looked}): install the package with "
        "`pip install ./python` (it builds the library), or build it with "
        "`cargo build --release -p accelrt-torch`, or pass its path to enable(path=...) "
        f"or set {LIBRARY_ENV}"
    )


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_int64, c_uint64 = ctypes.c_int, ctypes.c_int64, ctypes.c_uint64
    c_size, c_ssize, c_void_p = ctypes.c_size_t, ctypes.c_ssize_t, ctypes.c_void_p
    c_char_p = ctypes.c_char_p
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
        "accelrt_torch_record_peak_breakdown": (c_int, [c_int]),
        "accelrt_torch_peak_breakdown_json": (c_void_p, [c_int]),
        "accelrt_torch_stats_array": (c_int, [c_int, ctypes.POINTER(c_int64), c_size]),
        "accelrt_torch_reset_peak_stats": (c_int, [c_int]),
        "accelrt_torch_reset_accumulated_stats": (c_int, [c_int]),
        "accelrt_torch_cache_info": (c_int, [c_int, ctypes.POINTER(c_size)]),
        "accelrt_torch_snapshot_pickle": (c_void_p, [c_int, ctypes.POINTER(c_size)]),
        "accelrt_torch_record_history": (c_int, [c_int, c_int, c_size]),
        "accelrt_torch_pool_live_blocks": (c_ssize, [c_int, c_uint64, c_uint64, c_void_p, c_size]),
        "accelrt_torch_segment_of": (
            c_int,
            [c_void_p, ctypes.POINTER(c_int), ctypes.POINTER(c_uint64), ctypes.POINTER(c_uint64),
             ctypes.POINTER(c_int), ctypes.POINTER(c_uint64), ctypes.POINTER(c_uint64)],
        ),
        "accelrt_torch_config_string": (c_void_p, [c_int]),
        "accelrt_torch_record_trace_start": (c_int, [c_char_p, c_char_p]),
        "accelrt_torch_record_trace_stop": (c_int, []),
        "accelrt_torch_record_trace_active": (c_int, []),
        "accelrt_torch_last_error": (c_char_p, []),
        "accelrt_torch_last_oom": (c_int, [ctypes.POINTER(c_int64)]),
        "accelrt_torch_set_log_alloc_failures": (None, [c_int]),
        "accelrt_torch_free_buffer": (None, [c_void_p]),
        "accelrt_torch_version": (c_char_p, []),
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
    try:
        _declare(lib)
    except AttributeError as e:
        raise AccelrtError(
            f"{found} is older than this module ({e}): rebuild it (pip install ./python, or "
            "cargo build --release -p accelrt-torch)"
        ) from None
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


def _extensions_dir() -> Path:
    """Where torch.utils.cpp_extension builds (and caches) the shim."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    if base:
        return Path(base) / SHIM_NAME
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(SHIM_NAME, verbose=False))
    except Exception:  # no torch, or a PyTorch without the private helper
        return Path.home() / ".cache" / "torch_extensions" / SHIM_NAME


def _build_shim(verbose: bool) -> str:
    from torch.utils import cpp_extension

    # The shim has no device code, but without an architecture list cpp_extension asks each
    # device for its capability, which initialises CUDA, after which PyTorch refuses to swap
    # its allocator. Any list will do.
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not saved or saved == "native":
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    def build(ldflags: list[str]) -> str:
        return cpp_extension.load(
            name=SHIM_NAME,
            sources=[str(_SHIM_SOURCE)],
            extra_cflags=["-O2"],
            extra_ldflags=ldflags,
            with_cuda=True,
            is_python_module=False,
            verbose=verbose,
        )

    try:
        # The shim must share PyTorch's libstdc++. A compiler that links libstdc++ statically
        # (the GPU machine's CXX wrapper does) puts a second copy of its locale machinery in
        # the process, and formatting a number in a C++ message then crashed. Naming the
        # shared library first resolves every libstdc++ symbol there; where the linker cannot
        # find it, build as the compiler likes (`_libstdcxx_of` tells which it was).
        try:
            return build(["-l:libstdc++.so.6"])
        except Exception:  # noqa: BLE001 - any build failure: try the compiler's default
            return build([])
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def _install_shim(verbose: bool) -> None:
    """Build and install the shim (raises what went wrong)."""
    global _shim_build
    import torch

    path = _build_shim(verbose)
    if torch.cuda.is_initialized():
        raise AccelrtError(
            "CUDA was initialised while the shim was built, so PyTorch's allocator can no "
            "longer be swapped: set TORCH_CUDA_ARCH_LIST (e.g. 9.0) and call enable() again "
            "in a new process"
        )
    shim = ctypes.CDLL(path)
    shim.accelrt_shim_install.restype = ctypes.c_int
    shim.accelrt_shim_install.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
    shim.accelrt_shim_build.restype = ctypes.c_char_p
    err = ctypes.create_string_buffer(4096)
    if shim.accelrt_shim_install(_lib_path.encode(), err, len(err)) != 0:
        raise AccelrtError(
            f"installing accelrt as PyTorch's allocator failed: {err.value.decode()}"
        )
    _shim_build = f"{shim.accelrt_shim_build().decode()} ({path})"
    if _libstdcxx_of(path) == "static":
        warnings.warn(
            f"the accelrt shim ({path}) carries its own copy of libstdc++ (the C++ compiler, "
            f"CXX={os.environ.get('CXX', 'c++')!r}, links it statically): C++ code that "
            "formats numbers in error messages may crash. Rebuild with a compiler that links "
            "the shared libstdc++ (e.g. CXX=/usr/bin/g++ python -m accelrt_torch --build-shim)",
            stacklevel=3,
        )
        _shim_build += " [static libstdc++]"


def _libstdcxx_of(path: str) -> str:
    """Whether the shared object at ``path`` uses the process's shared libstdc++
    ("shared"), carries a static copy ("static"), or cannot be told ("unknown")."""

    class DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    try:
        lib = ctypes.CDLL(path)
        # std::locale::id::_M_id(): what num_put and every facet lookup goes through.
        addr = ctypes.cast(lib._ZNKSt6locale2id5_M_idEv, ctypes.c_void_p).value
        info = DlInfo()
        libc = ctypes.CDLL(None)
        if not addr or not libc.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)):
            return "unknown"
        where = os.path.realpath(info.dli_fname.decode())
    except (OSError, AttributeError, ValueError):
        return "unknown"
    return "static" if where == os.path.realpath(path) else "shared"


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
            "before any CUDA work (or run the script with ACCELRT_TORCH=1)"
        )
    lib = load_library(path)
    if lib.accelrt_torch_device_count() < 0:
        raise AccelrtError(f"accelrt cannot drive the GPU: {last_error()}")
    _missing.clear()
    mode = None
    if shim:
        try:
            _install_shim(verbose)
            mode = "full"
        except AccelrtError:
            raise
        except Exception as e:  # a compiler error, no CUDA headers, ...
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
                "torch.cuda.graph, torch.compile(mode='reduce-overhead') and torch.cuda.MemPool",
                "torch.cuda.set_per_process_memory_fraction",
                "Tensor.record_stream",
                "torch.cuda.empty_cache (use accelrt_torch.empty_cache)",
                "torch.cuda.memory_stats() and friends (use accelrt_torch's functions)",
                "torch.OutOfMemoryError on a failed allocation",
                "sharing CUDA tensors between processes",
            ]
        )
        mode = "plain"
    _mode = mode
    return status()


def is_enabled() -> bool:
    """Whether ``enable()`` made accelrt PyTorch's allocator in this process."""
    return _mode is not None


def status() -> dict:
    """How accelrt is wired: ``mode`` ("full": the C++ shim, PyTorch's whole allocator
    interface; "plain": alloc/free only; None: not enabled), ``library``, ``version``,
    ``shim`` (the shim's build) and ``missing`` (what does not work in this mode)."""
    version = None
    if _lib is not None:
        version = _lib.accelrt_torch_version().decode()
    return {
        "mode": _mode,
        "library": _lib_path,
        "version": version,
        "shim": _shim_build,
        "alloc_conf": os.environ.get("ACCELRT_ALLOC_CONF") if _mode is not None else None,
        "missing": list(_missing),
    }


def info() -> dict:
    """What this installation finds, without initialising CUDA: the library (path, version,
    devices or why none), the allocator configuration, PyTorch (version, CUDA, whether a
    compiler for the shim is there, whether the shim is built), and the opt-in variables."""
    out: dict[str, Any] = {"package": str(_HERE)}
    try:
        lib = load_library()
        out["library"] = _lib_path
        out["version"] = lib.accelrt_torch_version().decode()
        n = lib.accelrt_torch_device_count()
        out["backend"] = os.environ.get("ACCELRT_TORCH_BACKEND") or "cuda"
        out["devices"] = n if n >= 0 else f"unavailable: {last_error()}"
        if n > 0:
            ptr = lib.accelrt_torch_config_string(0)
            out["config"] = _take_buffer(ptr).decode() if ptr else f"error: {last_error()}"
    except (FileNotFoundError, OSError, AccelrtError) as e:
        out["library"] = f"not found: {e}"
    out["ACCELRT_ALLOC_CONF"] = os.environ.get("ACCELRT_ALLOC_CONF", "")
    out[ENABLE_ENV] = os.environ.get(ENABLE_ENV, "")
    out[TRACE_ENV] = os.environ.get(TRACE_ENV, "")
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        from torch.utils import cpp_extension

        out["cuda_home"] = cpp_extension.CUDA_HOME
        build = _extensions_dir()
        built = sorted(build.glob(f"{SHIM_NAME}*.so")) if build.is_dir() else []
        out["shim"] = (
            f"built: {built[0]}" if built
            else f"not built yet (enable() compiles {_SHIM_SOURCE.name} into {build})"
        )
    except ImportError as e:
        out["torch"] = f"not importable: {e}"
    out["enabled"] = status()["mode"]
    return out


# ---- trace recording --------------------------------------------------------------------------


class TraceRecording:
    """A recording started by ``record_trace``; ``stop()`` (or leaving a ``with`` block)
    writes the file."""

    def __init__(self, path: str):
        self.path = path

    def stop(self) -> str:
        stop_trace()
        return self.path

    def __enter__(self) -> "TraceRecording":
        return self

    def __exit__(self, *exc: Any) -> None:
        if _library().accelrt_torch_record_trace_active():
            self.stop()


def record_trace(path: str | os.PathLike, workload: str | None = None) -> TraceRecording:
    """Record every allocation, free and ``record_stream`` accelrt serves from now on to
    `path` as an allocator trace in format v2 (``traces/FORMAT.md``: CPU times, completion
    markers from accelrt's events, the run's real peaks in the header); gzip when the path
    ends in ``.gz``. The file is written by ``stop_trace()`` (or at process exit)."""
    path = os.fspath(path)
    name = (workload or Path(path).name).encode()
    _check(_library().accelrt_torch_record_trace_start(path.encode(), name), "record_trace")
    atexit.register(_stop_trace_at_exit)
    return TraceRecording(path)


def stop_trace() -> None:
    """Finish the recording started by ``record_trace``: synchronize, write the remaining
    completion markers and the file."""
    _check(_library().accelrt_torch_record_trace_stop(), "stop_trace")


def _stop_trace_at_exit() -> None:
    if _lib is not None and _lib.accelrt_torch_record_trace_active():
        try:
            stop_trace()
        except AccelrtError as e:
            warnings.warn(f"accelrt_torch: finishing the trace at exit: {e}", stacklevel=1)


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
    like PyTorch's; plus accelrt's ``num_page_steals``, ``num_pages_remapped``,
    ``num_moves_deferred``, ``num_moves_exempt`` (moves made while the moves' time budget was
    dry because the shortfall was at least 1/64 of what is reserved) and
    ``move_time_drawn_peak_us`` (the most of the moves' time
    budget drawn at once, in microseconds of driver time; the budget holds 25,000 at the
    start and at most 50,000), ``vm_call_us`` (microseconds this process spent in
    virtual-memory driver calls: creating, mapping with access, unmapping, releasing) and
    ``driver_calls.*`` (how many driver calls of each kind, and their ``total``)."""
    lib = _library()
    ptr = lib.accelrt_torch_memory_stats_json(_device_index(device))
    if not ptr:
        raise AccelrtError(f"memory_stats: {last_error()}")
    return dict(sorted(json.loads(_take_buffer(ptr)).items()))


def record_peak_breakdown(on: bool = True) -> None:
    """Record, on every device from now on, where reserved memory is each time it reaches a
    new peak (read it with ``peak_breakdown()``). Each new peak then costs a walk over the
    allocator's blocks, on the allocation that raised it; ``on=False`` stops and forgets."""
    if _library().accelrt_torch_record_peak_breakdown(1 if on else 0) != 0:
        raise AccelrtError(f"record_peak_breakdown: {last_error()}")


def peak_breakdown(device: Any = None) -> dict[str, int] | None:
    """Where `device`'s reserved memory was at its last new peak, in bytes: ``reserved`` =
    ``allocated`` + ``free_in_shared_pages`` (free bytes on pages that also hold allocated
    ones) + ``free_in_used_chunks`` (whole free pages of chunks that also back allocated
    pages: only requests fitting those holes can use them) + ``idle_chunks`` (chunks wholly in
    free blocks) + ``spare_chunks`` + ``free_in_segments`` (plain segments) + ``other``
    (frees waiting for other streams, allocations under way on other threads). Taken once
    the allocation that raised the peak is done.
    ``None`` until a peak is recorded (see ``record_peak_breakdown``)."""
    ptr = _library().accelrt_torch_peak_breakdown_json(_device_index(device))
    if not ptr:
        raise AccelrtError(f"peak_breakdown: {last_error()}")
    return json.loads(_take_buffer(ptr))


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
