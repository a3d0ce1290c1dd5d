"""Runs the C tests of per-connection control and batched delivery
(test_host_control.c): one process per C test, on both backends, then those
flagged "v" under valgrind (no error, nothing definitely lost) and those flagged
"a" under ASan/UBSan. The cases come from the TEST(...) table of the C file: a
C test added there is run here without further ado.

    python3 -m pytest -q tests/c/test_c_host_control.py
    python3 -m pytest -q tests/c/test_c_host_control.py -m "not valgrind"
"""

import os
import re

import pytest

from test_c_examples import BUILD, CFLAGS, INCLUDE, ROOT, VALGRIND, lib, run, valgrind_clean  # noqa: F401

SOURCE = ROOT / "tests" / "c" / "test_host_control.c"
ASAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def _cases():
    """(test name, seconds, flags) from each TEST(fn, secs, "flags") line."""
    found = re.findall(r'^\s*TEST\((test_\w+),\s*(\d+),\s*"(\w*)"\),', SOURCE.read_text(), re.M)
    assert found, f"no TEST(...) entries in {SOURCE}"
    return [(name, int(secs), flags) for name, secs, flags in found]


CASES = _cases()


def _ids(cases):
    return [c[0] for c in cases]


def _build(lib, suffix="", extra=()):
    out = BUILD / f"test_host_control{suffix}"
    run(
        ["cc", *CFLAGS, *extra, f"-I{INCLUDE}", SOURCE, "-o", out,
         f"-L{lib}", "-ltcpframe", f"-Wl,-rpath,{lib}", "-pthread"],
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def host_control_program(lib):
    """Built with the strict flags of every C test (-Werror)."""
    return _build(lib)


@pytest.fixture(scope="session")
def host_control_asan(lib):
    return _build(lib, "_asan", ASAN)


def run_case(exe, name, secs, backend, scale=1, prefix=()):
    env = {**os.environ, "TF_TEST_BACKEND": backend, "TF_TEST_SCALE": str(scale)}
    p = run([*prefix, exe, name], timeout=secs * scale + 60, check=False, env=env)
    text = f"{p.stdout}\n{p.stderr[-6000:]}"
    assert re.search(rf"^ok   {name} \(", p.stdout, re.M), text
    assert p.returncode == 0, text
    return p


def test_every_host_control_c_test_is_listed(host_control_program):
    """The TEST table the program runs is the one parsed here."""
    listed = {line.split()[0] for line in run([host_control_program, "--list"]).stdout.splitlines()}
    assert listed == {c[0] for c in CASES}


@pytest.mark.parametrize("backend", ["poll", "epoll"])
@pytest.mark.parametrize("name,secs,flags", CASES, ids=_ids(CASES))
def test_host_control_c(host_control_program, name, secs, flags, backend):
    run_case(host_control_program, name, secs, backend)


VALGRIND_CASES = [c for c in CASES if "v" in c[2]]
ASAN_CASES = [c for c in CASES if "a" in c[2]]


@pytest.mark.valgrind
@pytest.mark.parametrize("name,secs,flags", VALGRIND_CASES, ids=_ids(VALGRIND_CASES))
def test_host_control_c_under_valgrind(host_control_program, name, secs, flags):
    p = run_case(host_control_program, name, secs, "epoll", scale=8, prefix=VALGRIND)
    valgrind_clean(p.stderr)


@pytest.mark.parametrize("name,secs,flags", ASAN_CASES, ids=_ids(ASAN_CASES))
def test_host_control_c_under_asan(host_control_asan, name, secs, flags):
    p = run_case(host_control_asan, name, secs, "epoll", scale=2)
    assert "AddressSanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr[-6000:]
