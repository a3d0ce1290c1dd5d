"""Batched delivery and sends: on_messages, collected send() calls and their error
rules, send_many, batch(), flush(), events()/aevents() batching, and the C calls
behind them (tf_events_pack, tf_send_packed, tf_send_batch) through ctypes."""
import asyncio
import ctypes
import dataclasses
import socket
import struct
import threading
import time

import pytest

import tcpframe
from tcpframe import (CloseReason, Event, EventKind, FullError, InvalidError, NoConnError,
                      PullServer, StoppedError, TooLargeError)
from tcpframe import _lib
from conftest import WAIT, Recorder, wait_until


class SendErrors:
    """on_send_error that records (conn, data, exc)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = []
        self.threads = set()

    def __call__(self, conn, data, exc):
        with self.lock:
            self.calls.append((conn, data, exc))
            self.threads.add(threading.get_ident())


def slow_reader(port):
    """A connected socket with a small receive window (set before connecting) whose
    owner does not read: the server's queued output for it fills up quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", port))
    return sock


def read_frames(sock, n, timeout=WAIT):
    """n frames from a raw socket (bounded wait)."""
    sock.settimeout(timeout)
    buf = b""
    out = []
    while len(out) < n:
        while len(buf) >= 4:
            (size,) = struct.unpack_from("<I", buf)
            if len(buf) < 4 + size:
                break
            out.append(buf[4:4 + size])
            buf = buf[4 + size:]
            if len(out) == n:
                break
        if len(out) == n:
            break
        chunk = sock.recv(1 << 20)
        assert chunk, f"connection closed after {len(out)} of {n} frames"
        buf += chunk
    return out


# ---------------------------------------------------------------------------
# Delivery


def test_on_messages_gets_batches_in_order_on_the_loop_thread(make_server, make_client, backend):
    batches, threads = [], set()
    connect_threads = set()

    def on_messages(batch):
        threads.add(threading.get_ident())
        batches.append(batch)

    srv = make_server(backend=backend, on_messages=on_messages,
                      on_connect=lambda conn, peer: connect_threads.add(threading.get_ident()))
    clients = [make_client(srv.port) for _ in range(3)]
    for i, c in enumerate(clients):
        c.send_many([b"%d:%d" % (i, k) for k in range(500)])
    wait_until(lambda: sum(map(len, batches)) == 1500, what="1500 frames")
    assert threads == connect_threads and threading.get_ident() not in threads
    assert all(isinstance(b, list) and b for b in batches)
    assert max(map(len, batches)) > 1, "frames were not batched"
    per_conn = {}
    for batch in batches:
        for conn, data in batch:
            assert type(conn) is int and type(data) is bytes
            per_conn.setdefault(conn, []).append(data)
    got = sorted(per_conn.values(), key=lambda frames: frames[0])
    assert got == [[b"%d:%d" % (i, k) for k in range(500)] for i in range(3)]


def test_on_message_and_on_messages_are_exclusive(make_server):
    with pytest.raises(InvalidError):
        make_server(on_message=lambda c, d: None, on_messages=lambda b: None)
    with pytest.raises(InvalidError):
        make_server(on_message=None, on_messages=None)
    with pytest.raises(InvalidError):
        make_server(on_messages=42)
    with pytest.raises(InvalidError):
        make_server(on_messages=lambda b: None, on_send_error=42)


def test_pipelined_echo_keeps_every_frame_in_order(make_server, backend):
    holder = {}
    srv = holder["srv"] = make_server(backend=backend,
                                      on_message=lambda conn, data: holder["srv"].send(conn, data))
    socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
    try:
        frames = [struct.pack("<I", k) + bytes([k % 251]) * (k % 300) for k in range(3000)]
        for s in socks:
            s.sendall(b"".join(tcpframe.encode_frame(f) for f in frames))
        for s in socks:
            assert read_frames(s, len(frames)) == frames
    finally:
        for s in socks:
            s.close()
    assert srv.send_errors == 0


def test_exception_in_on_messages_is_reported_and_the_loop_goes_on(make_server, make_client):
    errors = []
    seen = []

    def on_messages(batch):
        seen.extend(batch)
        if any(data == b"boom" for _, data in batch):
            raise ValueError("from on_messages")
        for conn, data in batch:
            holder["srv"].send(conn, data)

    holder = {}
    srv = holder["srv"] = make_server(on_messages=on_messages,
                                      on_error=lambda exc, where, conn: errors.append((exc, where, conn)))
    c = make_client(srv.port)
    c.send(b"boom")
    wait_until(lambda: errors, what="the report")
    assert isinstance(errors[0][0], ValueError) and errors[0][1] == "on_messages"
    assert c.request(b"after") == b"after"
    assert srv.callback_errors == 1


