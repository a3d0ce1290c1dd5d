"""API.md's "Second set of additions" seen from Python, over real sockets (127.0.0.1 and
Unix sockets), on both backends: prefix formats, Unix / abstract / fd:N / none transports,
outbound connect(), threads=n, PROXY protocol, max_connections_per_ip, drain(),
pause()/resume(), on_writable and WRITABLE events, sendv(), broadcast(), slow consumers,
info() and set_user_data()/user_data(). Every wait is bounded."""
import gc
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
import weakref

import pytest

import tcpframe
from tcpframe import (TF_PREFIX_BIG_ENDIAN, TF_PREFIX_INCLUDES_ITSELF, Client, CloseReason, ConnInfo,
                      EventKind, FullError, InvalidError, NoConnError, PrefixFlag, ProxyProtocol,
                      PullServer, Server, StoppedError, TfError, TooLargeError, encode_frame)
from conftest import WAIT, PullPump, Recorder, wait_until

KiB = 1 << 10
MiB = 1 << 20
BE, SELF = TF_PREFIX_BIG_ENDIAN, TF_PREFIX_INCLUDES_ITSELF


# ---------------------------------------------------------------------------
# Helpers


@pytest.fixture
def sockdir():
    """A short directory for Unix socket paths (at most 107 bytes)."""
    path = tempfile.mkdtemp(prefix="tf-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clients():
    """clients(Client(...)) -> that client, closed at teardown."""
    made = []

    def keep(c):
        made.append(c)
        return c

    yield keep
    for c in made:
        c.close()


def free_port():
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def echo_callbacks(holder, rec):
    """Recorder callbacks whose on_message also echoes (holder["srv"] is the server)."""
    def on_message(conn, data):
        rec.on_message(conn, data)
        holder["srv"].send(conn, data)
    return dict(on_connect=rec.on_connect, on_message=on_message, on_close=rec.on_close)


def make_echo(make_server, backend, rec=None, **kw):
    holder = {}
    rec = rec if rec is not None else Recorder()
    holder["srv"] = make_server(backend=backend, **echo_callbacks(holder, rec), **kw)
    return holder["srv"], rec


@pytest.fixture
def pumps():
    made = []

    def make(srv, rec, echo=False):
        p = PullPump(srv, rec, echo)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def messages_of(rec, conn):
    with rec.cond:
        return [d for c, d in rec.messages if c == conn]


# ---------------------------------------------------------------------------
# Constants


def test_new_struct_layouts_match_the_header():
    import ctypes
    from conftest import REPO
    from tcpframe import _lib
    text = re.sub(r"/\*.*?\*/", "", (REPO / "include" / "tcpframe.h").read_text(), flags=re.S)
    for cname, cls in (("tf_conn_info", _lib.TfConnInfo), ("tf_iovec", _lib.TfIovec)):
        body = re.search(r"struct\s+%s\s*\{(.*?)\}" % cname, text, flags=re.S).group(1)
        names = [re.search(r"(\w+)\s*(\[[^\]]*\])?$", d.strip()).group(1)
                 for d in body.split(";") if d.strip()]
        assert names == [f for f, _ in cls._fields_], cname
    assert ctypes.sizeof(_lib.TfConnInfo) == 128 + 6 * 8 + 4 * 4
    assert ctypes.sizeof(_lib.TfIovec) == 16
    assert _lib.MISSING == []


def test_new_constants_and_enums():
    assert (tcpframe.TF_CLOSE_PROTOCOL, tcpframe.TF_CLOSE_CONNECT_FAILED, tcpframe.TF_CLOSE_SLOW) == (6, 7, 8)
    assert CloseReason.PROTOCOL == 6 and CloseReason.CONNECT_FAILED == 7 and CloseReason.SLOW == 8
    assert tcpframe.TF_EVENT_WRITABLE == EventKind.WRITABLE == 4
    assert (PrefixFlag.BIG_ENDIAN | PrefixFlag.INCLUDES_ITSELF) == 3 == BE | SELF
    assert [int(p) for p in ProxyProtocol] == [0, 1, 2, 3]
    assert tcpframe.TF_PROXY_ANY == 3


# ---------------------------------------------------------------------------
# Framing


@pytest.mark.parametrize("prefix, wire", [
    ((2, BE), b"\x00\x03abc"),
    ((1, 0), b"\x03abc"),
    (1, b"\x03abc"),
    ((4, BE), b"\x00\x00\x00\x03abc"),
    ((4, SELF), b"\x07\x00\x00\x00abc"),
    ((8, BE | SELF), b"\x00" * 7 + b"\x0babc"),
    ((2, PrefixFlag.BIG_ENDIAN), b"\x00\x03abc"),
])
def test_prefix_formats_echo_with_the_client_helper(make_server, backend, clients, prefix, wire):
    assert encode_frame(b"abc", prefix=prefix) == wire
    srv, rec = make_echo(make_server, backend, prefix=prefix)
    c = clients(Client("127.0.0.1", srv.port, timeout=WAIT, prefix=prefix))
    for payload in (b"", b"x", b"hello", bytes(range(200))):
        assert c.request(payload) == payload
    c.send_raw(wire)                         # the bytes on the wire, by hand
    assert c.recv() == b"abc"
    c.send_many([b"one", b"two"])
    assert [c.recv(), c.recv()] == [b"one", b"two"]


@pytest.mark.parametrize("prefix, cap", [((1, 0), 255), ((1, SELF), 254), ((2, BE | SELF), 65533)])
def test_prefix_caps_the_payload(make_server, backend, clients, prefix, cap):
    """min(max frame, what the prefix expresses): send() of more raises TooLargeError at
    once, also inside a callback batch (never collected and dropped)."""
    seen = []
    holder = {}

    def on_message(conn, data):
        try:
            holder["srv"].send(conn, b"y" * (cap + 1))
        except TooLargeError as exc:
            seen.append(exc)
        holder["srv"].send(conn, data)

    rec = Recorder()
    srv = holder["srv"] = make_server(backend=backend, prefix=prefix, on_message=on_message,
                                      on_connect=rec.on_connect)
    c = clients(Client("127.0.0.1", srv.port, timeout=WAIT, prefix=prefix))
    big = b"z" * cap
    assert c.request(big) == big
    assert len(seen) == 1 and seen[0].code == tcpframe.TF_ERR_TOO_LARGE
    conn = rec.wait_connects(1)
    with pytest.raises(TooLargeError):
        srv.send(conn, b"y" * (cap + 1))
    with pytest.raises(ValueError):
        c.send(b"y" * (cap + 1))             # the client checks too
    assert srv.send_errors == 0


def test_includes_itself_prefix_below_its_width_is_a_protocol_close(make_server, backend, clients):
    rec = Recorder()
    srv = make_server(backend=backend, prefix=(2, BE | SELF), **rec.callbacks())
    c = clients(Client("127.0.0.1", srv.port, timeout=WAIT, prefix=(2, BE | SELF)))
    c.send_raw(b"\x00\x01")                  # 1 < width 2: impossible
    conn = rec.wait_connects(1)
    assert rec.wait_close(conn) == [CloseReason.PROTOCOL]
    assert c.closed_by_peer(WAIT)


def test_prefix_on_a_pull_server(make_server, backend, clients, pumps):
    rec = Recorder()
    srv = make_server(cls=PullServer, backend=backend, prefix=(2, BE))
    pumps(srv, rec, echo=True)
    c = clients(Client("127.0.0.1", srv.port, timeout=WAIT, prefix=(2, BE)))
    assert c.request(b"pull") == b"pull"


@pytest.mark.parametrize("prefix", [3, (3, 0), (2, 4), (2, -1), (16, BE), "2"])
def test_bad_prefixes_are_refused(make_server, prefix):
    with pytest.raises(InvalidError):
        make_server(on_message=lambda c, d: None, prefix=prefix)
    if isinstance(prefix, (int, tuple)):
        with pytest.raises(ValueError):
            encode_frame(b"x", prefix=prefix)


# ---------------------------------------------------------------------------
# Transports


PEER_RE = re.compile(r"^unix:pid=(\d+),uid=(\d+),gid=(\d+)$")


def _check_unix_peer(peer):
    m = PEER_RE.match(peer)
    assert m, peer
    assert [int(x) for x in m.groups()] == [os.getpid(), os.getuid(), os.getgid()]


def test_unix_path_echo_peer_mode_and_cleanup(make_server, backend, clients, sockdir):
    path = os.path.join(sockdir, "echo.sock")
    srv, rec = make_echo(make_server, backend, address=f"unix:{path}", unix_mode=0o600)
    assert srv.port == 0                     # not a TCP listener
    assert os.stat(path).st_mode & 0o777 == 0o600
    c = clients(Client(f"unix:{path}", timeout=WAIT))
    assert c.request(b"over unix") == b"over unix"
    conn = rec.wait_connects(1)
    _check_unix_peer(rec.connects[0][1])
    assert srv.info(conn).peer == rec.connects[0][1]
    srv.stop()
    assert not os.path.exists(path)          # stop removes the socket file it created


def test_unix_path_that_is_a_regular_file_is_left_alone(make_server, sockdir):
    path = os.path.join(sockdir, "not-a-socket")
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(tcpframe.TfIOError):
        make_server(address=f"unix:{path}", on_message=lambda c, d: None)
    with open(path) as f:
        assert f.read() == "keep me"


def test_unix_path_too_long_and_bad_mode_are_invalid(make_server):
    with pytest.raises(InvalidError):
        make_server(address="unix:/" + "x" * 120, on_message=lambda c, d: None)
    with pytest.raises(InvalidError):
        make_server(address="unix:@tf-mode", unix_mode=0o1000, on_message=lambda c, d: None)


def test_abstract_unix_echo_with_peer(make_server, backend, clients):
    name = f"tf-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    srv, rec = make_echo(make_server, backend, address=f"unix:@{name}")
    assert srv.port == 0
    c = clients(Client(f"unix:@{name}", timeout=WAIT))
    assert c.request(b"abstract") == b"abstract"
    rec.wait_connects(1)
    _check_unix_peer(rec.connects[0][1])


def test_unix_on_a_pull_server_gives_the_peer_in_connect(make_server, backend, clients, pumps):
    name = f"tf-pull-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rec = Recorder()
    srv = make_server(cls=PullServer, backend=backend, address=f"unix:@{name}")
    pumps(srv, rec, echo=True)
    c = clients(Client(f"unix:@{name}", timeout=WAIT))
    assert c.request(b"p") == b"p"
    _check_unix_peer(rec.connects[0][1])


def test_fd_listener_made_in_python_is_owned_by_the_server(make_server, backend, make_client):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    try:
        srv, rec = make_echo(make_server, backend, address=f"fd:{sock.fileno()}")
    except BaseException:
        sock.close()
        raise
    sock.detach()                            # the server owns the descriptor now
    assert srv.port in (0, port)
    c = make_client(port)
    assert c.request(b"inherited") == b"inherited"
    srv.stop()
    with pytest.raises(OSError):             # closed by the server at stop
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_fd_that_is_not_a_listening_socket_stays_the_callers(make_server):
    sock = socket.socket()                   # not bound, not listening
    try:
        with pytest.raises(InvalidError):
            make_server(address=f"fd:{sock.fileno()}", on_message=lambda c, d: None)
        os.fstat(sock.fileno())              # still open, still ours
    finally:
        sock.close()


# ---------------------------------------------------------------------------
# Outbound connections


def test_connect_to_our_own_listener_and_to_a_refused_port(make_server, backend, echo_server):
    rec = Recorder()
    out = make_server(backend=backend, address="none", connect_timeout_ms=2000, **rec.callbacks())
    assert out.port == 0
    conn = out.connect(("127.0.0.1", echo_server.port))
    assert isinstance(conn, int) and conn > 0
    out.send(conn, b"queued before established")     # queued, written once connected
    rec.wait_connects(1)
    assert rec.connects[0] == (conn, f"127.0.0.1:{echo_server.port}")
    rec.wait(lambda r: len(r.messages) >= 1, what="the echo")
    assert rec.messages[0] == (conn, b"queued before established")
    info = out.info(conn)
    assert info.outbound and info.peer == f"127.0.0.1:{echo_server.port}"
    assert out.stats().connections_accepted == 0

    refused = out.connect(f"127.0.0.1:{free_port()}")
    assert rec.wait_close(refused) == [CloseReason.CONNECT_FAILED]
    assert all(c != refused for c, _ in rec.connects)     # on_connect never ran for it

    with pytest.raises(InvalidError):
        out.connect("localhost:80")          # host names are not resolved
    out.close(conn)
    assert rec.wait_close(conn) == [CloseReason.LOCAL]


def test_an_outbound_connection_stays_usable_whatever_on_connect_returns(make_server, backend,
                                                                          echo_server):
    """The library ignores on_connect's verdict for tf_connect connections: a false
    return (or an exception) must not leave the Python side thinking it is gone."""
    rec, errors = Recorder(), []

    def on_connect(conn, peer):
        rec.on_connect(conn, peer)
        if peer.endswith(f":{echo_server.port}"):
            raise RuntimeError("refuse, as for an inbound connection")
        return False

    srv = make_server(backend=backend, address="none", on_connect=on_connect,
                      on_message=rec.on_message, on_close=rec.on_close,
                      on_error=lambda *args: errors.append(args))
    conn = srv.connect(("127.0.0.1", echo_server.port))
    rec.wait_connects(1)
    srv.set_user_data(conn, "kept")
    srv.send(conn, b"still usable")
    rec.wait(lambda r: len(r.messages) >= 1, what="the echo")
    assert rec.messages[0] == (conn, b"still usable")
    assert srv.user_data(conn) == "kept"
    assert len(errors) == 1 and any(isinstance(a, RuntimeError) for a in errors[0]), errors


def test_connect_inside_a_callback_then_send_at_once(make_server, backend, echo_server, make_client):
    """The relay pattern: open an upstream connection in on_message and forward the
    frame right away (queued, written once connected); the reply comes back on it."""
    holder, rec, calls = {}, Recorder(), []

    def on_message(conn, data):
        rec.on_message(conn, data)
        if data == b"relay me" and conn != holder.get("up"):     # not the echo coming back
            up = holder["srv"].connect(("127.0.0.1", echo_server.port))
            holder["up"] = up
            holder["srv"].send(up, data)
            holder["srv"].sendv(up, [b"and ", b"me"])
            calls.append("sent")

    srv = holder["srv"] = make_server(backend=backend, on_message=on_message,
                                      on_connect=rec.on_connect, on_close=rec.on_close)
    c = make_client(srv.port)
    c.send(b"relay me")
    rec.wait(lambda r: len([m for m in r.messages if m[0] == holder.get("up")]) >= 2,
             what="the replies on the upstream connection")
    assert calls == ["sent"]
    assert [d for cid, d in rec.messages if cid == holder["up"]] == [b"relay me", b"and me"]


def test_connect_over_unix_and_in_pull_mode(make_server, backend, sockdir, pumps):
    path = os.path.join(sockdir, "target.sock")
    target, _ = make_echo(make_server, backend, address=f"unix:{path}")
    rec = Recorder()
    out = make_server(cls=PullServer, backend=backend, address="none")
    pumps(out, rec)
    conn = out.connect(f"unix:{path}")
    rec.wait_connects(1)
    assert rec.connects[0] == (conn, f"unix:{path}")
    out.send(conn, b"via unix")
    rec.wait(lambda r: len(r.messages) >= 1, what="the echo")
    assert rec.messages[0] == (conn, b"via unix")
    missing = out.connect(f"unix:{sockdir}/nobody.sock")
    assert rec.wait_close(missing) == [CloseReason.CONNECT_FAILED]


def test_connect_options_are_checked(make_server):
    with pytest.raises(InvalidError):
        make_server(address="none", connect_timeout_ms=0, on_message=lambda c, d: None)
    srv = make_server(address="none", on_message=lambda c, d: None)
    srv.stop()
    with pytest.raises(StoppedError):
        srv.connect("127.0.0.1:1")


# ---------------------------------------------------------------------------
# Several loop threads


def test_threads_echo_many_connections_spread_over_threads(make_server, backend, make_client):
    rec = Recorder()
    holder = {}
    threads_of = {}
    lock = threading.Lock()

    def on_connect(conn, peer):
        with lock:
            threads_of[conn] = (holder["srv"].info(conn).thread, threading.get_ident())
        return rec.on_connect(conn, peer)

    def on_message(conn, data):
        rec.on_message(conn, data)
        holder["srv"].send(conn, data)

    srv = holder["srv"] = make_server(backend=backend, threads=2, on_connect=on_connect,
                                      on_message=on_message, on_close=rec.on_close)
    cs = [make_client(srv.port) for _ in range(20)]
    for round_ in range(3):
        for i, c in enumerate(cs):
            c.send(b"%d-%d" % (i, round_))
        for i, c in enumerate(cs):
            assert c.recv() == b"%d-%d" % (i, round_)
    rec.wait_connects(20)
    indexes = [t for t, _ in threads_of.values()]
    assert sorted(set(indexes)) == [0, 1]
    assert min(indexes.count(0), indexes.count(1)) >= 3 * 2  # >= 3 per block of 10·n
    # Two loop indexes, two OS threads, neither of them ours.
    idents = {ident for _, ident in threads_of.values()}
    assert len(idents) == 2 and threading.get_ident() not in idents
    assert srv.stats().connections_active == 20


def test_threads_option_is_checked(make_server):
    make_server(threads=0, on_message=lambda c, d: None).free()   # one per CPU
    with pytest.raises(InvalidError):
        make_server(threads=257, on_message=lambda c, d: None)
    with pytest.raises(InvalidError):
        make_server(threads=-1, on_message=lambda c, d: None)


def test_threads_on_a_pull_server_keep_one_queue(make_server, backend, make_client, pumps):
    rec = Recorder()
    srv = make_server(cls=PullServer, backend=backend, threads=2)
    pumps(srv, rec, echo=True)
    cs = [make_client(srv.port) for _ in range(6)]
    for i, c in enumerate(cs):
        assert c.request(b"%d" % i) == b"%d" % i
    threads = {srv.info(conn).thread for conn, _ in rec.connects}
    assert threads == {0, 1}


# ---------------------------------------------------------------------------
# Behind a load balancer


def _raw(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return s


def _recv_frame(s):
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        assert chunk, "closed"
        head += chunk
    (n,) = struct.unpack("<I", head)
    data = b""
    while len(data) < n:
        data += s.recv(n - len(data))
    return data


def _v2_header(src, sport, dst, dport):
    addrs = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack(">HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack(">H", len(addrs)) + addrs


def test_proxy_protocol_v1_gives_the_original_client(make_server, backend):
    srv, rec = make_echo(make_server, backend, proxy_protocol="v1")
    s = _raw(srv.port)
    try:
        # The header and the first frame in one segment: the frame's bytes follow it.
        s.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 41000 443\r\n" + encode_frame(b"behind"))
        assert _recv_frame(s) == b"behind"
        conn = rec.wait_connects(1)
        assert rec.connects[0][1] == "203.0.113.7:41000"
        assert srv.info(conn).peer == "203.0.113.7:41000"
    finally:
        s.close()
    # UNKNOWN (a health check) keeps the socket's own peer.
    s = _raw(srv.port)
    try:
        s.sendall(b"PROXY UNKNOWN\r\n" + encode_frame(b"hc"))
        assert _recv_frame(s) == b"hc"
        rec.wait_connects(2)
        assert rec.connects[1][1] == "127.0.0.1:%d" % s.getsockname()[1]
    finally:
        s.close()


def test_proxy_protocol_any_takes_v2_and_refuses_a_missing_header(make_server, backend):
    srv, rec = make_echo(make_server, backend, proxy_protocol=ProxyProtocol.ANY)
    s = _raw(srv.port)
    try:
        s.sendall(_v2_header("198.51.100.9", 50000, "192.0.2.1", 443) + encode_frame(b"v2"))
        assert _recv_frame(s) == b"v2"
        rec.wait_connects(1)
        assert rec.connects[0][1] == "198.51.100.9:50000"
    finally:
        s.close()
    before = srv.stats().connections_rejected
    s = _raw(srv.port)
    try:
        s.sendall(encode_frame(b"no header at all"))
        s.settimeout(WAIT)
        try:
            assert s.recv(1) == b""          # closed before on_connect
        except ConnectionResetError:
            pass
    finally:
        s.close()
    wait_until(lambda: srv.stats().connections_rejected > before, what="rejected count")
    assert len(rec.connects) == 1            # no callback named it


def test_proxy_protocol_option_is_checked(make_server):
    with pytest.raises(InvalidError):
        make_server(proxy_protocol="v3", on_message=lambda c, d: None)
    with pytest.raises(InvalidError):
        make_server(proxy_protocol=7, on_message=lambda c, d: None)


def test_max_connections_per_ip(make_server, backend, make_client):
    srv, rec = make_echo(make_server, backend, max_connections_per_ip=2)
    a, b = make_client(srv.port), make_client(srv.port)
    assert a.request(b"a") == b"a" and b.request(b"b") == b"b"
    c = make_client(srv.port)
    assert c.closed_by_peer(WAIT)
    wait_until(lambda: srv.stats().connections_rejected == 1, what="rejected count")
    assert len(rec.connects) == 2
    assert a.request(b"still") == b"still"


def test_drain_then_a_new_server_binds_the_port_while_old_connections_echo(make_server, backend,
                                                                           make_client):
    old, old_rec = make_echo(make_server, backend)
    port = old.port
    c_old = make_client(port)
    assert c_old.request(b"before") == b"before"
    old.drain()
    old.drain()                              # idempotent
    new, new_rec = make_echo(make_server, backend, address=f"127.0.0.1:{port}")
    assert new.port == port
    c_new = make_client(port)
    assert c_new.request(b"new") == b"new"
    assert c_old.request(b"after drain") == b"after drain"
    new_rec.wait_connects(1)
    assert len(old_rec.connects) == 1
    # connect() still works on a drained server.
    conn = old.connect(("127.0.0.1", port))
    old_rec.wait_connects(2)
    assert old_rec.connects[1][0] == conn
    old.stop()
    with pytest.raises(StoppedError):
        old.drain()


def test_drain_from_on_message_refuses_attempts_while_the_callback_goes_on(make_server, backend,
                                                                           make_client):
    holder, rec, drained = {}, Recorder(), threading.Event()

    def on_message(conn, data):
        rec.on_message(conn, data)
        if data == b"drain":
            holder["srv"].drain()
            drained.set()
            time.sleep(0.3)                  # the callback goes on after the call
        holder["srv"].send(conn, data)

    srv = holder["srv"] = make_server(backend=backend, on_connect=rec.on_connect,
                                      on_message=on_message, on_close=rec.on_close)
    c = make_client(srv.port)
    c.send(b"drain")
    assert drained.wait(WAIT)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT).close()
    assert c.recv() == b"drain"
    assert c.request(b"served on") == b"served on"
    assert len(rec.connects) == 1


def test_drain_removes_the_unix_socket_file(make_server, backend, sockdir, clients):
    path = os.path.join(sockdir, "drain.sock")
    srv, _ = make_echo(make_server, backend, address=f"unix:{path}")
    c = clients(Client(f"unix:{path}", timeout=WAIT))
    srv.drain()
    assert not os.path.exists(path)
    assert c.request(b"still served") == b"still served"


# ---------------------------------------------------------------------------
# Per-connection control


def test_pause_from_another_thread_holds_frames_and_resume_delivers_them_in_order(
        make_server, backend, make_client):
    srv, rec = make_echo(make_server, backend)
    c = make_client(srv.port)
    assert c.request(b"0") == b"0"
    conn = rec.wait_connects(1)
    srv.pause(conn)
    srv.pause(conn)                          # idempotent
    assert srv.info(conn).paused
    time.sleep(0.05)                         # "within one loop iteration"
    c.send_many([b"%d" % i for i in range(1, 6)])
    time.sleep(0.3)
    assert messages_of(rec, conn) == [b"0"]  # held back
    srv.send(conn, b"writes go on")          # writing to a paused connection works
    assert c.recv() == b"writes go on"
    srv.resume(conn)
    srv.resume(conn)
    assert not srv.info(conn).paused
    for i in range(1, 6):
        assert c.recv() == b"%d" % i
    assert c.request(b"6") == b"6"
    assert messages_of(rec, conn) == [b"%d" % i for i in range(7)]
    with pytest.raises(NoConnError):
        srv.pause(10 ** 9)
    with pytest.raises(NoConnError):
        srv.resume(10 ** 9)


def test_pause_inside_on_message_applies_to_later_batches(make_server, backend, make_client):
    rec = Recorder()
    holder = {}

    def on_message(conn, data):
        rec.on_message(conn, data)
        if data == b"pause":
            holder["srv"].pause(conn)
        holder["srv"].send(conn, b"ack " + data)

    srv = holder["srv"] = make_server(backend=backend, on_message=on_message,
                                      on_connect=rec.on_connect, on_close=rec.on_close)
    c = make_client(srv.port)
    assert c.request(b"pause") == b"ack pause"
    conn = rec.wait_connects(1)
    c.send_many([b"a", b"b", b"c"])
    time.sleep(0.3)
    assert messages_of(rec, conn) == [b"pause"]
    srv.resume(conn)
    assert [c.recv() for _ in range(3)] == [b"ack a", b"ack b", b"ack c"]


def test_pause_and_resume_in_pull_mode(make_server, backend, make_client, pumps):
    rec = Recorder()
    srv = make_server(cls=PullServer, backend=backend)
    pumps(srv, rec, echo=True)
    c = make_client(srv.port)
    assert c.request(b"first") == b"first"
    conn = rec.wait_connects(1)
    srv.pause(conn)
    time.sleep(0.05)
    c.send_many([b"x", b"y"])
    time.sleep(0.3)
    assert messages_of(rec, conn) == [b"first"]
    srv.resume(conn)
    assert [c.recv(), c.recv()] == [b"x", b"y"]


def _fill_until_full(srv, conn, frame, limit):
    """send() from this (host) thread until a FullError after which the queue stays
    above half of `limit` (the socket buffers are full too: the peer does not read).
    Returns how many frames went in."""
    sent = 0
    deadline = time.monotonic() + WAIT
    stuck_since = None
    while True:
        try:
            srv.send(conn, frame)
            sent += 1
            stuck_since = None
        except FullError:
            now = time.monotonic()
            if srv.info(conn).queued_output <= limit // 2:
                stuck_since = None
            elif stuck_since is None:
                stuck_since = now
            elif now - stuck_since > 0.1:
                return sent
            time.sleep(0.005)
        if time.monotonic() > deadline:
            raise AssertionError(f"queue not stuck full after {sent} frames")


def _read_frames(c, n):
    for _ in range(n):
        c.recv()


def test_on_writable_runs_once_after_full_error(make_server, backend, make_client):
    rec = Recorder()
    calls = []
    lock = threading.Lock()

    def on_writable(conn):
        with lock:
            calls.append((conn, threading.get_ident()))

    srv = make_server(backend=backend, max_queued_output=64 * KiB, on_writable=on_writable,
                      **rec.callbacks())
    c = make_client(srv.port)
    c.send(b"hi")
    conn = rec.wait_connects(1)
    frame = b"w" * (16 * KiB)
    sent = _fill_until_full(srv, conn, frame, 64 * KiB)
    before = len(calls)                      # earlier FullErrors may have had room again
    time.sleep(0.1)
    assert len(calls) == before              # the peer reads nothing: no room yet
    _read_frames(c, sent)
    wait_until(lambda: len(calls) > before, what="on_writable")
    time.sleep(0.2)
    assert len(calls) == before + 1 and calls[-1][0] == conn
    assert calls[-1][1] != threading.get_ident()   # the loop thread
    srv.send(conn, b"room again")
    assert c.recv() == b"room again"


def test_on_writable_exception_is_reported(make_server, backend, make_client):
    errors = []
    rec = Recorder()

    def on_writable(conn):
        raise RuntimeError("boom")

    srv = make_server(backend=backend, max_queued_output=64 * KiB, on_writable=on_writable,
                      on_error=lambda exc, where, conn: errors.append((type(exc), where, conn)),
                      **rec.callbacks())
    c = make_client(srv.port)
    c.send(b"hi")
    conn = rec.wait_connects(1)
    sent = _fill_until_full(srv, conn, b"w" * (16 * KiB), 64 * KiB)
    _read_frames(c, sent)
    wait_until(lambda: errors, what="on_error")
    assert set(errors) == {(RuntimeError, "on_writable", conn)}


def test_writable_events_in_pull_mode_only_when_asked(make_server, backend, make_client, pumps):
    for asked in (True, False):
        rec = Recorder()
        srv = make_server(cls=PullServer, backend=backend, max_queued_output=64 * KiB,
                          writable_events=asked)
        pump = pumps(srv, rec)
        c = make_client(srv.port)
        c.send(b"hi")
        conn = rec.wait_connects(1)
        sent = _fill_until_full(srv, conn, b"w" * (16 * KiB), 64 * KiB)
        before = len(pump.writable)
        _read_frames(c, sent)
        if asked:
            rec.wait(lambda r: len(pump.writable) > before, what="a WRITABLE event")
            time.sleep(0.2)
            assert len(pump.writable) == before + 1 and set(pump.writable) == {conn}
        else:
            time.sleep(0.3)
            assert pump.writable == []


def test_sendv_joins_the_parts_in_one_frame(make_server, backend, make_client):
    rec = Recorder()
    srv = make_server(backend=backend, max_frame=16, **rec.callbacks())
    c = make_client(srv.port)
    c.send(b"hi")
    conn = rec.wait_connects(1)
    srv.sendv(conn, [b"head:", bytearray(b"body"), memoryview(b"!"), b""])
    assert c.recv() == b"head:body!"
    srv.sendv(conn, [])
    assert c.recv() == b""
    srv.sendv(conn, (p for p in [b"gen", b"erator"]))
    assert c.recv() == b"generator"
    with pytest.raises(TooLargeError):
        srv.sendv(conn, [b"x" * 10, b"y" * 7])   # 17 > max_frame
    with pytest.raises(NoConnError):
        srv.sendv(10 ** 9, [b"x"])


def test_sendv_inside_a_batch_keeps_the_order(make_server, backend, make_client):
    holder = {}

    def on_message(conn, data):
        srv = holder["srv"]
        srv.send(conn, b"1")                 # collected
        srv.sendv(conn, [b"2", b"-", b"2"])  # what was collected leaves first
        srv.send(conn, b"3")

    srv = holder["srv"] = make_server(backend=backend, on_message=on_message)
    c = make_client(srv.port)
    c.send(b"go")
    assert [c.recv(), c.recv(), c.recv()] == [b"1", b"2-2", b"3"]


def test_broadcast_sends_one_frame_to_many(make_server, backend, make_client):
    rec = Recorder()
    srv = make_server(backend=backend, **rec.callbacks())
    cs = [make_client(srv.port) for _ in range(3)]
    for c in cs:
        c.send(b"hi")
    rec.wait_connects(3)
    ids = [conn for conn, _ in rec.connects]
    by_conn = {}
    for c in cs:                             # which client is which connection
        local = "127.0.0.1:%d" % c.sock.getsockname()[1]
        by_conn[next(conn for conn, peer in rec.connects if peer == local)] = c
    queued = srv.broadcast(ids + [ids[0], 10 ** 9], b"news")
    assert queued == 4                       # the unknown id is skipped, the repeat counted
    for conn in ids:
        assert by_conn[conn].recv() == b"news"
    assert by_conn[ids[0]].recv() == b"news"
    assert srv.broadcast([], b"nobody") == 0
    assert srv.broadcast(iter(ids[:1]), bytearray(b"ba")) == 1
    assert by_conn[ids[0]].recv() == b"ba"
    with pytest.raises(TooLargeError):
        srv.broadcast(ids, b"x" * (8 * MiB + 1))
    srv.stop()
    with pytest.raises(StoppedError):
        srv.broadcast(ids, b"late")


@pytest.mark.slow
def test_slow_consumer_is_closed(make_server, backend, make_client):
    rec = Recorder()
    srv = make_server(backend=backend, slow_consumer=(64 * KiB, 1), **rec.callbacks())
    c = make_client(srv.port)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.send(b"hi")
    conn = rec.wait_connects(1)
    frame = b"s" * (64 * KiB)
    deadline = time.monotonic() + 2 * WAIT
    t0 = None
    # The client never reads: keep the queue above the soft limit (the socket buffers
    # take a few MB first) until the server gives up on it.
    while not any(c == conn for c, _ in rec.closes):
        assert time.monotonic() < deadline, "no SLOW close"
        try:
            queued = srv.info(conn).queued_output
            if queued > 64 * KiB and t0 is None:
                t0 = time.monotonic()
            if queued < 256 * KiB:
                srv.send(conn, frame)
        except NoConnError:
            break                            # closed between the check and the call
        time.sleep(0.005)
    assert rec.wait_close(conn) == [CloseReason.SLOW]
    assert t0 is not None and time.monotonic() - t0 >= 0.9


def test_slow_consumer_option_is_checked(make_server):
    with pytest.raises(InvalidError):
        make_server(slow_consumer=(1, 0), on_message=lambda c, d: None)
    with pytest.raises(InvalidError):
        make_server(slow_consumer=1024, on_message=lambda c, d: None)
    make_server(slow_consumer=(0, 0), on_message=lambda c, d: None).free()   # off


def test_info_fields(make_server, backend, make_client):
    srv, rec = make_echo(make_server, backend)
    c = make_client(srv.port)
    assert c.request(b"abc") == b"abc"
    assert c.request(b"") == b""
    conn = rec.wait_connects(1)
    wait_until(lambda: srv.info(conn).frames_sent == 2, what="frames_sent")
    info = srv.info(conn)
    assert isinstance(info, ConnInfo)
    assert info.peer == rec.connects[0][1] == "127.0.0.1:%d" % c.sock.getsockname()[1]
    assert (info.frames_received, info.bytes_received) == (2, 4 + 3 + 4)
    assert (info.frames_sent, info.bytes_sent) == (2, 4 + 3 + 4)
    assert info.queued_output == 0
    assert info.outbound is False and info.paused is False and info.thread == 0
    time.sleep(0.05)
    assert srv.info(conn).age_ms >= info.age_ms + 40
    c.close()
    rec.wait_close(conn)

    def unknown():
        try:
            srv.info(conn)
        except NoConnError:
            return True
        return False
    wait_until(unknown, what="info() of a closed connection to raise NoConnError")
    with pytest.raises(NoConnError):
        srv.info(10 ** 9)


class Session:
    """A per-connection object whose release we can observe (weakref)."""

    def __init__(self, name):
        self.name = name


def test_user_data_lifecycle(make_server, backend, make_client):
    refs = {}
    in_close = {}
    holder = {}
    rec = Recorder()

    def on_connect(conn, peer):
        sess = Session(f"s{conn}")
        refs[conn] = weakref.ref(sess)
        holder["srv"].set_user_data(conn, sess)
        return rec.on_connect(conn, peer)

    def on_message(conn, data):
        holder["srv"].send(conn, holder["srv"].user_data(conn).name.encode())

    def on_close(conn, reason):
        in_close[conn] = holder["srv"].user_data(conn)   # still readable in on_close
        rec.on_close(conn, reason)

    srv = holder["srv"] = make_server(backend=backend, on_connect=on_connect,
                                      on_message=on_message, on_close=on_close)
    c = make_client(srv.port)
    conn = rec.wait_connects(1)
    assert c.request(b"who") == f"s{conn}".encode()
    other = {"set from": "another thread"}
    srv.set_user_data(conn, other)                      # replace, from this thread
    assert srv.user_data(conn) is other
    gc.collect()
    assert refs[conn]() is None                         # the replaced one is gone
    srv.set_user_data(conn, None)                       # clear
    assert srv.user_data(conn) is None and srv.user_data(conn, "dflt") == "dflt"
    sess = Session("kept")
    srv.set_user_data(conn, sess)
    ref = weakref.ref(sess)
    del sess
    c.close()
    rec.wait_close(conn)
    assert in_close[conn] is not None and in_close[conn].name == "kept"
    del in_close[conn]
    # Released once on_close has returned (the recorder woke us from inside it).
    wait_until(lambda: srv.user_data(conn) is None, what="the release after on_close")
    gc.collect()
    assert ref() is None
    with pytest.raises(NoConnError):
        srv.set_user_data(conn, "too late")
    with pytest.raises(NoConnError):
        srv.set_user_data(10 ** 9, "never existed")
    assert srv.user_data(10 ** 9) is None


def test_user_data_set_by_a_refusing_on_connect_is_released(make_server, backend, make_client):
    refs = []
    holder = {}

    def on_connect(conn, peer):
        sess = Session("refused")
        refs.append(weakref.ref(sess))
        holder["srv"].set_user_data(conn, sess)
        return False

    def on_connect_raises(conn, peer):
        on_connect(conn, peer)
        raise RuntimeError("refuse by exception")

    errors = []
    for hook in (on_connect, on_connect_raises):
        srv = holder["srv"] = make_server(backend=backend, on_connect=hook, on_message=lambda c, d: None,
                                          on_error=lambda exc, where, conn: errors.append(where))
        c = make_client(srv.port)
        assert c.closed_by_peer(WAIT)
        wait_until(lambda: srv.stats().connections_rejected == 1, what="the refusal")
        gc.collect()
        assert refs[-1]() is None
    assert errors == ["on_connect"]


def test_user_data_in_pull_mode_lives_until_the_next_poll(make_server, backend, make_client):
    srv = make_server(cls=PullServer, backend=backend)
    c = make_client(srv.port)
    deadline = time.monotonic() + WAIT
    events = []
    while not events:
        assert time.monotonic() < deadline
        events = srv.poll(timeout_ms=50)
    conn = events[0].conn
    assert events[0].kind == EventKind.CONNECT
    sess = Session("pull")
    ref = weakref.ref(sess)
    srv.set_user_data(conn, sess)
    del sess
    c.close()
    closed = []
    while not closed:
        assert time.monotonic() < deadline
        closed = [e for e in srv.poll(timeout_ms=50) if e.kind == EventKind.CLOSE]
    assert srv.user_data(conn).name == "pull"           # readable while handling CLOSE
    srv.poll(timeout_ms=0)                              # the next poll releases it
    gc.collect()
    assert ref() is None and srv.user_data(conn) is None
    with pytest.raises(NoConnError):
        srv.set_user_data(conn, "late")


def test_user_data_from_many_threads_with_several_loops(make_server, backend, make_client):
    """threads=2: callbacks on two loop threads and a host thread all use user data."""
    holder = {}
    rec = Recorder()

    def on_connect(conn, peer):
        holder["srv"].set_user_data(conn, [peer])
        return rec.on_connect(conn, peer)

    def on_message(conn, data):
        box = holder["srv"].user_data(conn)
        box.append(data)
        holder["srv"].send(conn, b"%d" % len(box))

    srv = holder["srv"] = make_server(backend=backend, threads=2, on_connect=on_connect,
                                      on_message=on_message, on_close=rec.on_close)
    cs = [make_client(srv.port) for _ in range(8)]
    for _ in range(3):
        for c in cs:
            c.send(b"x")
    for c in cs:
        assert [c.recv() for _ in range(3)] == [b"2", b"3", b"4"]
    for c in cs:
        c.close()
    rec.wait(lambda r: len(r.closes) == 8, what="8 closes")
    wait_until(lambda: not srv._udata, what="every object released")


def test_on_writable_also_after_a_collected_frame_was_refused_full(make_server, backend, make_client):
    """Frames collected in a batch leave through tf_send_packed; its TF_ERR_FULL (reported
    to on_send_error) arms on_writable like a FullError from send()."""
    rec = Recorder()
    calls, refused = [], []
    srv = make_server(backend=backend, max_queued_output=64 * KiB, on_writable=calls.append,
                      on_send_error=lambda conn, data, exc: refused.append(exc.code), **rec.callbacks())
    c = make_client(srv.port)
    c.send(b"hi")
    conn = rec.wait_connects(1)
    sent, stuck_since = 0, None
    deadline = time.monotonic() + WAIT
    while True:
        assert time.monotonic() < deadline, "queue not stuck full"
        n = len(refused)
        with srv.batch():
            srv.send(conn, b"w" * 8000)      # < 16 KiB: collected, sent when the block ends
        if len(refused) == n:
            sent += 1
            stuck_since = None
            continue
        if srv.info(conn).queued_output <= 32 * KiB:
            stuck_since = None
        elif stuck_since is None:
            stuck_since = time.monotonic()
        elif time.monotonic() - stuck_since > 0.1:
            break
        time.sleep(0.005)
    assert set(refused) == {tcpframe.TF_ERR_FULL}
    before = len(calls)
    _read_frames(c, sent)
    wait_until(lambda: len(calls) > before, what="on_writable")
    time.sleep(0.2)
    assert calls[before:] == [conn]
