"""Which names PyTorch's test files import that the installed PyTorch's modules lack.

    python3 scripts/torch-tests/missing_names.py .torch-tests/test/test_cuda.py ...

The test files come from the search index, not from the installed version's tag (see
.torch-tests/SOURCE.txt); this lists the mismatches so the runner's plugin can say what it
supplies for each (accelrt_plugin.py, COMPAT)."""

import ast
import importlib
import sys


def main() -> int:
    for path in sys.argv[1:]:
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("torch"):
                try:
                    mod = importlib.import_module(node.module)
                except Exception as e:  # noqa: BLE001
                    print(f"{path}: module {node.module}: {type(e).__name__}: {e}")
                    continue
                for alias in node.names:
                    if alias.name != "*" and not hasattr(mod, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except Exception:  # noqa: BLE001
                            print(f"{path}: {node.module}.{alias.name} (line {node.lineno})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