def test_payloads_stay_valid_after_the_callback(make_server, make_client):
    kept = []
    srv = make_server(on_message=lambda conn, data: kept.append(data))
    c = make_client(srv.port)
    frames = [bytes([i]) * (100 + i) for i in range(50)]
    c.send_many(frames)
    wait_until(lambda: len(kept) == 50, what="50 frames")
    c.send_many([b"\xff" * 200] * 50)  # reuses the library's buffers
    wait_until(lambda: len(kept) == 100, what="100 frames")
    assert kept[:50] == frames


def test_older_library_without_on_messages_falls_back_to_one_call_per_frame(make_server, make_client,
                                                                             monkeypatch):
    monkeypatch.setattr(_lib, "MISSING", _lib.MISSING + ["tf_config_set_on_messages"])
    holder = {}
    srv = holder["srv"] = make_server(on_message=lambda conn, data: holder["srv"].send(conn, data[::-1]))
    c = make_client(srv.port)
    assert c.request(b"abc") == b"cba"
    batches = []
    srv2 = make_server(on_messages=lambda batch: batches.append(batch))
    make_client(srv2.port).send_many([b"1", b"2"])
    wait_until(lambda: len(batches) == 2, what="two single-frame batches")
    assert [len(b) for b in batches] == [1, 1]


def test_older_library_without_tf_send_packed_sends_at_once(make_server, make_client, monkeypatch):
    monkeypatch.setattr(_lib, "MISSING", _lib.MISSING + ["tf_send_packed"])
    errors = SendErrors()
    holder = {}
    srv = holder["srv"] = make_server(on_message=lambda conn, data: holder["srv"].send(conn, data),
                                      on_send_error=errors)
    c = make_client(srv.port)
    assert c.request(b"abc") == b"abc"
    conn = next(iter(srv._live))
    srv.send_many([(conn, b"1"), (4242424, b"x"), (conn, b"2")])
    assert [c.recv(), c.recv()] == [b"1", b"2"]
    assert [(cn, type(e)) for cn, _, e in errors.calls] == [(4242424, NoConnError)]


def test_older_library_without_tf_events_pack_still_polls(make_server, make_client, monkeypatch):
    monkeypatch.setattr(_lib, "MISSING", _lib.MISSING + ["tf_events_pack", "tf_config_set_on_messages"])
    srv = make_server(cls=PullServer)
    c = make_client(srv.port)
    local = "%s:%d" % c.sock.getsockname()[:2]
    c.send_many([b"one", b""])
    c.close()
    events = []
    deadline = time.monotonic() + WAIT
    while not events or events[-1].kind != EventKind.CLOSE:
        assert time.monotonic() < deadline, events
        events += srv.poll(timeout_ms=50)
    conn = events[0].conn
    assert events == [Event(EventKind.CONNECT, conn, peer=local), Event(EventKind.MESSAGE, conn, data=b"one"),
                      Event(EventKind.MESSAGE, conn, data=b""),
                      Event(EventKind.CLOSE, conn, reason=CloseReason.PEER)]
    holder = {}
    cb = holder["s"] = make_server(on_message=lambda conn, data: holder["s"].send(conn, data))
    assert make_client(cb.port).request(b"per frame") == b"per frame"


# ---------------------------------------------------------------------------
# send() inside a batch


def test_small_sends_in_a_batch_are_collected_and_refusals_reported(make_server, make_client, backend):
    """A peer that does not read: the frames that fit are queued in order, the others
    are dropped and reported (never raised), like frames queued for a closing peer."""
    errors = SendErrors()
    outcome = {}
    holder = {}

    def on_message(conn, data):
        n = 0
        for k in range(200):
            holder["srv"].send(conn, struct.pack("<I", k) + b"s" * 996)  # 1000 B
            n += 1
        outcome["returned"] = n

    srv = holder["srv"] = make_server(backend=backend, on_message=on_message,
                                      max_queued_output=20_000, on_send_error=errors)
    sock = slow_reader(srv.port)
    try:
        sock.sendall(tcpframe.encode_frame(b"go"))
        wait_until(lambda: errors.calls, what="refusals")
        assert outcome["returned"] == 200  # nothing raised
        refused = [k for _, data, _ in errors.calls for k in struct.unpack_from("<I", data)]
        assert all(isinstance(exc, FullError) and exc.code == tcpframe.TF_ERR_FULL
                   for _, _, exc in errors.calls)
        assert srv.send_errors == len(errors.calls) == len(refused)
        accepted = 200 - len(refused)
        assert 0 < accepted < 200
        assert refused == list(range(accepted, 200))  # the first ones fit, in order
        got = read_frames(sock, accepted)
        assert [struct.unpack_from("<I", f)[0] for f in got] == list(range(accepted))
        loop_thread = errors.threads
        assert len(loop_thread) == 1 and threading.get_ident() not in loop_thread
    finally:
        sock.close()


