"""Runs the C tests of several loop threads (test_threads.c): one process per C
test on both backends with 2 loop threads (and 4 for the cheap ones), then the
whole program under valgrind with 2 loop threads (no error, nothing definitely
lost) and under ASan/UBSan. The cases come from the TEST(...) table of the C
file: a C test added there is run here without further ado.

    python3 -m pytest -q tests/c/test_c_threads.py
    python3 -m pytest -q tests/c/test_c_threads.py -m "not valgrind"
"""

import pytest

from test_c_examples import (  # noqa: F401  (lib is a fixture)
    ROOT, SANITIZERS, VALGRIND, build_c, c_test_cases, lib, listed_c_tests, run_c_tests,
    valgrind_clean)

SOURCE = ROOT / "tests" / "c" / "test_threads.c"
CASES = c_test_cases(SOURCE)
# Tests that pair connections across exactly two loops.
TWO_LOOPS_ONLY = {"test_cross_loop_sends_and_closes_racing_peer_closes"}


@pytest.fixture(scope="session")
def threads_program(lib):
    return build_c(lib, "test_threads", SOURCE)


@pytest.fixture(scope="session")
def threads_asan(lib):
    return build_c(lib, "test_threads_asan", SOURCE, SANITIZERS)


def run_prog(exe, names, secs, backend, threads, scale=1, prefix=()):
    return run_c_tests(exe, names, secs, backend, scale, prefix, {"TF_TEST_THREADS": str(threads)})


def test_every_c_test_is_listed(threads_program):
    assert listed_c_tests(threads_program) == {c[0] for c in CASES}


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
