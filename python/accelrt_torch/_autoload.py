"""The opt-in for unmodified scripts: ``ACCELRT_TORCH=1 python train.py``.

``pip install ./python`` puts ``accelrt_torch.pth`` in site-packages; Python runs its one
line at start-up, which calls ``install()`` here only when ``ACCELRT_TORCH`` or
``ACCELRT_TRACE`` is set (otherwise nothing is imported). ``install()`` does not import torch
(that would slow every Python process down): it waits for the script's own ``import torch``
and, right after torch's module has run and before the script can touch CUDA, calls
``accelrt_torch.enable()`` (and ``record_trace($ACCELRT_TRACE)`` when set).

``ACCELRT_TORCH``: ``1``/``true``/``yes``/``on`` enable; ``0``/``false``/``no``/``off``/empty
do not; ``strict`` enables and makes a failure to enable an error instead of a warning.
``ACCELRT_TRACE=PATH`` implies enabling.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import warnings
from typing import Mapping

ON = ("1", "true", "yes", "on", "strict")
OFF = ("", "0", "false", "no", "off")


def decision(environ: Mapping[str, str] = os.environ) -> tuple[bool, bool, str | None]:
    """(enable, strict, trace path) from the environment; a value that is neither on nor off
    raises ValueError naming the variable."""
    raw = environ.get("ACCELRT_TORCH", "").strip().lower()
    if raw not in ON + OFF:
        raise ValueError(
            f"ACCELRT_TORCH={environ.get('ACCELRT_TORCH')!r}: use 1 (enable accelrt), strict "
            "(enable, and fail if it cannot be), or 0"
        )
    trace = environ.get("ACCELRT_TRACE", "").strip() or None
    return (raw in ON or trace is not None), raw == "strict", trace


def _after_torch() -> None:
    enable, strict, trace = decision()
    if not enable:
        return
    import accelrt_torch

    try:
        accelrt_torch.enable()
        if trace is not None:
            accelrt_torch.record_trace(trace)
    except Exception as e:
        if strict:
            raise
        warnings.warn(
            f"accelrt_torch: ACCELRT_TORCH is set but accelrt could not be enabled, PyTorch's "
            f"own allocator stays: {type(e).__name__}: {e}",
            stacklevel=2,
        )


class _TorchHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of ``torch`` so that enabling runs right after
    torch's module has executed."""

    def find_spec(self, name, path, target=None):  # noqa: D102
        if name != "torch":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module):
            run(module)
            _after_torch()

        loader.exec_module = exec_module
        return spec


def install() -> bool:
    """Arrange for ``enable()`` after ``import torch`` when the environment asks for it;
    returns whether it does."""
    try:
        enable, strict, _ = decision()
    except ValueError as e:
        warnings.warn(f"accelrt_torch: {e}", stacklevel=2)
        return False
    if not enable:
        return False
    if "torch" in sys.modules:
        _after_torch()
    elif not any(isinstance(f, _TorchHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchHook())
    return True
