"""Runs the C tests of per-connection control and batched delivery
(test_host_control.c): one process per C test, on both backends, then those
flagged "v" under valgrind (no error, nothing definitely lost) and those flagged
"a" under ASan/UBSan. The cases come from the TEST(...) table of the C file: a
C test added there is run here without further ado.

    python3 -m pytest -q tests/c/test_c_host_control.py
    python3 -m pytest -q tests/c/test_c_host_control.py -m "not valgrind"
"""

import pytest

from test_c_examples import (  # noqa: F401  (lib is a fixture)
    ROOT, SANITIZERS, VALGRIND, build_c, c_test_cases, lib, listed_c_tests, run_c_tests,
    valgrind_clean)

SOURCE = ROOT / "tests" / "c" / "test_host_control.c"
CASES = c_test_cases(SOURCE)


def _ids(cases):
    return [c[0] for c in cases]


@pytest.fixture(scope="session")
def host_control_program(lib):
    return build_c(lib, "test_host_control", SOURCE)


@pytest.fixture(scope="session")
def host_control_asan(lib):
    return build_c(lib, "test_host_control_asan", SOURCE, SANITIZERS)


def run_case(exe, name, secs, backend, scale=1, prefix=()):
    return run_c_tests(exe, [name], secs, backend, scale, prefix)


def test_every_host_control_c_test_is_listed(host_control_program):
    """The TEST table the program runs is the one parsed here."""
    assert listed_c_tests(host_control_program) == {c[0] for c in CASES}


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
