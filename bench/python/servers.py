#!/usr/bin/env python3
"""Echo servers for the Python benchmark (bench/python/run.sh), one per mode:

    servers.py MODE [HOST:PORT]      prints "listening on port N", stops on SIGINT/SIGTERM

  callbacks        tcpframe.Server(on_message=...): srv.send(conn, data) per frame
  callbacks-batch  tcpframe.Server(on_messages=...): srv.send_many(batch) per batch
  pull             tcpframe.PullServer, `for ev in srv.events()`: srv.send per MESSAGE
  asyncio          tcpframe.PullServer, `async for ev in srv.aevents()`: srv.send per MESSAGE
  asyncio-proto    a plain asyncio.Protocol echo, the framing parsed in Python, the
                   replies of one data_received written with one transport.write
  uvloop-proto     the same Protocol on uvloop (needs `pip install uvloop`)
  asyncio-naive    the textbook Protocol: one transport.write per reply
  uvloop-naive     the same on uvloop

Every mode does the same per-frame Python work a host would: take one payload as
bytes, hand it to a per-frame handler (here: echo it), queue the reply. The tcpframe
modes use only the public API, as a user would write them.
"""
from __future__ import annotations

import asyncio
import signal
import struct
import sys
import threading
from pathlib import Path
from typing import List, Optional

try:
    import tcpframe
except ImportError:  # a source checkout: use ../../python
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
    import tcpframe


def _stop_event() -> threading.Event:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    return done


def _ready(port: int) -> None:
    print(f"listening on port {port}", flush=True)


def run_callbacks(address: str) -> None:
    done = _stop_event()
    srv: Optional[tcpframe.Server] = None

    def on_message(conn: int, data: bytes) -> None:
        srv.send(conn, data)  # type: ignore[union-attr]

    with tcpframe.Server(address, on_message=on_message, max_connections=20000) as srv:
        _ready(srv.port)
        while not done.wait(1.0):
            pass


def run_callbacks_batch(address: str) -> None:
    done = _stop_event()
    srv: Optional[tcpframe.Server] = None

    def on_messages(batch: List[tcpframe.Message]) -> None:
        srv.send_many(batch)  # type: ignore[union-attr]

    with tcpframe.Server(address, on_messages=on_messages, max_connections=20000) as srv:
        _ready(srv.port)
        while not done.wait(1.0):
            pass


def run_pull(address: str) -> None:
    done = _stop_event()
    MESSAGE = tcpframe.EventKind.MESSAGE
    with tcpframe.PullServer(address, max_connections=20000) as srv:
        _ready(srv.port)
        send = srv.send
        while not done.is_set():
            for ev in srv.events(timeout_ms=200):
                if ev.kind == MESSAGE:
                    send(ev.conn, ev.data)


def run_asyncio(address: str) -> None:
    async def main() -> None:
        MESSAGE = tcpframe.EventKind.MESSAGE
        with tcpframe.PullServer(address, max_connections=20000) as srv:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, srv.stop, 0)
            _ready(srv.port)
            send = srv.send
            async for ev in srv.aevents():
                if ev.kind == MESSAGE:
                    send(ev.conn, ev.data)
    asyncio.run(main())


_PREFIX = struct.Struct("<I")


class EchoProtocol(asyncio.Protocol):
    """A plain asyncio echo for length-prefixed frames: parse every frame, hand each
    payload to the handler, write all replies of one data_received at once."""

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def handle(self, data: bytes) -> bytes:
        return data  # echo

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        size = len(buf)
        off = 0
        out = []
        unpack, pack, handle = _PREFIX.unpack_from, _PREFIX.pack, self.handle
        while size - off >= 4:
            (n,) = unpack(buf, off)
            end = off + 4 + n
            if end > size:
                break
            reply = handle(buf[off + 4:end])
            out.append(pack(len(reply)))
            out.append(reply)
            off = end
        self.buf = buf[off:]
        if out:
            self.transport.write(b"".join(out))  # type: ignore[union-attr]


class NaiveEchoProtocol(EchoProtocol):
    """The same parsing, one transport.write per reply (as most examples do)."""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        size = len(buf)
        off = 0
        unpack, pack, handle = _PREFIX.unpack_from, _PREFIX.pack, self.handle
        write = self.transport.write  # type: ignore[union-attr]
        while size - off >= 4:
            (n,) = unpack(buf, off)
            end = off + 4 + n
            if end > size:
                break
            reply = handle(buf[off + 4:end])
            write(pack(len(reply)) + reply)
            off = end
        self.buf = buf[off:]


def run_proto(address: str, use_uvloop: bool, naive: bool = False) -> None:
    host, _, port = address.rpartition(":")
    factory = NaiveEchoProtocol if naive else EchoProtocol

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, host.strip("[]"), int(port), backlog=4096)
        stop = loop.create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        _ready(server.sockets[0].getsockname()[1])
        await stop
        server.close()

    if use_uvloop:
        import uvloop
        uvloop.install()
    asyncio.run(main())


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    mode = sys.argv[1]
    address = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1:0"
    if mode == "callbacks":
        run_callbacks(address)
    elif mode == "callbacks-batch":
        run_callbacks_batch(address)
    elif mode == "pull":
        run_pull(address)
    elif mode == "asyncio":
        run_asyncio(address)
    elif mode == "asyncio-proto":
        run_proto(address, False)
    elif mode == "uvloop-proto":
        run_proto(address, True)
    elif mode == "asyncio-naive":
        run_proto(address, False, naive=True)
    elif mode == "uvloop-naive":
        run_proto(address, True, naive=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}\n{__doc__}")


if __name__ == "__main__":
    main()
