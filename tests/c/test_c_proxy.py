"""Runs tests/c/test_proxy.c (PROXY protocol, max connections per IP, tf_server_drain):
one process per C test, on both backends, then the cheap ones under valgrind. The
cases come from the TEST(...) table of the C file: a C test added there is run here
without further ado.

    python3 -m pytest -q tests/c/test_c_proxy.py
    python3 -m pytest -q tests/c/test_c_proxy.py -m "not valgrind"

The one case that waits out the 5-second header deadline runs once per backend
(not under valgrind); the whole module takes about 30 s, most of it valgrind.
"""

import os
import re

import pytest

from test_c_examples import BUILD, CFLAGS, INCLUDE, ROOT, VALGRIND, lib, run, valgrind_clean  # noqa: F401

SOURCE = ROOT / "tests" / "c" / "test_proxy.c"


def _cases():
    """(test name, seconds, flags) from each TEST(fn, secs, "flags") line."""
    found = re.findall(r'^\s*TEST\((test_\w+),\s*(\d+),\s*"(\w*)"\),', SOURCE.read_text(), re.M)
    assert found, f"no TEST(...) entries in {SOURCE}"
    return [(name, int(secs), flags) for name, secs, flags in found]


CASES = _cases()
VALGRIND_CASES = [c for c in CASES if "v" in c[2]]


@pytest.fixture(scope="session")
def proxy_program(lib):
    """test_proxy, built with the strict flags of every C test (-Werror)."""
    out = BUILD / "test_proxy"
    run(
        ["cc", *CFLAGS, f"-I{INCLUDE}", SOURCE, "-o", out,
         f"-L{lib}", "-ltcpframe", f"-Wl,-rpath,{lib}", "-pthread"],
    )  # fmt: skip
    return out


def _run(exe, name, secs, backend, scale=1, prefix=()):
    env = {**os.environ, "TF_TEST_BACKEND": backend, "TF_TEST_SCALE": str(scale)}
    p = run([*prefix, exe, name], timeout=secs * scale + 60, check=False, env=env)
    text = f"{p.stdout}\n{p.stderr[-6000:]}"
    assert re.search(rf"^ok   {name} \(", p.stdout, re.M), text
    assert p.returncode == 0, text
    return p


def test_every_c_proxy_test_is_listed(proxy_program):
    """The TEST table the program runs is the one parsed here."""
    listed = {line.split()[0] for line in run([proxy_program, "--list"]).stdout.splitlines()}
    assert listed == {c[0] for c in CASES}


@pytest.mark.parametrize("backend", ["poll", "epoll"])
@pytest.mark.parametrize("name,secs,flags", CASES, ids=[c[0] for c in CASES])
def test_c_proxy(proxy_program, name, secs, flags, backend):
    p = _run(proxy_program, name, secs, backend)
    for line in p.stdout.splitlines():  # the figures some tests print, shown with -rA / -s
        if line.startswith("    "):
            print(line)


@pytest.mark.valgrind
@pytest.mark.parametrize("name,secs,flags", VALGRIND_CASES, ids=[c[0] for c in VALGRIND_CASES])
def test_c_proxy_under_valgrind(proxy_program, name, secs, flags):
    p = _run(proxy_program, name, secs, "epoll", scale=8, prefix=VALGRIND)
    valgrind_clean(p.stderr)