def test_defer_sends_false_raises_full_inside_the_callback(make_server, make_client):
    result = {}
    holder = {}

    def on_message(conn, data):
        n = 0
        try:
            for _ in range(200):
                holder["srv"].send(conn, b"s" * 1000)
                n += 1
        except FullError as e:
            result["error"] = e
        result["accepted"] = n

    srv = holder["srv"] = make_server(on_message=on_message, max_queued_output=20_000, defer_sends=False)
    sock = slow_reader(srv.port)
    try:
        sock.sendall(tcpframe.encode_frame(b"go"))
        wait_until(lambda: "accepted" in result, what="on_message")
        assert isinstance(result.get("error"), FullError)
        assert 0 < result["accepted"] < 200
        assert srv.send_errors == 0
    finally:
        sock.close()


def test_sends_in_a_batch_raise_what_can_be_known_at_once(make_server, make_client):
    """TooLarge, unknown ids, connections we closed, big frames: raised on the spot."""
    outcome = []
    holder = {}

    def on_message(conn, data):
        srv = holder["srv"]
        for call in (lambda: srv.send(conn, b"x" * 101),           # > max_frame
                     lambda: srv.send(987654321, b"x"),            # never existed
                     lambda: srv.send(conn, b"ok")):
            try:
                call()
                outcome.append("ok")
            except (TooLargeError, NoConnError) as e:
                outcome.append(type(e).__name__)

    srv = holder["srv"] = make_server(on_message=on_message, max_frame=100)
    c = make_client(srv.port)
    c.send(b"go")
    assert c.recv() == b"ok"
    assert outcome == ["TooLargeError", "NoConnError", "ok"]


def test_frames_sent_before_a_big_one_keep_their_order(make_server, make_client):
    holder = {}
    big = b"B" * (SYNC := tcpframe.server.SYNC_SEND_BYTES)

    def on_message(conn, data):
        srv = holder["srv"]
        srv.send(conn, b"1")
        srv.send(conn, big)       # sent at once: "1" must leave first
        srv.send(conn, b"3")

    srv = holder["srv"] = make_server(on_message=on_message)
    c = make_client(srv.port)
    c.send(b"go")
    assert [c.recv(), c.recv(), c.recv()] == [b"1", big, b"3"]
    assert len(big) == SYNC


def test_send_then_close_in_a_batch_delivers_the_frame_first(make_server, make_client):
    holder = {}

    def on_message(conn, data):
        holder["srv"].send(conn, b"bye " + data)
        holder["srv"].close(conn)

    srv = holder["srv"] = make_server(on_message=on_message)
    c = make_client(srv.port)
    c.send_many([b"a", b"b", b"c"])
    assert c.recv() == b"bye a"
    assert c.closed_by_peer(WAIT)


def test_flush_reports_refusals_before_it_returns(make_server):
    """Inside a callback the loop thread writes only after the callback returns, so
    flush() is about order and error reports: they are known when it returns."""
    result = {}
    holder = {}

    def on_message(conn, data):
        srv = holder["srv"]
        for _ in range(100):
            srv.send(conn, b"f" * 1000)
        result["before"] = srv.send_errors
        srv.flush()
        result["after"] = srv.send_errors

    srv = holder["srv"] = make_server(on_message=on_message, max_queued_output=10_000)
    sock = slow_reader(srv.port)
    try:
        sock.sendall(tcpframe.encode_frame(b"go"))
        wait_until(lambda: "after" in result, what="on_message")
        assert result["before"] == 0 and result["after"] > 0
    finally:
        sock.close()


