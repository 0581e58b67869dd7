"""Build and install accelrt_torch with libaccelrt_torch.so inside it.

`pip install ./python` (from the repository root) runs `cargo build --release -p
accelrt-torch` (a Rust toolchain is needed; the library is built without debug info into
target/wheel) and puts the library next to the package, so nothing has to point at it; it also
installs `accelrt_torch.pth`, the `ACCELRT_TORCH=1` opt-in for unmodified scripts.

`ACCELRT_TORCH_PREBUILT=/path/libaccelrt_torch.so` skips cargo and bundles that file instead
(`scripts/build-wheel.sh` builds a wheel for a machine without cargo). PyTorch is not a
dependency: the library and the module's statistics, snapshot and trace functions work
without it, and `enable()` uses whichever PyTorch is installed.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:
    from wheel.bdist_wheel import bdist_wheel
except ImportError:  # setuptools >= 70 ships it
    from setuptools.command.bdist_wheel import bdist_wheel

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LIBRARY = "libaccelrt_torch.so"
# What .pth runs at every interpreter start: nothing unless the variables are set.
PTH_LINE = (
    "import os; (os.environ.get('ACCELRT_TORCH', '') or os.environ.get('ACCELRT_TRACE', '')) "
    "and __import__('accelrt_torch._autoload', fromlist=['install']).install()\n"
)


def version() -> str:
    try:
        text = (REPO / "Cargo.toml").read_text()
        m = re.search(r'\[workspace\.package\][^\[]*?version\s*=\s*"([^"]+)"', text, re.S)
        if m:
            return m.group(1)
    except OSError:
        pass
    return "0.1.0"


def build_library() -> Path:
    prebuilt = os.environ.get("ACCELRT_TORCH_PREBUILT")
    if prebuilt:
        path = Path(prebuilt)
        if not path.is_file():
            raise SystemExit(f"ACCELRT_TORCH_PREBUILT={prebuilt}: no such file")
        return path
    if not (REPO / "Cargo.toml").is_file():
        raise SystemExit(
            f"{REPO / 'Cargo.toml'} not found: build from the accelrt repository "
            "(`pip install ./python`), or set ACCELRT_TORCH_PREBUILT to a built library"
        )
    cargo = shutil.which("cargo")
    if cargo is None:
        raise SystemExit(
            "cargo not found: install Rust (https://rustup.rs) to build libaccelrt_torch.so, "
            "or set ACCELRT_TORCH_PREBUILT to a built library"
        )
    env = dict(os.environ)
    target = Path(env.setdefault("CARGO_TARGET_DIR", str(REPO / "target" / "wheel")))
    env.setdefault("CARGO_PROFILE_RELEASE_DEBUG", "0")
    env.setdefault("CARGO_PROFILE_RELEASE_STRIP", "true")
    subprocess.run(
        [cargo, "build", "--release", "-p", "accelrt-torch"], cwd=REPO, env=env, check=True
    )
    return target / "release" / LIBRARY


class BuildPy(build_py):
    """Python files, then the library into the package and the .pth beside it."""

    def run(self):
        super().run()
        lib = build_library()
        package = Path(self.build_lib) / "accelrt_torch"
        package.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, package / LIBRARY)
        (Path(self.build_lib) / "accelrt_torch.pth").write_text(PTH_LINE)


class BinaryDistribution(Distribution):
    """A platform wheel: the package carries a native library."""

    def has_ext_modules(self):
        return True


class Wheel(bdist_wheel):
    """py3-none-PLATFORM: the library does not depend on the Python version."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(
    name="accelrt-torch",
    version=version(),
    description="accelrt's caching allocator as PyTorch's CUDA allocator",
    license="MIT OR Apache-2.0",
    python_requires=">=3.9",
    packages=["accelrt_torch"],
    package_data={"accelrt_torch": ["accelrt_torch_shim.cpp", LIBRARY]},
    include_package_data=True,
    distclass=BinaryDistribution,
    cmdclass={"build_py": BuildPy, "bdist_wheel": Wheel},
    zip_safe=False,
)
