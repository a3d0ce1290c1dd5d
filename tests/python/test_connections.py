"""on_connect decides, on_close says why, stats count it all."""
import socket
import time

from tcpframe import CloseReason
from conftest import WAIT, Recorder, wait_until


def test_on_connect_gets_the_peer_address_text(make_server, make_client, recorder):
    srv = make_server(**recorder.callbacks())
    c = make_client(srv.port)
    recorder.wait_connects()
    host, port = c.sock.getsockname()[:2]
    assert recorder.connects[0][1] == f"{host}:{port}"
    assert recorder.connects[0][0] != 0


def test_connection_ids_are_unique_and_never_zero(make_server, make_client, recorder):
    srv = make_server(**recorder.callbacks())
    for _ in range(5):
        make_client(srv.port).close()
    recorder.wait(lambda r: len(r.closes) == 5, what="5 closes")
    ids = [conn for conn, _ in recorder.connects]
    assert len(set(ids)) == 5 and 0 not in ids


def test_refused_connection_is_closed_counted_and_never_named_again(make_server, make_client, backend):
    rec = Recorder(accept=False)
    srv = make_server(backend=backend, **rec.callbacks())
    c = make_client(srv.port)
    try:
        c.send(b"ignored")
    except OSError:
        pass  # a reset is allowed
    assert c.closed_by_peer(WAIT)
    wait_until(lambda: srv.stats().connections_rejected == 1, what="rejected == 1")
    st = srv.stats()
    assert st.connections_accepted == 0 and st.connections_active == 0
    time.sleep(0.05)
    assert rec.messages == [] and rec.closes == []


def test_on_connect_returning_none_accepts(make_server, make_client, recorder):
    srv = make_server(on_message=recorder.on_message, on_connect=lambda conn, peer: None)
    c = make_client(srv.port)
    c.send(b"in")
    recorder.wait(lambda r: r.messages, what="a message")
    assert srv.stats().connections_accepted == 1


def test_over_max_connections_is_closed_and_counted_as_rejected(make_server, make_client, recorder, backend):
    srv = make_server(backend=backend, max_connections=2, **recorder.callbacks())
    a, _b = make_client(srv.port), make_client(srv.port)
    recorder.wait_connects(2)
    extra = make_client(srv.port)
    assert extra.closed_by_peer(WAIT)
    wait_until(lambda: srv.stats().connections_rejected == 1, what="rejected == 1")
    assert len(recorder.connects) == 2
    srv.send(recorder.connects[0][0], b"still")
    assert a.recv() == b"still"


def test_close_reason_peer(make_server, make_client, recorder, backend):
    srv = make_server(backend=backend, **recorder.callbacks())
    make_client(srv.port).close()
    conn = recorder.wait_connects()
    assert recorder.wait_close(conn) == [CloseReason.PEER]
    assert type(recorder.closes[0][1]) is CloseReason


def test_close_reason_peer_reset(make_server, make_client, recorder, backend):
    import struct as _struct
    srv = make_server(backend=backend, **recorder.callbacks())
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _struct.pack("ii", 1, 0))
    c.close()  # RST instead of FIN
    assert recorder.wait_close(conn) == [CloseReason.PEER]


def test_close_reason_local_flushes_queued_output_first(make_server, make_client, recorder, backend):
    srv = make_server(backend=backend, **recorder.callbacks())
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    srv.send(conn, b"last words")
    srv.close(conn)
    assert c.recv() == b"last words"
    assert c.closed_by_peer(WAIT)
    assert recorder.wait_close(conn) == [CloseReason.LOCAL]


def test_close_reason_shutdown(make_server, make_client, recorder, backend):
    srv = make_server(backend=backend, **recorder.callbacks())
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    srv.stop(drain_ms=0)
    # stop() joined the loop thread: on_close has already run.
    assert [r for cn, r in recorder.closes if cn == conn] == [CloseReason.SHUTDOWN]
    assert c.closed_by_peer(WAIT)