def test_flush_in_a_host_thread_batch_sends_at_once(make_server, make_client, recorder):
    srv = make_server(**recorder.callbacks())
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    with srv.batch():
        srv.send(conn, b"early")
        srv.flush()
        assert c.recv() == b"early"


def test_on_send_error_that_raises_is_reported(make_server):
    reports = []

    def bad_hook(conn, data, exc):
        raise RuntimeError("hook")

    holder = {}
    srv = holder["srv"] = make_server(on_message=lambda c, d: None, on_send_error=bad_hook,
                                      on_error=lambda exc, where, conn: reports.append((exc, where, conn)))
    srv._live.add(424242)  # pretend an open connection that the library no longer has
    srv.send_many([(424242, b"x")])
    assert srv.send_errors == 1
    assert len(reports) == 1 and isinstance(reports[0][0], RuntimeError)
    assert reports[0][1:] == ("on_send_error", 424242)


# ---------------------------------------------------------------------------
# send_many and batch() from host threads


def test_send_many_from_a_host_thread(make_server, make_client, recorder):
    errors = SendErrors()
    srv = make_server(on_send_error=errors, **recorder.callbacks())
    clients = [make_client(srv.port) for _ in range(3)]
    recorder.wait_connects(3)
    conns = [conn for conn, _ in recorder.connects]
    frames = [(conn, b"%d-%d" % (conn, k)) for k in range(100) for conn in conns]
    frames.insert(7, (987654321, b"nobody"))
    frames.insert(9, (conns[0], memoryview(b"..view..")[2:6]))
    srv.send_many(iter(frames))
    assert [(c, d) for c, d, _ in errors.calls] == [(987654321, b"nobody")]
    assert isinstance(errors.calls[0][2], NoConnError)
    for conn, c in zip(conns, clients):
        want = [bytes(d) for cc, d in frames if cc == conn]
        assert [c.recv() for _ in want] == want
    srv.send_many([])
    srv.stop()
    with pytest.raises(StoppedError):
        srv.send_many([(conns[0], b"late")])


def test_batch_block_holds_sends_until_it_ends(make_server, make_client, recorder):
    srv = make_server(**recorder.callbacks())
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    with srv.batch():
        for k in range(10):
            srv.send(conn, b"%d" % k)
        with srv.batch():  # nested: flushes at its end, collection goes on
            srv.send(conn, b"inner")
        c.settimeout(0.2)
        assert c.recv() == b"0"  # the inner block's end sent what was collected so far
        c.settimeout(WAIT)
        for k in range(1, 10):
            assert c.recv() == b"%d" % k
        assert c.recv() == b"inner"
        srv.send(conn, b"last")
        c.settimeout(0.2)
        with pytest.raises((socket.timeout, TimeoutError)):
            c.recv()
        c.settimeout(WAIT)
        other = []
        t = threading.Thread(target=lambda: (srv.send(conn, b"other thread"), other.append(1)))
        t.start()
        t.join(WAIT)
        assert c.recv() == b"other thread"  # other threads send at once
    assert c.recv() == b"last"
    with pytest.raises(NoConnError):  # outside a batch: raised at once again
        srv.send(987654321, b"x")


def test_stats_and_close_send_what_the_thread_collected(make_server, make_client, recorder):
    srv = make_server(**recorder.callbacks())
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    with srv.batch():
        srv.send(conn, b"counted")
        assert srv.stats().frames_sent in (0, 1)  # queued; maybe not written yet
        srv.send(conn, b"bye")
        srv.close(conn)
        with pytest.raises(NoConnError):
            srv.send(conn, b"after close")
    assert [c.recv(), c.recv()] == [b"counted", b"bye"]
    assert c.closed_by_peer(WAIT)


# ---------------------------------------------------------------------------
# Pull mode


