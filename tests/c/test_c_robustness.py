"""Runs the C robustness regression tests (test_robustness.c, test_robustness_load.c):
one process per C test, on both backends, then the cheap ones under valgrind and
the use-after-free ones under ASan/UBSan. The cases come from the TEST(...) tables
of the C files: a C test added there is run here without further ado.

    python3 -m pytest -q tests/c/test_c_robustness.py
    python3 -m pytest -q tests/c/test_c_robustness.py -m "not valgrind"

(Not named test_robustness.py: tests/python has one, and scripts/test.sh collects
tests/c and tests/python in one session, where two test modules may not share a name.)
"""

import os
import re

import pytest

from test_c_examples import BUILD, CFLAGS, INCLUDE, ROOT, VALGRIND, lib, run, valgrind_clean  # noqa: F401


PROGRAMS = ["test_robustness", "test_robustness_load"]
SOURCES = {p: ROOT / "tests" / "c" / f"{p}.c" for p in PROGRAMS}
HEADER = ROOT / "tests" / "c" / "robust.h"
ASAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def _cases():
    """(program, test name, seconds, flags) from each TEST(fn, secs, "flags") line."""
    rx = re.compile(r'^\s*TEST\((test_\w+),\s*(\d+),\s*"(\w*)"\),', re.M)
    out = []
    for prog, src in SOURCES.items():
        found = rx.findall(src.read_text())
        assert found, f"no TEST(...) entries in {src}"
        out += [(prog, name, int(secs), flags) for name, secs, flags in found]
    return out


CASES = _cases()


def _ids(cases):
    return [c[1] for c in cases]


def _build(lib, prog, suffix="", extra=()):
    out = BUILD / f"{prog}{suffix}"
    run(
        ["cc", *CFLAGS, *extra, f"-I{INCLUDE}", SOURCES[prog], "-o", out,
         f"-L{lib}", "-ltcpframe", f"-Wl,-rpath,{lib}", "-pthread"],
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def robustness_programs(lib):
    """The two programs, built with the strict flags of every C test (-Werror)."""
    return {p: _build(lib, p) for p in PROGRAMS}


@pytest.fixture(scope="session")
def robustness_asan(lib):
    return {p: _build(lib, p, "_asan", ASAN) for p in PROGRAMS}


def run_case(exe, name, secs, backend, scale=1, prefix=(), env_extra=None):
    env = {**os.environ, "TF_TEST_BACKEND": backend, "TF_TEST_SCALE": str(scale)}
    env.update(env_extra or {})
    p = run([*prefix, exe, name], timeout=secs * scale + 60, check=False, env=env)
    text = f"{p.stdout}\n{p.stderr[-6000:]}"
    assert re.search(rf"^ok   {name} \(", p.stdout, re.M), text
    assert p.returncode == 0, text
    return p


def test_every_c_test_is_listed(robustness_programs):
    """The TEST tables the programs run are the ones parsed here."""
    listed = set()
    for exe in robustness_programs.values():
        listed |= {line.split()[0] for line in run([exe, "--list"]).stdout.splitlines()}
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