def test_close_reason_idle(make_server, make_client, recorder, backend):
    srv = make_server(backend=backend, idle_timeout_ms=100, **recorder.callbacks())
    started = time.monotonic()
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    assert recorder.wait_close(conn) == [CloseReason.IDLE]
    assert time.monotonic() - started >= 0.09
    assert c.closed_by_peer(WAIT)
    assert srv.stats().closed_idle == 1


def test_idle_timer_is_reset_by_complete_frames(make_server, make_client, recorder):
    srv = make_server(idle_timeout_ms=300, **recorder.callbacks())
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    for _ in range(6):  # 6 x 100 ms = twice the timeout
        c.send(b"ping")
        time.sleep(0.1)
    assert recorder.closes == []
    assert recorder.wait_close(conn) == [CloseReason.IDLE]


def test_close_reason_too_large_and_server_goes_on(make_server, make_client, recorder, backend):
    srv = make_server(backend=backend, max_frame=16, **recorder.callbacks())
    bad = make_client(srv.port)
    conn = recorder.wait_connects()
    bad.send_raw((17).to_bytes(4, "little"))  # announce 17 bytes, send none
    assert recorder.wait_close(conn) == [CloseReason.TOO_LARGE]
    assert bad.closed_by_peer(WAIT)
    assert srv.stats().closed_too_large == 1
    good = make_client(srv.port)
    good.send(b"x" * 16)
    recorder.wait(lambda r: r.messages, what="a message from the good client")
    assert recorder.messages[0][1] == b"x" * 16


def test_on_close_runs_exactly_once_per_accepted_connection(make_server, make_client, recorder, backend):
    srv = make_server(backend=backend, **recorder.callbacks())
    clients = [make_client(srv.port) for _ in range(6)]
    recorder.wait_connects(6)
    clients[0].close()
    clients[1].close()
    srv.close(recorder.connects[2][0])
    recorder.wait(lambda r: len(r.closes) >= 3, what="3 closes")
    srv.stop(0)
    assert sorted(c for c, _ in recorder.closes) == sorted(c for c, _ in recorder.connects)


def test_stats_count_frames_and_bytes_including_prefixes(echo_server, make_client):
    c = make_client(echo_server.port)
    payloads = [b"", b"a", b"hello world", b"z" * 1000]
    for p in payloads:
        assert c.request(p) == p
    expected_bytes = sum(4 + len(p) for p in payloads)
    wait_until(lambda: echo_server.stats().frames_sent == len(payloads), what="frames_sent")
    st = echo_server.stats()
    assert st.frames_received == len(payloads)
    assert st.bytes_received == expected_bytes
    assert st.bytes_sent == expected_bytes
    assert (st.connections_active, st.connections_accepted, st.connections_rejected) == (1, 1, 0)
    c.close()
    wait_until(lambda: echo_server.stats().connections_active == 0, what="active == 0")


def test_stats_converts_to_dict(echo_server):
    st = echo_server.stats()
    d = st._asdict()
    assert d == dict(st)
    assert list(d) == ["connections_active", "connections_accepted", "connections_rejected",
                       "frames_received", "frames_sent", "bytes_received", "bytes_sent",
                       "closed_too_large", "closed_idle"]
    assert all(type(v) is int for v in d.values())


def test_stats_reflect_an_event_before_its_callback(make_server, make_client):
    seen = {}
    holder = {}

    def on_message(conn, data):
        seen["frames_in_on_message"] = holder["srv"].stats().frames_received

    def on_close(conn, reason):
        st = holder["srv"].stats()
        seen["in_on_close"] = (st.connections_active, st.closed_too_large)

    holder["srv"] = srv = make_server(on_message=on_message, on_close=on_close, max_frame=8)
    c = make_client(srv.port)
    c.send(b"one")
    wait_until(lambda: "frames_in_on_message" in seen, what="on_message")
    c.send_raw((9).to_bytes(4, "little"))
    wait_until(lambda: "in_on_close" in seen, what="on_close")
    assert seen == {"frames_in_on_message": 1, "in_on_close": (0, 1)}
