"""Runs the C tests of several loop threads (test_threads.c): one process per C
test on both backends with 2 loop threads (and 4 for the cheap ones), then the
whole program under valgrind with 2 loop threads (no error, nothing definitely
lost) and under ASan/UBSan. The cases come from the TEST(...) table of the C
file: a C test added there is run here without further ado.

    python3 -m pytest -q tests/c/test_c_threads.py
    python3 -m pytest -q tests/c/test_c_threads.py -m "not valgrind"
"""

import os
import re

import pytest

from test_c_examples import BUILD, CFLAGS, INCLUDE, ROOT, VALGRIND, lib, run, valgrind_clean  # noqa: F401

SOURCE = ROOT / "tests" / "c" / "test_threads.c"
ASAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def _cases():
    """(test name, seconds, flags) from each TEST(fn, secs, "flags") line."""
    found = re.findall(r'^\s*TEST\((test_\w+),\s*(\d+),\s*"(\w*)"\),', SOURCE.read_text(), re.M)
    assert found, f"no TEST(...) entries in {SOURCE}"
    return [(name, int(secs), flags) for name, secs, flags in found]


CASES = _cases()
# Tests that pair connections across exactly two loops.
TWO_LOOPS_ONLY = {"test_cross_loop_sends_and_closes_racing_peer_closes"}


def _build(lib, suffix="", extra=()):
    out = BUILD / f"test_threads{suffix}"
    run(
        ["cc", *CFLAGS, *extra, f"-I{INCLUDE}", SOURCE, "-o", out,
         f"-L{lib}", "-ltcpframe", f"-Wl,-rpath,{lib}", "-pthread"],
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def threads_program(lib):
    """Built with the strict flags of every C test (-Werror)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    return _build(lib)


@pytest.fixture(scope="session")
def threads_asan(lib):
    BUILD.mkdir(parents=True, exist_ok=True)
    return _build(lib, "_asan", ASAN)


def run_prog(exe, names, secs, backend, threads, scale=1, prefix=()):
    env = {**os.environ, "TF_TEST_BACKEND": backend, "TF_TEST_SCALE": str(scale), "TF_TEST_THREADS": str(threads)}
    p = run([*prefix, exe, *names], timeout=secs * scale + 60, check=False, env=env)
    text = f"{p.stdout}\n{p.stderr[-6000:]}"
    for name in names:
        assert re.search(rf"^ok   {name} \(", p.stdout, re.M), text
    assert p.returncode == 0, text
    return p


def test_every_c_test_is_listed(threads_program):
    listed = {line.split()[0] for line in run([threads_program, "--list"]).stdout.splitlines()}
    assert listed == {c[0] for c in CASES}


@pytest.mark.parametrize("backend", ["poll", "epoll"])
@pytest.mark.parametrize("name,secs,flags", CASES, ids=[c[0] for c in CASES])
def test_c(threads_program, name, secs, flags, backend):
    run_prog(threads_program, [name], secs, backend, 2)


FOUR = [c for c in CASES if c[0] not in TWO_LOOPS_ONLY]


@pytest.mark.parametrize("name,secs,flags", FOUR, ids=[c[0] for c in FOUR])
def test_c_with_four_loops(threads_program, name, secs, flags):
    run_prog(threads_program, [name], secs, "epoll", 4)


@pytest.mark.valgrind
@pytest.mark.parametrize("backend", ["poll", "epoll"])
def test_c_under_valgrind(threads_program, backend):
    cases = [c for c in CASES if "v" in c[2]]
    p = run_prog(threads_program, [c[0] for c in cases], sum(c[1] for c in cases), backend, 2, scale=8, prefix=VALGRIND)
    valgrind_clean(p.stderr)


def test_c_under_asan(threads_asan):
    p = run_prog(threads_asan, [c[0] for c in CASES], sum(c[1] for c in CASES), "epoll", 2, scale=2)
    assert "AddressSanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr[-6000:]
