"""The robustness additions (API.md, "Robustness: rules and additions from an adversarial
review") seen from Python, over real sockets on 127.0.0.1, on both backends and, where the
behaviour is per connection, with both server kinds (callbacks and pull mode):
abort(), close_timeout_ms, max_buffered / CloseReason.OVERLOAD, close() of a connection
already closing for another reason, and poll(timeout_ms=0) while another thread polls."""
import ctypes
import socket
import struct
import threading
import time

import pytest

import tcpframe
from tcpframe import (CloseReason, EventKind, FullError, InvalidError, NoConnError, PullServer,
                      Server, StoppedError, TfError, _lib)
from conftest import WAIT, PullPump, Recorder, wait_until

MiB = 1 << 20
KiB = 1 << 10


# ---------------------------------------------------------------------------
# Helpers


@pytest.fixture(params=["callbacks", "pull"])
def mode(request):
    return request.param


@pytest.fixture
def start(make_server, backend, mode):
    """start(echo=False, **config) -> (server, Recorder), for the `mode` and `backend`
    of the test; pull servers get a PullPump. Everything is stopped at teardown."""
    pumps = []

    def start_(echo=False, **kw):
        rec = Recorder()
        if mode == "callbacks":
            holder = {}

            def on_message(conn, data):
                rec.on_message(conn, data)
                if echo:
                    try:
                        holder["srv"].send(conn, data)
                    except TfError:
                        pass
            srv = holder["srv"] = make_server(backend=backend, on_message=on_message,
                                              on_connect=rec.on_connect, on_close=rec.on_close, **kw)
        else:
            srv = make_server(cls=PullServer, backend=backend, **kw)
            pumps.append(PullPump(srv, rec, echo))
        return srv, rec

    yield start_
    for pump in pumps:
        pump.stop()


@pytest.fixture
def raw_client():
    """raw_client(port, rcvbuf=None) -> a connected blocking socket; closed at teardown.
    A small rcvbuf (set before connect, so the window is small) makes a peer that does
    not read fill up quickly."""
    made = []

    def make(port, rcvbuf=None):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        made.append(s)
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(WAIT)
        s.connect(("127.0.0.1", port))
        return s

    yield make
    for s in made:
        s.close()


def local_peer(sock):
    return "%s:%d" % sock.getsockname()[:2]


def conn_of(rec, sock):
    """The server's id for the client socket `sock` (matched by its on_connect peer text)."""
    peer = local_peer(sock)
    rec.wait(lambda r: any(p == peer for _, p in r.connects), what=f"on_connect of {peer}")
    return next(c for c, p in rec.connects if p == peer)


def fill_queue(srv, conn, chunk=256 * KiB):
    """send() until FullError, again and again until the socket takes no more (the
    kernel's buffers can hold megabytes, written by the loop between our sends): the
    connection's queued output inside the library is then at its limit.
    Returns (bytes accepted by send, bytes the library had written by then)."""
    payload = b"q" * chunk
    total = 0
    deadline = time.monotonic() + WAIT
    while True:
        assert time.monotonic() < deadline, "queued output never filled up"
        try:
            srv.send(conn, payload)
            total += chunk + 4
            continue
        except FullError:
            pass
        written = srv.stats().bytes_sent
        time.sleep(0.1)
        if srv.stats().bytes_sent == written:
            try:
                srv.send(conn, payload)
                total += chunk + 4
            except FullError:
                return total, written


