"""Pull mode: events polled by the host, by iterator, and under asyncio."""
import asyncio
import select
import struct
import threading
import time

import pytest

import tcpframe
from tcpframe import CloseReason, Event, EventKind, PullServer, StoppedError
from conftest import WAIT


def collect_until_close(srv, conn_count=1, timeout=WAIT):
    """Poll (bounded) until `conn_count` CLOSE events were seen."""
    events = []
    deadline = time.monotonic() + timeout
    while sum(e.kind == EventKind.CLOSE for e in events) < conn_count:
        assert time.monotonic() < deadline, f"timed out; got {events}"
        events += srv.poll(max=8, timeout_ms=50)
    return events


@pytest.fixture
def pull_server(make_server, backend):
    return make_server(cls=PullServer, backend=backend)


def test_poll_gives_connect_messages_close_in_order(pull_server, make_client):
    c = make_client(pull_server.port)
    local = "%s:%d" % c.sock.getsockname()[:2]
    c.send_many([b"one", b"", b"three"])
    time.sleep(0.05)
    c.close()
    events = collect_until_close(pull_server)
    conn = events[0].conn
    assert events == [
        Event(EventKind.CONNECT, conn, peer=local),
        Event(EventKind.MESSAGE, conn, data=b"one"),
        Event(EventKind.MESSAGE, conn, data=b""),
        Event(EventKind.MESSAGE, conn, data=b"three"),
        Event(EventKind.CLOSE, conn, reason=CloseReason.PEER),
    ]


def test_poll_without_events_respects_timeout(pull_server):
    t0 = time.monotonic()
    assert pull_server.poll(timeout_ms=0) == []
    assert time.monotonic() - t0 < 0.05
    t0 = time.monotonic()
    assert pull_server.poll(timeout_ms=120) == []
    assert 0.1 <= time.monotonic() - t0 < 2.0


def test_event_data_stays_valid_after_later_polls(pull_server, make_client):
    c = make_client(pull_server.port)
    frames = [bytes([i]) * (1000 + i) for i in range(20)]
    c.send_many(frames)
    got = []
    deadline = time.monotonic() + WAIT
    while len(got) < 21:
        assert time.monotonic() < deadline
        got += pull_server.poll(max=1, timeout_ms=50)  # one event per poll
    assert [e.data for e in got[1:]] == frames


def test_fd_is_readable_exactly_while_events_wait(pull_server, make_client):
    fd = pull_server.fd
    assert select.select([fd], [], [], 0)[0] == []
    make_client(pull_server.port).send(b"wake")
    assert select.select([fd], [], [], WAIT)[0] == [fd]
    deadline = time.monotonic() + WAIT
    got = []
    while len(got) < 2:
        assert time.monotonic() < deadline
        got += pull_server.poll(max=64, timeout_ms=0)
    assert select.select([fd], [], [], 0)[0] == []


def test_pull_echo_with_send_and_stats(pull_server, make_client):
    c = make_client(pull_server.port)
    c.send_many([b"a", b"bb"])
    echoed = 0
    deadline = time.monotonic() + WAIT
    while echoed < 2:
        assert time.monotonic() < deadline
        for ev in pull_server.poll(timeout_ms=50):
            if ev.kind == EventKind.MESSAGE:
                pull_server.send(ev.conn, ev.data.upper())
                echoed += 1
    assert [c.recv(), c.recv()] == [b"A", b"BB"]
    assert pull_server.stats().frames_received == 2


def test_events_iterator_ends_after_a_quiet_timeout(pull_server, make_client):
    c = make_client(pull_server.port)
    c.send(b"x")
    t0 = time.monotonic()
    kinds = [ev.kind for ev in pull_server.events(timeout_ms=200)]
    assert kinds == [EventKind.CONNECT, EventKind.MESSAGE]
    assert time.monotonic() - t0 < WAIT


def test_events_iterator_drains_shutdown_closes_then_ends(pull_server, make_client):
    make_client(pull_server.port)
    make_client(pull_server.port)
    stopper = threading.Timer(0.3, lambda: pull_server.stop(0))
    stopper.start()
    try:
        events = list(pull_server.events(timeout_ms=-1))  # ends only because of stop
    finally:
        stopper.join(WAIT)
    closes = [e for e in events if e.kind == EventKind.CLOSE]
    assert [e.reason for e in closes] == [CloseReason.SHUTDOWN] * 2
    with pytest.raises(StoppedError):
        pull_server.poll()


def test_pull_too_large_and_local_close_reasons(make_server, make_client, backend):
    srv = make_server(cls=PullServer, backend=backend, max_frame=8)
    make_client(srv.port).send_raw(struct.pack("<I", 9))
    ev = collect_until_close(srv)
    assert ev[-1].reason == CloseReason.TOO_LARGE
    c = make_client(srv.port)
    conn = srv.poll(timeout_ms=int(WAIT * 1000))[0].conn
    srv.close(conn)
    assert collect_until_close(srv)[-1] == Event(EventKind.CLOSE, conn, reason=CloseReason.LOCAL)
    assert c.closed_by_peer(WAIT)


def test_asyncio_echo_with_aevents(pull_server):
    async def serve():
        async for ev in pull_server.aevents():
            if ev.kind == EventKind.MESSAGE:
                pull_server.send(ev.conn, ev.data)

    async def client():
        reader, writer = await asyncio.open_connection("127.0.0.1", pull_server.port)
        answers = []
        for msg in (b"async", b"", b"x" * 70000):
            writer.write(tcpframe.encode_frame(msg))
            await writer.drain()
            (n,) = struct.unpack("<I", await reader.readexactly(4))
            answers.append(await reader.readexactly(n))
        writer.close()
        return answers

    async def main():
        server_task = asyncio.create_task(serve())
        try:
            answers = await asyncio.wait_for(client(), WAIT)
        finally:
            pull_server.stop(0)  # ends the async iterator
            await asyncio.wait_for(server_task, WAIT)
        return answers

    assert asyncio.run(main()) == [b"async", b"", b"x" * 70000]


def test_aevents_ends_when_stopped_while_waiting(pull_server, make_client):
    make_client(pull_server.port)

    async def main():
        seen = []

        async def consume():
            async for ev in pull_server.aevents():
                seen.append(ev)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)  # the consumer is now parked on add_reader
        assert not task.done()
        pull_server.stop(0)
        await asyncio.wait_for(task, WAIT)
        return seen

    seen = asyncio.run(main())
    assert [e.kind for e in seen] == [EventKind.CONNECT, EventKind.CLOSE]
    assert seen[-1].reason == CloseReason.SHUTDOWN


def test_poll_validates_arguments(pull_server):
    with pytest.raises(tcpframe.InvalidError):
        pull_server.poll(max=0)
    with pytest.raises(tcpframe.InvalidError):
        pull_server.poll(timeout_ms=-2)


def test_signal_handler_runs_during_a_forever_poll(pull_server):
    import signal

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    t0 = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            pull_server.poll(timeout_ms=-1)  # like Ctrl-C in a host's main loop
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.monotonic() - t0 < 2.0
    assert pull_server.poll(timeout_ms=0) == []  # still usable afterwards