def test_poll_events_equal_plain_events_and_are_frozen(make_server, make_client):
    srv = make_server(cls=PullServer)
    c = make_client(srv.port)
    c.send(b"payload")
    evs = []
    deadline = time.monotonic() + WAIT
    while len(evs) < 2:
        assert time.monotonic() < deadline
        evs += srv.poll(timeout_ms=50)
    msg = evs[1]
    assert msg == Event(EventKind.MESSAGE, msg.conn, data=b"payload")
    assert hash(msg) == hash(Event(EventKind.MESSAGE, msg.conn, data=b"payload"))
    assert dataclasses.asdict(msg) == {"kind": EventKind.MESSAGE, "conn": msg.conn, "reason": None,
                                       "data": b"payload", "peer": None}
    assert msg.kind is EventKind.MESSAGE and msg.reason is None and msg.peer is None
    assert repr(msg) == repr(Event(EventKind.MESSAGE, msg.conn, data=b"payload"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.data = b"changed"


def test_events_iterator_collects_sends_per_batch(make_server, backend):
    errors = SendErrors()
    srv = make_server(cls=PullServer, backend=backend, on_send_error=errors)
    socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
    frames = [b"%d" % k * (k % 40) for k in range(2000)]
    done = threading.Event()

    def serve():
        n = 0
        for ev in srv.events(timeout_ms=int(WAIT * 1000), max=256):
            if ev.kind == EventKind.MESSAGE:
                srv.send(ev.conn, ev.data)
                n += 1
                if n == 3 * len(frames):
                    break
        done.set()

    t = threading.Thread(target=serve)
    t.start()
    try:
        for s in socks:
            s.sendall(b"".join(tcpframe.encode_frame(f) for f in frames))
        for s in socks:
            assert read_frames(s, len(frames)) == frames
        assert done.wait(WAIT)
    finally:
        t.join(WAIT)
        for s in socks:
            s.close()
    assert errors.calls == [] and srv.send_errors == 0


def test_events_iterator_broken_off_sends_what_it_collected(make_server, make_client):
    srv = make_server(cls=PullServer)
    c = make_client(srv.port)
    c.send_many([b"1", b"2", b"3"])
    for ev in srv.events(timeout_ms=int(WAIT * 1000)):
        if ev.kind == EventKind.MESSAGE:
            srv.send(ev.conn, b"reply " + ev.data)
            break
    assert c.recv() == b"reply 1"  # leaving the loop ended the batch


def test_pull_collected_send_to_a_full_peer_is_reported(make_server, backend):
    errors = SendErrors()
    srv = make_server(cls=PullServer, backend=backend, max_queued_output=20_000, on_send_error=errors)
    sock = slow_reader(srv.port)
    try:
        sock.sendall(tcpframe.encode_frame(b"go"))
        for ev in srv.events(timeout_ms=int(WAIT * 1000)):
            if ev.kind == EventKind.MESSAGE:
                for _ in range(200):
                    srv.send(ev.conn, b"p" * 1000)
                break
        assert errors.calls and all(isinstance(e, FullError) for _, _, e in errors.calls)
        assert errors.threads == {threading.get_ident()}  # the iterating thread
    finally:
        sock.close()


def test_aevents_sends_collected_replies_when_the_consumer_awaits(make_server):
    srv = make_server(cls=PullServer)

    async def main():
        loop = asyncio.get_running_loop()
        first_reply_seen = asyncio.Event()

        async def serve():
            async for ev in srv.aevents():
                if ev.kind == EventKind.MESSAGE:
                    srv.send(ev.conn, b"re:" + ev.data)
                    if ev.data == b"1":
                        # Mid-batch await: the reply above must leave meanwhile.
                        await asyncio.wait_for(first_reply_seen.wait(), WAIT)

        def client():
            with tcpframe.Client("127.0.0.1", srv.port, timeout=WAIT) as c:
                c.send_many([b"1", b"2"])  # one write: most likely one batch
                assert c.recv() == b"re:1"
                loop.call_soon_threadsafe(first_reply_seen.set)
                assert c.recv() == b"re:2"

        task = asyncio.create_task(serve())
        try:
            await asyncio.wait_for(loop.run_in_executor(None, client), WAIT * 2)
        finally:
            srv.stop(0)
            await asyncio.wait_for(task, WAIT)

    asyncio.run(main())


def test_aevents_lets_other_tasks_run_under_a_steady_stream(make_server):
    srv = make_server(cls=PullServer)
    stop = threading.Event()

    def flood():
        with tcpframe.Client("127.0.0.1", srv.port, timeout=WAIT) as c:
            while not stop.is_set():
                c.send_many([b"x"] * 200)
                time.sleep(0.001)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        async def consume():
            async for ev in srv.aevents():
                pass

        t = asyncio.create_task(ticker())
        c = asyncio.create_task(consume())
        await asyncio.sleep(0.5)
        stop.set()
        srv.stop(0)
        await asyncio.wait_for(c, WAIT)
        t.cancel()
        return ticks

    th = threading.Thread(target=flood)
    th.start()
    try:
        assert asyncio.run(main()) > 10
    finally:
        stop.set()
        th.join(WAIT)


# ---------------------------------------------------------------------------
# The C calls behind it, through ctypes


def test_tf_send_packed_and_tf_send_batch_report_a_result_per_frame(make_server, make_client, recorder):
    srv = make_server(max_frame=10, **recorder.callbacks())
    c = make_client(srv.port)
    conn = recorder.wait_connects()
    ptr = srv._enter()
    try:
        send_packed = _lib.func("tf_send_packed")
        recs = [(conn, b"one"), (999999, b"nobody"), (conn, b"x" * 11), (conn, b"")]
        buf = b"".join(struct.pack("<QQ", cn, len(d)) + d for cn, d in recs)
        results = (ctypes.c_int32 * 8)()
        count = ctypes.c_size_t(0)
        rc = send_packed(ptr, buf, len(buf), ctypes.addressof(results), 8, ctypes.byref(count))
        assert rc == tcpframe.TF_OK and count.value == 4
        assert list(results[:4]) == [tcpframe.TF_OK, tcpframe.TF_ERR_NO_CONN, tcpframe.TF_ERR_TOO_LARGE,
                                     tcpframe.TF_OK]
        assert send_packed(ptr, buf[:-1] + b"\x01", len(buf) - 5, ctypes.addressof(results), 8,
                           ctypes.byref(count)) == tcpframe.TF_ERR_INVALID  # a record runs past the end
        assert send_packed(ptr, buf, len(buf), ctypes.addressof(results), 3,
                           ctypes.byref(count)) == tcpframe.TF_ERR_INVALID  # more than max_results

        outs = (_lib.TfOut * 3)()
        keep = [ctypes.create_string_buffer(b"batch", 5), ctypes.create_string_buffer(b"!", 1)]
        outs[0].conn, outs[0].data, outs[0].len = conn, ctypes.addressof(keep[0]), 5
        outs[1].conn, outs[1].data, outs[1].len = 12345678, ctypes.addressof(keep[1]), 1
        outs[2].conn, outs[2].data, outs[2].len = conn, None, 0
        assert _lib.func("tf_send_batch")(ptr, outs, 3) == tcpframe.TF_OK
        assert [o.result for o in outs] == [tcpframe.TF_OK, tcpframe.TF_ERR_NO_CONN, tcpframe.TF_OK]
    finally:
        srv._h.exit()
    assert [c.recv() for _ in range(4)] == [b"one", b"", b"batch", b""]


def test_tf_events_pack_layout_and_full(make_server, make_client):
    srv = make_server(cls=PullServer)
    c = make_client(srv.port)
    local = "%s:%d" % c.sock.getsockname()[:2]
    c.send_many([b"abc", b""])
    time.sleep(0.1)  # all three events wait: one poll takes them
    arr = (_lib.TfEvent * 8)()
    count = ctypes.c_size_t(0)
    pack = _lib.func("tf_events_pack")
    needed = ctypes.c_size_t(99)
    ptr = srv._enter()
    try:
        rc = _lib.func("tf_server_poll")(ptr, arr, 8, ctypes.byref(count), 1000)
        assert rc == tcpframe.TF_OK and count.value == 3
        assert pack(ctypes.addressof(arr), 0, None, 0, ctypes.byref(needed)) == tcpframe.TF_OK
        assert needed.value == 0
        small = ctypes.create_string_buffer(10)
        assert pack(ctypes.addressof(arr), 3, ctypes.addressof(small), 10, ctypes.byref(needed)) \
            == tcpframe.TF_ERR_FULL
        want = 3 * 24 + len(local) + 3
        assert needed.value == want
        out = ctypes.create_string_buffer(want)
        assert pack(ctypes.addressof(arr), 3, ctypes.addressof(out), want, ctypes.byref(needed)) \
            == tcpframe.TF_OK
        raw = out.raw
    finally:
        srv._h.exit()
    kind, reason, conn, n = struct.unpack_from("<iiQQ", raw, 0)
    assert (kind, reason, n) == (tcpframe.TF_EVENT_CONNECT, 0, len(local))
    assert raw[24:24 + n] == local.encode()
    off = 24 + n
    assert struct.unpack_from("<iiQQ", raw, off) == (tcpframe.TF_EVENT_MESSAGE, 0, conn, 3)
    assert raw[off + 24:off + 27] == b"abc"
    assert struct.unpack_from("<iiQQ", raw, off + 27) == (tcpframe.TF_EVENT_MESSAGE, 0, conn, 0)
