"""Shared fixtures: the in-tree package on sys.path, servers that are always freed,
clients that are always closed, and a thread-safe recorder of callback calls."""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))

# The suite tests the library built from this checkout (`make lib`): a libtcpframe an
# editable install (`pip install -e ./python`) left inside python/tcpframe/ would
# otherwise be found first. TCPFRAME_LIB, when set, still wins.
if not os.environ.get("TCPFRAME_LIB"):
    _target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target") / "release" / "libtcpframe.so"
    if _target.is_file():
        os.environ["TCPFRAME_LIB"] = str(_target)

import tcpframe  # noqa: E402
from tcpframe import EventKind, StoppedError, TfError  # noqa: E402

BACKENDS = ["poll", "epoll"] if sys.platform.startswith("linux") else ["poll"]
WAIT = 5.0  # seconds: the bound of every wait in this suite


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a second")


@pytest.fixture(scope="session", autouse=True)
def _library():
    try:
        return tcpframe.load_library()
    except tcpframe.LibraryNotFoundError as e:
        pytest.exit(f"libtcpframe not available: {e}", returncode=3)


def wait_until(predicate, timeout=WAIT, what="condition"):
    """Poll `predicate` every 5 ms for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


class Recorder:
    """Callbacks that record what the loop thread told us; waits are bounded."""

    def __init__(self, accept=True):
        self.accept = accept
        self.cond = threading.Condition()
        self.connects = []   # (conn, peer)
        self.messages = []   # (conn, data)
        self.closes = []     # (conn, reason)
        self.threads = set()

    def on_connect(self, conn, peer):
        with self.cond:
            self.threads.add(threading.get_ident())
            self.connects.append((conn, peer))
            self.cond.notify_all()
        return self.accept

    def on_message(self, conn, data):
        with self.cond:
            self.threads.add(threading.get_ident())
            self.messages.append((conn, data))
            self.cond.notify_all()

    def on_close(self, conn, reason):
        with self.cond:
            self.threads.add(threading.get_ident())
            self.closes.append((conn, reason))
            self.cond.notify_all()

    def callbacks(self):
        return dict(on_connect=self.on_connect, on_message=self.on_message, on_close=self.on_close)

    def wait(self, predicate, timeout=WAIT, what="callbacks"):
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; connects={self.connects} "
                    f"closes={self.closes} messages={len(self.messages)}")

    def wait_connects(self, n=1):
        self.wait(lambda r: len(r.connects) >= n, what=f"{n} on_connect")
        return self.connects[n - 1][0]

    def wait_close(self, conn):
        self.wait(lambda r: any(c == conn for c, _ in r.closes), what=f"on_close({conn})")
        return [reason for c, reason in self.closes if c == conn]


class PullPump:
    """Feeds a PullServer's events into a Recorder from a thread of its own (echoing
    messages when asked; WRITABLE events go to `writable`), so that a test can be
    written once for both server kinds."""

    def __init__(self, srv, rec, echo=False):
        self.srv, self.rec, self.echo = srv, rec, echo
        self.writable = []
        self.done = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, name="pump", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.done.is_set():
                try:
                    events = self.srv.poll(max=64, timeout_ms=20)
                except StoppedError:
                    return
                for ev in events:
                    if ev.kind == EventKind.CONNECT:
                        self.rec.on_connect(ev.conn, ev.peer)
                    elif ev.kind == EventKind.MESSAGE:
                        self.rec.on_message(ev.conn, ev.data)
                        if self.echo:
                            try:
                                self.srv.send(ev.conn, ev.data)
                            except TfError:
                                pass
                    elif ev.kind == EventKind.CLOSE:
                        self.rec.on_close(ev.conn, ev.reason)
                    elif ev.kind == EventKind.WRITABLE:
                        with self.rec.cond:
                            self.writable.append(ev.conn)
                            self.rec.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - re-raised by stop()
            self.error = exc

    def stop(self):
        self.done.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "pull pump did not stop"
        if self.error is not None:
            raise self.error



@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def make_server():
    """make_server(**Server kwargs) -> Server; every server is freed at teardown."""
    made = []

    def make(cls=tcpframe.Server, **kw):
        kw.setdefault("address", "127.0.0.1:0")
        srv = cls(**kw)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.free()


@pytest.fixture
def make_client():
    made = []

    def make(port, **kw):
        kw.setdefault("timeout", WAIT)
        c = tcpframe.Client("127.0.0.1", port, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def echo_server(make_server, backend):
    """A callback server on `backend` that echoes every frame."""
    holder = {}

    def on_message(conn, data):
        holder["srv"].send(conn, data)

    holder["srv"] = make_server(on_message=on_message, backend=backend)
    return holder["srv"]


@pytest.fixture
def unraisable(monkeypatch):
    """Collects (exc_value, err_msg, repr(object)) of what reaches sys.unraisablehook."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook",
                        lambda a: seen.append((a.exc_value, a.err_msg, repr(a.object))))
    return seen
