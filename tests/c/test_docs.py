"""The README's promises that code can check: its C example compiles warning-free
against the header, and its static link line is exactly what the Rust toolchain
says libtcpframe.a needs."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_readme_c_example_compiles_and_links_as_c99(tmp_path):
    code = re.search(r"```c\n(.*?)```", README, re.S).group(1)
    src = tmp_path / "host.c"
    src.write_text(code)
    lib = ROOT / "target" / "release"
    subprocess.run(
        ["cc", "-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Werror",
         f"-I{ROOT / 'include'}", str(src), "-o", str(tmp_path / "host"), f"-L{lib}", "-ltcpframe"],
        check=True,
    )


def test_the_readme_static_link_line_matches_native_static_libs():
    out = subprocess.run(
        ["cargo", "rustc", "--quiet", "--release", "--lib", "--crate-type", "staticlib",
         "--target-dir", str(ROOT / "target" / "native-libs"), "--", "--print", "native-static-libs"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    printed = re.search(r"native-static-libs: (.*)", out.stderr + out.stdout).group(1).strip()
    line = re.search(r"target/release/libtcpframe\.a (.*)", README).group(1).strip()
    assert line == printed, f"README says {line!r}; the toolchain says {printed!r}"
