"""Every TF_ERR_* surfaces as its own exception; Python exceptions in callbacks are
reported and never stop the loop."""
import socket

import pytest

import tcpframe
from tcpframe import (FullError, InvalidError, NoConnError, StoppedError, TfError,
                      TfIOError, TooLargeError)
from conftest import WAIT, Recorder, wait_until


def test_error_classes_carry_their_code():
    pairs = [(tcpframe.InvalidError, 1), (NoConnError, 2), (FullError, 3), (TooLargeError, 4),
             (StoppedError, 5), (TfIOError, 6), (tcpframe.InternalError, 7)]
    for cls, code in pairs:
        e = cls(message="m")
        assert issubclass(cls, TfError) and e.code == code and e.message == "m"
    assert not issubclass(TfIOError, OSError)  # does not masquerade as the builtin


def test_too_large_send_raises_and_limit_itself_is_fine(make_server, make_client, recorder):
    srv = make_server(max_frame=1024, **recorder.callbacks())
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    with pytest.raises(TooLargeError) as info:
        srv.send(conn, b"x" * 1025)
    assert info.value.code == tcpframe.TF_ERR_TOO_LARGE
    srv.send(conn, b"y" * 1024)
    assert c.recv() == b"y" * 1024


def test_unknown_connection_raises_no_conn(echo_server):
    with pytest.raises(NoConnError) as info:
        echo_server.send(987654321, b"x")
    assert info.value.code == tcpframe.TF_ERR_NO_CONN
    with pytest.raises(NoConnError):
        echo_server.close(987654321)
    with pytest.raises(NoConnError):
        echo_server.send(0, b"x")


def test_closed_connection_takes_no_frames_and_no_second_close(make_server, make_client, recorder):
    srv = make_server(**recorder.callbacks())
    make_client(srv.port)
    conn = recorder.wait_connects()
    srv.close(conn)
    with pytest.raises(NoConnError):
        srv.send(conn, b"late")
    with pytest.raises(NoConnError):
        srv.close(conn)


def test_full_error_when_client_does_not_read(make_server, make_client, recorder, backend):
    srv = make_server(backend=backend, max_queued_output=256 * 1024, **recorder.callbacks())
    c = make_client(srv.port, timeout=WAIT)
    conn = recorder.wait_connects()
    frame = b"f" * (64 * 1024)
    accepted = 0
    with pytest.raises(FullError) as info:
        for _ in range(2000):  # 125 MiB at most: far beyond any socket buffer
            srv.send(conn, frame)
            accepted += 1
    assert info.value.code == tcpframe.TF_ERR_FULL
    assert accepted >= 1
    # Nothing of the refused frame was queued: the client gets exactly `accepted` frames.
    for _ in range(accepted):
        assert c.recv() == frame
    c.settimeout(0.2)
    with pytest.raises((socket.timeout, TimeoutError)):  # no extra byte, still open
        c.sock.recv(1)
    c.settimeout(WAIT)
    srv.send(conn, b"ok again")  # the queue drained: sending works again
    assert c.recv() == b"ok again"


def test_full_error_inside_a_callback(make_server, make_client):
    result = {}
    holder = {}

    def on_message(conn, data):
        n = 0
        try:
            for _ in range(2000):
                holder["srv"].send(conn, b"g" * 65536)
                n += 1
        except FullError as e:
            result["error"] = e
        result["accepted"] = n

    holder["srv"] = srv = make_server(on_message=on_message, max_queued_output=200_000)
    c = make_client(srv.port)
    c.send(b"go")
    wait_until(lambda: "accepted" in result, what="on_message")
    assert isinstance(result.get("error"), FullError)
    # 200_000 bytes hold 3 frames of 65540 (prefix included), not 4.
    assert result["accepted"] == 3
    for _ in range(3):
        assert len(c.recv()) == 65536


def test_stopped_wins_over_no_conn_after_stop(make_server, make_client, recorder):
    srv = make_server(**recorder.callbacks())
    make_client(srv.port)
    conn = recorder.wait_connects()
    srv.stop()
    for call in (lambda: srv.send(conn, b"x"), lambda: srv.send(123456, b"x"),
                 lambda: srv.close(conn), lambda: srv.close(123456)):
        with pytest.raises(StoppedError) as info:
            call()
        assert info.value.code == tcpframe.TF_ERR_STOPPED
    srv.stop()  # idempotent
    srv.free()
    srv.free()  # idempotent
    with pytest.raises(StoppedError):
        srv.send(conn, b"x")
    with pytest.raises(StoppedError):
        srv.stats()


