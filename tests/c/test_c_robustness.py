"""Runs the C robustness regression tests (test_robustness.c, test_robustness_load.c):
one process per C test, on both backends, then the cheap ones under valgrind and
the use-after-free ones under ASan/UBSan. The cases come from the TEST(...) tables
of the C files: a C test added there is run here without further ado.

    python3 -m pytest -q tests/c/test_c_robustness.py
    python3 -m pytest -q tests/c/test_c_robustness.py -m "not valgrind"

(Not named test_robustness.py: tests/python has one, and scripts/test.sh collects
tests/c and tests/python in one session, where two test modules may not share a name.)
"""

import pytest

from test_c_examples import (  # noqa: F401  (lib is a fixture)
    ROOT, SANITIZERS, VALGRIND, build_c, c_test_cases, lib, listed_c_tests, run_c_tests,
    valgrind_clean)

PROGRAMS = ["test_robustness", "test_robustness_load"]
SOURCES = {p: ROOT / "tests" / "c" / f"{p}.c" for p in PROGRAMS}
# (program, test name, seconds, flags)
CASES = [(prog, *case) for prog, src in SOURCES.items() for case in c_test_cases(src)]


def _ids(cases):
    return [c[1] for c in cases]


@pytest.fixture(scope="session")
def robustness_programs(lib):
    return {p: build_c(lib, p, SOURCES[p]) for p in PROGRAMS}


@pytest.fixture(scope="session")
def robustness_asan(lib):
    return {p: build_c(lib, f"{p}_asan", SOURCES[p], SANITIZERS) for p in PROGRAMS}


def run_case(exe, name, secs, backend, scale=1, prefix=(), env_extra=None):
    return run_c_tests(exe, [name], secs, backend, scale, prefix, env_extra)


def test_every_c_test_is_listed(robustness_programs):
    """The TEST tables the programs run are the ones parsed here."""
    listed = set().union(*(listed_c_tests(exe) for exe in robustness_programs.values()))
    assert listed == {c[1] for c in CASES}


@pytest.mark.parametrize("backend", ["poll", "epoll"])
@pytest.mark.parametrize("prog,name,secs,flags", CASES, ids=_ids(CASES))
def test_c(robustness_programs, prog, name, secs, flags, backend):
    p = run_case(robustness_programs[prog], name, secs, backend)
    for line in p.stdout.splitlines():  # the figures some tests print, shown with -rA / -s
        if line.startswith("    "):
            print(line)


VALGRIND_CASES = [c for c in CASES if "v" in c[3]]
ASAN_CASES = [c for c in CASES if "a" in c[3]]


@pytest.mark.valgrind
@pytest.mark.parametrize("prog,name,secs,flags", VALGRIND_CASES, ids=_ids(VALGRIND_CASES))
def test_c_under_valgrind(robustness_programs, prog, name, secs, flags):
    p = run_case(robustness_programs[prog], name, secs, "epoll", scale=8, prefix=VALGRIND)
    valgrind_clean(p.stderr)


@pytest.mark.parametrize("prog,name,secs,flags", ASAN_CASES, ids=_ids(ASAN_CASES))
def test_c_under_asan(robustness_asan, prog, name, secs, flags):
    p = run_case(robustness_asan[prog], name, secs, "epoll", scale=2)
    assert "AddressSanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr[-6000:]
