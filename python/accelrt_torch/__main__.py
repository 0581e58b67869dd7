"""``python -m accelrt_torch``: what this installation finds (library, devices,
configuration, PyTorch, CUDA, the shim), without initialising CUDA.

    python -m accelrt_torch              # a readable summary
    python -m accelrt_torch --json       # the same as JSON
    python -m accelrt_torch --build-shim # also compile the C++ shim now (cached)
"""

from __future__ import annotations

import argparse
import json
import sys

import accelrt_torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m accelrt_torch", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--build-shim", action="store_true", help="compile the C++ shim now")
    args = p.parse_args(argv)
    if args.build_shim:
        try:
            path = accelrt_torch._build_shim(verbose=False)
            print(f"shim built: {path}", file=sys.stderr)
        except Exception as e:
            print(f"shim build failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    info = accelrt_torch.info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    found = not str(info.get("library", "")).startswith("not found")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
