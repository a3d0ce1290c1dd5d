"""Context manager, stop/free, and the lifetime of the Python callbacks."""
import gc
import logging
import threading
import weakref

import pytest

import tcpframe
from tcpframe import CloseReason, StoppedError
from conftest import WAIT, Recorder, wait_until


def test_context_manager_stops_and_frees(make_client, backend):
    rec = Recorder()
    with tcpframe.Server("127.0.0.1:0", backend=backend, **rec.callbacks()) as srv:
        assert srv.running and srv.port > 0
        c = make_client(srv.port)
        conn = rec.wait_connects()
    assert not srv.running
    assert rec.closes == [(conn, CloseReason.SHUTDOWN)]
    assert c.closed_by_peer(WAIT)
    with pytest.raises(StoppedError):
        srv.send(conn, b"x")
    assert "freed" in repr(srv)


def test_port_zero_picks_a_free_port_and_address_is_kept(make_server):
    srv = make_server(on_message=lambda c, d: None)
    assert 0 < srv.port < 65536
    assert srv.address == "127.0.0.1:0"


def test_tuple_address_is_accepted(make_server, make_client):
    srv = make_server(address=("127.0.0.1", 0), on_message=lambda c, d: None)
    make_client(srv.port).send(b"ok")
    wait_until(lambda: srv.stats().frames_received == 1, what="a frame")


def _start_with_temporary_callbacks():
    # The only references to these lambdas are the ones the Server keeps.
    holder = {}
    srv = tcpframe.Server(on_message=lambda conn, data: holder["s"].send(conn, data[::-1]),
                          on_connect=lambda conn, peer: True,
                          on_close=lambda conn, reason: None)
    holder["s"] = srv
    return weakref.ref(srv), srv.port


def test_callbacks_outlive_every_reference_but_the_server(make_client):
    ref, port = _start_with_temporary_callbacks()
    for _ in range(3):
        gc.collect()
    srv = ref()
    assert srv is not None, "a running server must not be collected"
    try:
        assert make_client(port).request(b"abc") == b"cba"
    finally:
        srv.stop(0)
    del srv
    for _ in range(3):
        gc.collect()
    assert ref() is None, "a stopped, unreferenced server is collected (and freed)"


def test_stop_with_drain_delivers_queued_output(make_server, make_client, recorder, backend):
    srv = make_server(backend=backend, **recorder.callbacks())
    c = make_client(srv.port, timeout=WAIT)
    conn = recorder.wait_connects()
    big = b"d" * (2 * 1024 * 1024)
    srv.send(conn, big)
    srv.send(conn, b"tail")
    got = []
    reader = threading.Thread(target=lambda: got.extend([c.recv(), c.recv()]))
    reader.start()
    srv.stop(drain_ms=3000)
    reader.join(WAIT)
    assert got == [big, b"tail"]
    assert recorder.closes == [(conn, CloseReason.SHUTDOWN)]


def test_log_callable_receives_messages(make_server, make_client):
    lines = []
    srv = make_server(on_message=lambda c, d: None, max_frame=4, idle_timeout_ms=50,
                      log=lambda level, msg: lines.append((level, msg)))
    make_client(srv.port).send_raw((1000).to_bytes(4, "little"))  # too large
    make_client(srv.port)                                           # goes idle
    wait_until(lambda: srv.stats().closed_too_large == 1 and srv.stats().closed_idle == 1,
               what="two closes")
    srv.stop(0)
    assert lines, "the library logged nothing"
    assert all(isinstance(level, int) and 1 <= level <= 4 for level, _ in lines)
    assert all(isinstance(msg, str) and msg for _, msg in lines)


def test_log_accepts_a_logging_logger(make_server, make_client, caplog):
    logger = logging.getLogger("tcpframe.test")
    with caplog.at_level(logging.DEBUG, logger="tcpframe.test"):
        srv = make_server(on_message=lambda c, d: None, max_frame=4, idle_timeout_ms=50, log=logger)
        make_client(srv.port).send_raw((1000).to_bytes(4, "little"))
        make_client(srv.port)
        wait_until(lambda: srv.stats().closed_too_large == 1 and srv.stats().closed_idle == 1,
                   what="two closes")
        srv.stop(0)
    assert [r for r in caplog.records if r.name == "tcpframe.test"]


def test_library_version_is_semver():
    import re
    assert re.fullmatch(r"\d+\.\d+\.\d+([-+].*)?", tcpframe.library_version())