def test_stop_inside_a_callback_raises_invalid_and_loop_goes_on(make_server, make_client):
    outcome = []
    holder = {}

    def on_message(conn, data):
        try:
            holder["srv"].stop()
            outcome.append("returned")
        except InvalidError as e:
            outcome.append(e)
        try:
            holder["srv"].free()
            outcome.append("freed")
        except InvalidError as e:
            outcome.append(e)
        holder["srv"].send(conn, data)

    holder["srv"] = srv = make_server(on_message=on_message)
    c = make_client(srv.port)
    assert c.request(b"a") == b"a"
    assert [type(o) for o in outcome] == [InvalidError, InvalidError]
    assert outcome[0].code == tcpframe.TF_ERR_INVALID
    assert c.request(b"b") == b"b"  # still serving
    assert srv.running


def test_exception_in_on_message_goes_to_on_error_and_loop_goes_on(make_server, make_client):
    reported = []
    holder = {}

    def on_message(conn, data):
        if data == b"boom":
            raise RuntimeError("callback failed")
        holder["srv"].send(conn, data)

    holder["srv"] = srv = make_server(
        on_message=on_message, on_error=lambda exc, where, conn: reported.append((exc, where, conn)))
    c = make_client(srv.port)
    c.send(b"boom")
    assert c.request(b"after") == b"after"
    assert len(reported) == 1
    exc, where, conn = reported[0]
    assert isinstance(exc, RuntimeError) and str(exc) == "callback failed"
    assert where == "on_message" and conn > 0
    assert srv.callback_errors == 1


def test_exception_without_on_error_reaches_unraisablehook(make_server, make_client, unraisable):
    holder = {}

    def on_message(conn, data):
        if data == b"boom":
            raise KeyError("nope")
        holder["srv"].send(conn, data)

    holder["srv"] = srv = make_server(on_message=on_message)
    c = make_client(srv.port)
    c.send(b"boom")
    assert c.request(b"after") == b"after"
    assert len(unraisable) == 1
    exc, _msg, obj = unraisable[0]
    assert isinstance(exc, KeyError)
    assert "on_message" in obj


def test_on_connect_raising_refuses_and_is_reported(make_server, make_client):
    reported = []
    rec = Recorder()

    def on_connect(conn, peer):
        raise ValueError("no thanks")

    srv = make_server(on_connect=on_connect, on_message=rec.on_message, on_close=rec.on_close,
                      on_error=lambda exc, where, conn: reported.append((type(exc), where)))
    c = make_client(srv.port)
    assert c.closed_by_peer(WAIT)
    wait_until(lambda: srv.stats().connections_rejected == 1, what="rejected")
    assert reported == [(ValueError, "on_connect")]
    assert rec.closes == []


def test_exception_in_on_close_is_reported(make_server, make_client):
    reported = []

    def on_close(conn, reason):
        raise RuntimeError("close failed")

    srv = make_server(on_message=lambda c, d: None, on_close=on_close,
                      on_error=lambda exc, where, conn: reported.append(where))
    make_client(srv.port).close()
    wait_until(lambda: reported, what="report")
    assert reported == ["on_close"]
    assert srv.running


def test_failing_on_error_falls_back_to_unraisablehook(make_server, make_client, unraisable):
    def on_error(exc, where, conn):
        raise ZeroDivisionError("hook broken")

    def on_message(conn, data):
        raise RuntimeError("first")

    srv = make_server(on_message=on_message, on_error=on_error)
    make_client(srv.port).send(b"x")
    wait_until(lambda: unraisable, what="unraisable")
    assert isinstance(unraisable[0][0], ZeroDivisionError)


def test_busy_address_raises_io_error_with_context(make_server):
    first = make_server(on_message=lambda c, d: None)
    with pytest.raises(TfIOError) as info:
        make_server(address=f"127.0.0.1:{first.port}", on_message=lambda c, d: None)
    assert info.value.code == tcpframe.TF_ERR_IO
    assert str(first.port) in info.value.message


@pytest.mark.parametrize("address", ["not an address", "127.0.0.1", "127.0.0.1:99999", ""])
def test_bad_address_raises_invalid(make_server, address):
    with pytest.raises(InvalidError) as info:
        make_server(address=address, on_message=lambda c, d: None)
    assert info.value.code == tcpframe.TF_ERR_INVALID


@pytest.mark.parametrize("kw", [
    dict(max_connections=0), dict(max_frame=0), dict(max_queued_output=0),   # library checks
    dict(max_frame=-1), dict(max_frame=2**32), dict(idle_timeout_ms=-5),      # binding checks
    dict(max_connections="10"), dict(backend="kqueue"), dict(backend=99),
])
def test_bad_configuration_raises_invalid(make_server, kw):
    with pytest.raises(InvalidError):
        make_server(on_message=lambda c, d: None, **kw)


def test_on_message_is_required():
    with pytest.raises(TypeError):
        tcpframe.Server("127.0.0.1:0")  # type: ignore[call-arg]
    with pytest.raises(InvalidError):
        tcpframe.Server("127.0.0.1:0", on_message=None)
