"""The package as a user gets it: `python -m build ./python` (an sdist carrying the
crate, then a wheel built from that sdist alone) gives a platform wheel that carries
libtcpframe and works in a fresh virtual environment, run from outside the repository,
with no TCPFRAME_LIB. Slow: it compiles the crate (compiled dependencies are cached in
target/python-wheel)."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

ROUND_TRIP = r'''
import sys, threading, tcpframe
path = tcpframe.library_path()
print("library", path)
assert path.startswith(sys.prefix), (path, sys.prefix)

holder = {}
with tcpframe.Server(on_message=lambda conn, data: holder["s"].send(conn, data[::-1])) as srv:
    holder["s"] = srv
    with tcpframe.Client("127.0.0.1", srv.port) as c:
        assert c.request(b"wheel") == b"leehw"

with tcpframe.Server(on_messages=lambda batch: holder["b"].send_many(batch)) as srv:
    holder["b"] = srv
    with tcpframe.Client("127.0.0.1", srv.port) as c:
        c.send_many([b"a", b"b"])
        assert [c.recv(), c.recv()] == [b"a", b"b"]

with tcpframe.PullServer() as srv:
    def serve():
        for ev in srv.events(timeout_ms=5000):
            if ev.kind == tcpframe.EventKind.MESSAGE:
                srv.send(ev.conn, ev.data)
                return
    t = threading.Thread(target=serve)
    t.start()
    with tcpframe.Client("127.0.0.1", srv.port) as c:
        assert c.request(b"pull") == b"pull"
    t.join(5)
print("round trips ok", tcpframe.library_version())
'''


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TCPFRAME_LIB", "PYTHONPATH", "CARGO_TARGET_DIR", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def _run(cmd, cwd, env, timeout):
    out = subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.mark.timeout(1200)
def test_wheel_works_in_a_fresh_venv_outside_the_repository(tmp_path):
    if shutil.which("cargo") is None:
        pytest.skip("cargo is needed to build the wheel")
    dist = tmp_path / "dist"
    # Compiled dependencies are reused between runs; the crate itself is compiled from
    # the sdist's copy.
    build_env = _env(CARGO_TARGET_DIR=str(REPO / "target" / "python-wheel"))
    try:
        import build  # noqa: F401 - the PyPA front end (scripts/deps.sh installs it)
        cmd = [sys.executable, "-m", "build", "--outdir", dist, REPO / "python"]
    except ImportError:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, REPO / "python"]
    _run(cmd, tmp_path, build_env, timeout=1100)

    wheels = list(dist.glob("tcpframe-*.whl"))
    assert len(wheels) == 1, list(dist.iterdir())
    wheel = wheels[0]
    assert "-py3-none-linux_" in wheel.name or sys.platform != "linux", wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "tcpframe/libtcpframe.abi3.so" in names and "tcpframe/py.typed" in names, names

    venv_dir = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv_dir], tmp_path, _env(), timeout=120)
    py = venv_dir / "bin" / "python"
    _run([py, "-m", "pip", "install", "--no-index", "--no-deps", wheel], tmp_path, _env(), timeout=300)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    script = outside / "round_trip.py"
    script.write_text(ROUND_TRIP)
    out = _run([py, script], outside, _env(), timeout=60)
    assert "round trips ok" in out.stdout
    assert f"library {venv_dir}" in out.stdout
