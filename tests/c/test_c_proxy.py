"""Runs tests/c/test_proxy.c (PROXY protocol, max connections per IP, tf_server_drain):
one process per C test, on both backends, then the cheap ones under valgrind. The
cases come from the TEST(...) table of the C file: a C test added there is run here
without further ado.

    python3 -m pytest -q tests/c/test_c_proxy.py
    python3 -m pytest -q tests/c/test_c_proxy.py -m "not valgrind"

The one case that waits out the 5-second header deadline runs once per backend
(not under valgrind); the whole module takes about 30 s, most of it valgrind.
"""

import pytest

from test_c_examples import (  # noqa: F401  (lib is a fixture)
    ROOT, VALGRIND, build_c, c_test_cases, lib, listed_c_tests, run_c_tests, valgrind_clean)

SOURCE = ROOT / "tests" / "c" / "test_proxy.c"
CASES = c_test_cases(SOURCE)
VALGRIND_CASES = [c for c in CASES if "v" in c[2]]


@pytest.fixture(scope="session")
def proxy_program(lib):
    return build_c(lib, "test_proxy", SOURCE)


def _run(exe, name, secs, backend, scale=1, prefix=()):
    return run_c_tests(exe, [name], secs, backend, scale, prefix)


def test_every_c_proxy_test_is_listed(proxy_program):
    """The TEST table the program runs is the one parsed here."""
    assert listed_c_tests(proxy_program) == {c[0] for c in CASES}


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