def read_to_the_end(sock, timeout=WAIT):
    """Read until the connection ends: ("reset", n) for ECONNRESET, ("eof", n) for an
    orderly close; n is the number of bytes read before. Bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"connection did not end within {timeout}s ({n} bytes read)"
        sock.settimeout(left)
        try:
            chunk = sock.recv(MiB)
        except ConnectionResetError:
            return "reset", n
        except (socket.timeout, TimeoutError):
            raise AssertionError(f"connection did not end within {timeout}s ({n} bytes read)") from None
        if not chunk:
            return "eof", n
        n += len(chunk)


def closes_of(rec, conn):
    with rec.cond:
        return [reason for c, reason in rec.closes if c == conn]


# ---------------------------------------------------------------------------
# abort()


def test_abort_discards_queued_output_and_resets_the_peer(start, raw_client):
    srv, rec = start(max_queued_output=2 * MiB)
    sock = raw_client(srv.port, rcvbuf=64 * KiB)  # a peer that does not read (yet)
    conn = conn_of(rec, sock)
    queued, written = fill_queue(srv, conn)
    assert queued - written >= MiB  # held by the library, not yet in the kernel
    srv.abort(conn)
    assert rec.wait_close(conn) == [CloseReason.LOCAL]
    with pytest.raises(NoConnError):
        srv.send(conn, b"late")
    with pytest.raises(NoConnError):
        srv.abort(conn)
    with pytest.raises(NoConnError):
        srv.close(conn)
    how, got = read_to_the_end(sock)
    assert how == "reset", f"peer saw {how} after {got} bytes, not a reset"
    assert got <= written
    # What was queued when abort() ran was dropped, not written.
    assert srv.stats().bytes_sent == written


def test_abort_of_an_idle_open_connection(start, make_client):
    srv, rec = start(echo=True)
    c = make_client(srv.port)
    assert c.request(b"before") == b"before"
    conn = conn_of(rec, c.sock)
    t0 = time.monotonic()
    srv.abort(conn)
    assert rec.wait_close(conn) == [CloseReason.LOCAL]
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(ConnectionResetError):
        c.sock.recv(1)
    # The server goes on serving others.
    with make_client(srv.port) as other:
        assert other.request(b"after") == b"after"


def test_abort_after_close_gives_up_on_a_peer_that_never_reads(start, raw_client):
    srv, rec = start(max_queued_output=2 * MiB)  # default close timeout: 10 s
    sock = raw_client(srv.port, rcvbuf=64 * KiB)
    conn = conn_of(rec, sock)
    queued, written = fill_queue(srv, conn)
    assert queued - written >= MiB
    srv.close(conn)
    time.sleep(0.3)
    assert closes_of(rec, conn) == [], "close() did not wait for the queued output"
    with pytest.raises(NoConnError):
        srv.close(conn)  # a second close is refused...
    t0 = time.monotonic()
    srv.abort(conn)      # ...but abort after close is allowed
    assert rec.wait_close(conn) == [CloseReason.LOCAL]
    assert time.monotonic() - t0 < 2.0
    how, _ = read_to_the_end(sock)
    assert how == "reset"
    with pytest.raises(NoConnError):
        srv.abort(conn)
    time.sleep(0.1)
    assert closes_of(rec, conn) == [CloseReason.LOCAL]  # exactly once


def test_abort_unknown_and_after_stop(start):
    srv, _ = start()
    with pytest.raises(NoConnError) as info:
        srv.abort(987654321)
    assert info.value.code == tcpframe.TF_ERR_NO_CONN
    with pytest.raises(NoConnError):
        srv.abort(0)
    srv.stop(0)
    with pytest.raises(StoppedError):
        srv.abort(1)


# ---------------------------------------------------------------------------
# close_timeout_ms


def test_close_timeout_resets_a_peer_that_never_reads(start, raw_client):
    timeout_ms = 500
    srv, rec = start(max_queued_output=4 * MiB, close_timeout_ms=timeout_ms)
    sock = raw_client(srv.port, rcvbuf=64 * KiB)
    conn = conn_of(rec, sock)
    queued, written = fill_queue(srv, conn)
    assert queued - written >= 3 * MiB
    t0 = time.monotonic()
    srv.close(conn)
    assert rec.wait_close(conn) == [CloseReason.LOCAL]
    elapsed = time.monotonic() - t0
    assert timeout_ms / 1000 * 0.9 <= elapsed < timeout_ms / 1000 + 3.0, elapsed
    how, got = read_to_the_end(sock)
    assert how == "reset", f"peer saw {how} after {got} bytes"
    assert got < queued and srv.stats().bytes_sent < queued


def test_close_within_the_timeout_delivers_everything(start, make_client):
    srv, rec = start(close_timeout_ms=2000)
    c = make_client(srv.port)
    conn = conn_of(rec, c.sock)
    frames = [bytes([i]) * (100 * KiB) for i in range(20)]
    for f in frames:
        srv.send(conn, f)
    srv.close(conn)
    assert [c.recv() for _ in frames] == frames
    assert c.closed_by_peer(WAIT)
    assert rec.wait_close(conn) == [CloseReason.LOCAL]


# ---------------------------------------------------------------------------
# max_buffered / OVERLOAD


def test_max_buffered_closes_the_biggest_partial_frame_with_overload(start, make_client):
    frame, first_part = 450 * KiB, 400 * KiB
    srv, rec = start(echo=True, max_buffered=1 * MiB)
    peers = [make_client(srv.port) for _ in range(3)]
    ids = [conn_of(rec, p.sock) for p in peers]
    base = srv.stats().bytes_received
    payloads = [bytes([0x41 + i]) * frame for i in range(3)]
    # One after another, so that the third peer's bytes are the ones that pass the
    # budget: 3 x 400 KiB > 1 MiB. The first two then hold the most.
    for i, (p, data) in enumerate(zip(peers, payloads)):
        try:
            p.send_raw(struct.pack("<I", frame) + data[:first_part])
        except OSError:
            pass  # the server may already have closed this one
        want = base + (i + 1) * (first_part + 4)
        wait_until(lambda: srv.stats().bytes_received >= want, what=f"{want} bytes received")
    rec.wait(lambda r: any(reason == CloseReason.OVERLOAD for _, reason in r.closes),
             what="an OVERLOAD close")
    overloaded = [i for i, conn in enumerate(ids) if CloseReason.OVERLOAD in closes_of(rec, conn)]
    assert overloaded and set(overloaded) <= {0, 1}, (overloaded, rec.closes)
    assert overloaded == [overloaded[0]], "one close was enough to get under the budget"
    for i in overloaded:
        assert peers[i].closed_by_peer(WAIT)
    # The survivors finish their frames and get them echoed; nothing else was closed.
    for i, p in enumerate(peers):
        if i not in overloaded:
            p.send_raw(payloads[i][first_part:])
    for i, p in enumerate(peers):
        if i not in overloaded:
            assert p.recv() == payloads[i]
            assert closes_of(rec, ids[i]) == []
    # A fresh connection is served as usual.
    with make_client(srv.port) as fresh:
        assert fresh.request(b"still here") == b"still here"


# ---------------------------------------------------------------------------
# Configuration values


@pytest.mark.parametrize("cls", [Server, PullServer])
@pytest.mark.parametrize("kw", [
    dict(close_timeout_ms=0), dict(max_buffered=0),                               # library checks
    dict(close_timeout_ms=-1), dict(close_timeout_ms=2**32), dict(max_buffered=-1),  # binding checks
    dict(max_buffered=2**64), dict(close_timeout_ms="10"), dict(max_buffered=1.5),
    dict(close_timeout_ms=True),
])
def test_bad_robustness_configuration_raises_invalid(make_server, cls, kw):
    extra = dict(on_message=lambda c, d: None) if cls is Server else {}
    with pytest.raises(InvalidError) as info:
        make_server(cls=cls, **extra, **kw)
    assert info.value.code == tcpframe.TF_ERR_INVALID


@pytest.mark.parametrize("kw", [
    dict(close_timeout_ms=1), dict(close_timeout_ms=2**32 - 1),
    dict(max_buffered=1), dict(max_buffered=2**64 - 1),
    dict(close_timeout_ms=None, max_buffered=None),
])
def test_extreme_robustness_configuration_is_accepted(start, make_client, kw):
    srv, _ = start(echo=True, **kw)
    with make_client(srv.port) as c:
        assert c.request(b"") == b""  # an empty frame buffers nothing, even with a 1-byte budget


# ---------------------------------------------------------------------------
# close()/abort() of a connection already closing for another reason


def test_close_inside_on_close_of_a_too_large_connection(make_server, make_client, backend):
    rec = Recorder()
    outcome = []
    holder = {}

    def on_close(conn, reason):
        for call in (holder["srv"].close, holder["srv"].abort):
            try:
                call(conn)
                outcome.append((call.__name__, "ok"))
            except TfError as e:
                outcome.append((call.__name__, type(e)))
        rec.on_close(conn, reason)

    srv = holder["srv"] = make_server(backend=backend, max_frame=1024, on_message=rec.on_message,
                                      on_connect=rec.on_connect, on_close=on_close)
    c = make_client(srv.port)
    conn = conn_of(rec, c.sock)
    c.send_raw(struct.pack("<I", 2048))
    assert rec.wait_close(conn) == [CloseReason.TOO_LARGE]
    assert outcome == [("close", NoConnError), ("abort", NoConnError)]
    with pytest.raises(NoConnError):
        srv.close(conn)
    assert c.closed_by_peer(WAIT)


def test_close_of_a_too_large_connection_before_its_close_event_is_polled(make_server, make_client,
                                                                          backend):
    srv = make_server(cls=PullServer, backend=backend, max_frame=1024)
    c = make_client(srv.port)
    events = []
    deadline = time.monotonic() + WAIT
    while not events:
        assert time.monotonic() < deadline
        events += srv.poll(max=1, timeout_ms=50)
    assert events[0].kind == EventKind.CONNECT
    conn = events[0].conn
    c.send_raw(struct.pack("<I", 2048))
    # Stats are updated before the event is produced: once counted, the library has
    # decided to close it, while the host has not seen the CLOSE event yet.
    wait_until(lambda: srv.stats().closed_too_large == 1, what="closed_too_large")
    with pytest.raises(NoConnError) as info:
        srv.close(conn)
    assert info.value.code == tcpframe.TF_ERR_NO_CONN
    with pytest.raises(NoConnError):
        srv.abort(conn)
    closes = []
    deadline = time.monotonic() + WAIT
    while not closes:
        assert time.monotonic() < deadline
        closes += [e for e in srv.poll(max=8, timeout_ms=50) if e.kind == EventKind.CLOSE]
    assert [(e.conn, e.reason) for e in closes] == [(conn, CloseReason.TOO_LARGE)]


def test_close_of_an_idle_closed_connection_keeps_the_idle_reason(start, make_client):
    srv, rec = start(idle_timeout_ms=200)
    c = make_client(srv.port)
    conn = conn_of(rec, c.sock)
    rec.wait_close(conn)
    with pytest.raises(NoConnError):
        srv.close(conn)
    with pytest.raises(NoConnError):
        srv.abort(conn)
    assert closes_of(rec, conn) == [CloseReason.IDLE]


# ---------------------------------------------------------------------------
# Pull mode: poll(timeout_ms=0) while another thread is inside poll()


def _poll_in_thread(target):
    result, started = [], threading.Event()

    def run():
        started.set()
        result.append(target())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(WAIT)
    time.sleep(0.1)  # let it get into the wait
    return t, result


def test_poll_timeout_zero_does_not_wait_for_another_threads_poll(make_server, make_client, backend):
    srv = make_server(cls=PullServer, backend=backend)
    t, result = _poll_in_thread(lambda: srv.poll(timeout_ms=-1))
    c = None
    try:
        worst = 0.0
        for _ in range(20):
            t0 = time.monotonic()
            assert srv.poll(timeout_ms=0) == []
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.01)
        assert worst < 0.1, f"poll(timeout_ms=0) waited {worst:.3f}s"
        assert t.is_alive()
    finally:
        c = make_client(srv.port)  # ends the other thread's wait
        t.join(WAIT)
    assert not t.is_alive()
    assert [(e.kind, e.peer) for e in result[0]] == [(EventKind.CONNECT, local_peer(c.sock))]


def test_library_poll_timeout_zero_never_waits_while_another_thread_polls(make_server, make_client,
                                                                        backend):
    """The C guarantee itself, below the binding's lock: tf_server_poll(timeout 0) from
    a second thread while the first is inside tf_server_poll(timeout 3000)."""
    srv = make_server(cls=PullServer, backend=backend)
    poll = _lib.func("tf_server_poll")
    ptr = srv._enter()  # keeps the pointer valid until both threads are done with it
    t = None
    try:
        def long_poll():
            arr, count = (_lib.TfEvent * 8)(), ctypes.c_size_t(0)
            t0 = time.monotonic()
            rc = poll(ptr, arr, 8, ctypes.byref(count), 3000)
            return rc, count.value, time.monotonic() - t0

        t, result = _poll_in_thread(long_poll)
        arr, count = (_lib.TfEvent * 8)(), ctypes.c_size_t(99)
        worst = 0.0
        for _ in range(20):
            t0 = time.monotonic()
            rc = poll(ptr, arr, 8, ctypes.byref(count), 0)
            worst = max(worst, time.monotonic() - t0)
            assert rc == tcpframe.TF_OK and count.value == 0
        assert worst < 0.1, f"tf_server_poll(timeout 0) waited {worst:.3f}s"
        make_client(srv.port)  # ends the other thread's wait early
        t.join(WAIT)
        assert not t.is_alive()
        rc, n, took = result[0]
        assert rc == tcpframe.TF_OK and n == 1 and took < 2.9
    finally:
        if t is not None:
            t.join(WAIT)
        srv._h.exit()
