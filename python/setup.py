"""Build hook of the tcpframe Python package (metadata is in pyproject.toml).

setuptools-rust compiles the tcpframe crate -- a cdylib with a C ABI and no Python
bindings (Binding.NoBinding) -- with cargo, and installs the library inside the package
as tcpframe/libtcpframe.abi3.so, where tcpframe._lib looks first. So

    pip install ./python            # needs cargo; builds the library into the package
    python -m build ./python        # an sdist that carries the crate, and a wheel

give a package that works with no TCPFRAME_LIB and no checkout around. The library does
not link against Python, so the wheel is tagged py3-none-<platform>: one wheel per
platform serves every Python 3 version.

The crate is the repository root (python/..) in a checkout; an sdist carries a copy of
it in rust/. CARGO_TARGET_DIR defaults to target/python-wheel of the crate, so a
package build never replaces the target/release/libtcpframe.so of the development flow.
"""
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.sdist import sdist
from setuptools_rust import Binding, RustExtension, Strip

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:  # pragma: no cover - older setuptools: the wheel package's
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
# What cargo needs to build the library (tests, examples and benches are not needed).
CRATE_FILES = ["Cargo.toml", "Cargo.lock", "build.rs", "cbindgen.toml", "src", "include"]

if (HERE / "rust" / "Cargo.toml").is_file():  # an unpacked sdist
    CRATE = HERE / "rust"
else:  # a checkout: python/ sits in the crate
    CRATE = HERE.parent
if not (CRATE / "Cargo.toml").is_file():
    raise SystemExit(f"tcpframe: no Cargo.toml in {CRATE}: build from a tcpframe checkout or its sdist")

os.environ.setdefault("CARGO_TARGET_DIR", str(CRATE / "target" / "python-wheel"))


class SdistWithCrate(sdist):
    """The sdist carries the crate in rust/, so a wheel can be built from it alone."""

    def make_release_tree(self, base_dir: str, files: list) -> None:
        super().make_release_tree(base_dir, files)
        dest = Path(base_dir) / "rust"
        for name in CRATE_FILES:
            src = CRATE / name
            if src.is_dir():
                shutil.copytree(src, dest / name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("target", "__pycache__"))
            elif src.is_file():
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)


class PlatformWheel(bdist_wheel):
    """py3-none-<platform>: the library is native code, but not a Python extension."""

    def get_tag(self) -> tuple:
        _python, _abi, plat = super().get_tag()
        return "py3", "none", plat


setup(
    rust_extensions=[
        RustExtension(
            "tcpframe.libtcpframe",  # -> tcpframe/libtcpframe.abi3.so
            path=os.path.relpath(CRATE / "Cargo.toml", HERE),
            binding=Binding.NoBinding,
            py_limited_api=True,  # names the file .abi3.so, whatever the Python version
            cargo_manifest_args=["--locked"],
            strip=Strip.Debug,  # the release profile keeps line tables; a wheel need not
        )
    ],
    cmdclass={"sdist": SdistWithCrate, "bdist_wheel": PlatformWheel},
    zip_safe=False,
)
