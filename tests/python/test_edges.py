"""Corners of the contract: calls from inside callbacks, backpressure, slow peers, fork."""
import os
import select
import signal
import struct
import time

import pytest

import tcpframe
from tcpframe import CloseReason, EventKind, NoConnError, PullServer, StoppedError
from conftest import WAIT, Recorder, wait_until


def test_send_inside_on_connect_greets_the_client(make_server, make_client):
    holder = {}

    def on_connect(conn, peer):
        holder["srv"].send(conn, b"welcome " + peer.encode())
        return True

    holder["srv"] = srv = make_server(on_message=lambda c, d: None, on_connect=on_connect)
    c = make_client(srv.port)
    assert c.recv() == b"welcome " + ("%s:%d" % c.sock.getsockname()[:2]).encode()


def test_close_inside_on_connect_gives_one_local_close(make_server, make_client):
    rec = Recorder()
    holder = {}

    def on_connect(conn, peer):
        rec.on_connect(conn, peer)
        holder["srv"].send(conn, b"bye")
        holder["srv"].close(conn)
        return True

    holder["srv"] = srv = make_server(on_message=rec.on_message, on_close=rec.on_close,
                                      on_connect=on_connect)
    c = make_client(srv.port)
    assert c.recv() == b"bye"
    assert c.closed_by_peer(WAIT)
    conn = rec.wait_connects()
    assert rec.wait_close(conn) == [CloseReason.LOCAL]
    time.sleep(0.05)
    assert len(rec.closes) == 1


def test_close_then_send_inside_on_message(make_server, make_client):
    outcome = []
    holder = {}

    def on_message(conn, data):
        holder["srv"].close(conn)
        try:
            holder["srv"].send(conn, b"too late")
        except NoConnError:
            outcome.append("no conn")

    holder["srv"] = srv = make_server(on_message=on_message)
    c = make_client(srv.port)
    c.send_many([b"1", b"2", b"3"])  # frames after the close are not delivered
    assert c.closed_by_peer(WAIT)
    assert outcome == ["no conn"]


def test_send_inside_on_close_is_no_conn(make_server, make_client):
    outcome = []
    holder = {}

    def on_close(conn, reason):
        try:
            holder["srv"].send(conn, b"x")
            outcome.append("sent")
        except NoConnError:
            outcome.append("no conn")
        except StoppedError:
            outcome.append("stopped")

    holder["srv"] = srv = make_server(on_message=lambda c, d: None, on_close=on_close)
    make_client(srv.port).close()
    wait_until(lambda: outcome, what="on_close")
    assert outcome == ["no conn"]


def test_partial_frame_trickle_is_closed_by_idle_timeout(make_server, make_client, recorder, backend):
    srv = make_server(backend=backend, idle_timeout_ms=200, **recorder.callbacks())
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    c.send_raw(struct.pack("<I", 1000))
    deadline = time.monotonic() + 2.0
    try:
        while not recorder.closes and time.monotonic() < deadline:
            c.send_raw(b"s")  # a byte every 20 ms, never a whole frame
            time.sleep(0.02)
    except OSError:
        pass
    assert recorder.wait_close(conn) == [CloseReason.IDLE]
    assert recorder.messages == []


def test_pull_backpressure_loses_nothing(make_server, make_client, backend):
    srv = make_server(cls=PullServer, backend=backend)
    c = make_client(srv.port, timeout=WAIT)
    frame_size, count = 64 * 1024, 320  # 20 MiB: beyond the library's 16 MiB event queue
    import threading
    sender = threading.Thread(
        target=lambda: c.send_many(bytes([i % 251]) * frame_size for i in range(count)))
    sender.start()
    time.sleep(0.3)  # the host does not poll: the loop must stop reading, not buffer
    got = []
    deadline = time.monotonic() + 10
    while len(got) < count:
        assert time.monotonic() < deadline, f"{len(got)} of {count} frames"
        got += [e.data for e in srv.poll(max=64, timeout_ms=50) if e.kind == EventKind.MESSAGE]
    sender.join(WAIT)
    assert all(d == bytes([i % 251]) * frame_size for i, d in enumerate(got))


def test_max_frame_upper_bound_is_accepted(make_server):
    srv = make_server(on_message=lambda c, d: None, max_frame=2**32 - 1)
    assert srv.running


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_server_is_unusable_but_harmless_in_a_forked_child(make_server, make_client, recorder):
    srv = make_server(**recorder.callbacks())
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report each call's outcome, never return into pytest
        try:
            out = []
            for call in (lambda: srv.send(conn, b"from child"), lambda: srv.close(conn),
                         srv.stats, lambda: srv.stop(0)):
                try:
                    call()
                    out.append("ok")
                except tcpframe.TfError as e:
                    out.append(f"{type(e).__name__}:{bool(e.message)}")
            os.write(w, ",".join(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        ready = select.select([r], [], [], WAIT)[0]
        data = os.read(r, 4096).decode() if ready else "timeout"
    finally:
        os.close(r)
        deadline = time.monotonic() + WAIT
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)
    assert data == ",".join(["StoppedError:True"] * 4)
    # The parent's server and connection are untouched.
    srv.send(conn, b"parent")
    assert c.recv() == b"parent"


_FD_CHILD = r"""
import resource, sys
sys.path.insert(0, sys.argv[1])
import tcpframe
resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
holder = {}
srv = holder["s"] = tcpframe.Server(on_message=lambda c, d: holder["s"].send(c, d))
print(srv.port, flush=True)
for line in sys.stdin:
    print(repr(srv.stats()._asdict()), flush=True)
srv.free()
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_out_of_file_descriptors_sheds_load_without_spinning(tmp_path):
    import ast
    import socket
    import subprocess
    import sys
    from conftest import REPO

    def cpu_seconds(pid):
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    child = subprocess.Popen([sys.executable, "-c", _FD_CHILD, str(REPO / "python")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    socks = []
    try:
        port = int(child.stdout.readline())
        for _ in range(80):  # twice what the child may open
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT))
        time.sleep(0.3)
        before = cpu_seconds(child.pid)
        time.sleep(1.0)
        assert cpu_seconds(child.pid) - before < 0.3, "the loop spins while out of descriptors"
        child.stdin.write("\n")
        child.stdin.flush()
        stats = ast.literal_eval(child.stdout.readline())
        assert stats["connections_rejected"] > 0
        assert stats["connections_accepted"] + stats["connections_rejected"] == 80
        for s in socks:
            s.close()
        socks.clear()
        # Descriptors are free again: a new client is served.
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with tcpframe.Client("127.0.0.1", port, timeout=1.0) as c:
                    assert c.request(b"again") == b"again"
                break
            except (ConnectionError, OSError):
                assert time.monotonic() < deadline, "never served again"
                time.sleep(0.05)
    finally:
        for s in socks:
            s.close()
        child.stdin.close()
        try:
            child.wait(WAIT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()
