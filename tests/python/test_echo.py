"""Frames go in and come back whole, in order, whatever their size or split."""
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import tcpframe
from conftest import WAIT, wait_until


def test_echo_small_frame(echo_server, make_client):
    c = make_client(echo_server.port)
    assert c.request(b"hello") == b"hello"
    assert c.request(b"\x00\x01\x02 binary \xff") == b"\x00\x01\x02 binary \xff"


def test_echo_several_mib_frame(echo_server, make_client):
    payload = os.urandom(5 * 1024 * 1024 + 3)
    c = make_client(echo_server.port, timeout=20)
    assert c.request(payload) == payload


def test_zero_length_frame_is_delivered_as_empty_bytes(make_server, make_client, recorder, backend):
    srv = make_server(backend=backend, **recorder.callbacks())
    c = make_client(srv.port)
    c.send(b"")
    c.send(b"after")
    recorder.wait(lambda r: len(r.messages) == 2, what="2 messages")
    (_, first), (_, second) = recorder.messages
    assert type(first) is bytes and first == b""
    assert second == b"after"
    assert srv.stats().frames_received == 2


def test_many_frames_in_one_write_arrive_in_order(echo_server, make_client):
    frames = [f"frame-{i}".encode() * (i % 7) for i in range(500)]
    c = make_client(echo_server.port)
    c.send_many(frames)
    assert [c.recv() for _ in frames] == frames


def test_frame_split_into_single_bytes_is_delivered_whole(make_server, make_client, recorder, backend):
    srv = make_server(backend=backend, **recorder.callbacks())
    c = make_client(srv.port)
    raw = tcpframe.encode_frame(b"split-me") + tcpframe.encode_frame(b"x")
    for i in range(len(raw)):
        c.send_raw(raw[i:i + 1])
        time.sleep(0.002)
    recorder.wait(lambda r: len(r.messages) == 2, what="2 messages")
    assert [d for _, d in recorder.messages] == [b"split-me", b"x"]


def test_fifty_parallel_clients_each_get_their_own_answers(echo_server):
    def session(i):
        with tcpframe.Client("127.0.0.1", echo_server.port, timeout=WAIT) as c:
            for j in range(20):
                msg = f"client {i} request {j}".encode() + os.urandom(i)
                assert c.request(msg) == msg
        return i

    with ThreadPoolExecutor(max_workers=50) as pool:
        assert sorted(pool.map(session, range(50))) == list(range(50))
    wait_until(lambda: echo_server.stats().connections_active == 0, what="all closed")
    st = echo_server.stats()
    assert st.connections_accepted == 50
    assert st.frames_received == 50 * 20
    assert st.frames_sent == 50 * 20


def test_send_accepts_bytes_like_objects(make_server, make_client, recorder):
    srv = make_server(**recorder.callbacks())
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    srv.send(conn, bytearray(b"ba"))
    srv.send(conn, memoryview(b"xxmvxx")[2:4])
    assert [c.recv(), c.recv()] == [b"ba", b"mv"]


def test_send_from_another_python_thread_keeps_call_order(make_server, make_client, recorder, backend):
    srv = make_server(backend=backend, **recorder.callbacks())
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    errors = []

    def sender():
        try:
            for i in range(200):
                srv.send(conn, struct.pack("<I", i))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=sender)
    t.start()
    t.join(WAIT)
    assert not t.is_alive() and errors == []
    assert [struct.unpack("<I", c.recv())[0] for _ in range(200)] == list(range(200))


def test_callbacks_run_on_one_thread_that_is_not_ours(make_server, make_client, recorder):
    srv = make_server(**recorder.callbacks())
    with make_client(srv.port) as c:
        c.send(b"x")
        recorder.wait(lambda r: r.messages, what="a message")
    conn = recorder.connects[0][0]
    recorder.wait_close(conn)
    assert len(recorder.threads) == 1
    assert threading.get_ident() not in recorder.threads


def test_ipv6_loopback_peer_text(make_server, recorder):
    import socket
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("::1 not available")
    srv = make_server(address="[::1]:0", **recorder.callbacks())
    with tcpframe.Client("::1", srv.port, timeout=WAIT) as c:
        c.send(b"v6")
        recorder.wait(lambda r: r.messages, what="a message")
        local_port = c.sock.getsockname()[1]
    assert recorder.connects[0][1] == f"[::1]:{local_port}"
    assert recorder.messages[0][1] == b"v6"
