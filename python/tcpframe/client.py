"""A blocking client for the tcpframe wire format (4-byte little-endian length + payload)
over a plain socket. Needs no library: handy for tests, tools and other processes."""
from __future__ import annotations

import socket
import struct
from typing import Iterable, Optional, Union

__all__ = ["Client", "ConnectionClosed", "encode_frame"]

_PREFIX = struct.Struct("<I")
Bytes = Union[bytes, bytearray, memoryview]


class ConnectionClosed(ConnectionError):
    """The server closed the connection (at a frame boundary, or in the middle of one)."""


def encode_frame(payload: Bytes) -> bytes:
    """Prefix + payload, as the server expects it on the wire."""
    if len(payload) > 0xFFFFFFFF:
        raise ValueError("payload longer than 2**32 - 1 bytes")
    return _PREFIX.pack(len(payload)) + bytes(payload)


class Client:
    """Client(host="127.0.0.1", port, timeout=5.0).

    send(data) writes one frame, recv() reads one (raises ConnectionClosed on EOF,
    socket.timeout / TimeoutError after `timeout` seconds), request(data) does both.
    `max_frame` bounds what recv() accepts from the server (ValueError beyond it).
    """

    def __init__(self, host: str = "127.0.0.1", port: Optional[int] = None, *,
                 timeout: Optional[float] = 5.0, max_frame: int = 64 << 20):
        if port is None:
            raise TypeError("port is required")
        self.max_frame = max_frame
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- sending ---------------------------------------------------------------

    def send(self, data: Bytes) -> None:
        """Send one frame."""
        if len(data) > 0xFFFFFFFF:
            raise ValueError("payload longer than 2**32 - 1 bytes")
        if len(data) < 65536:
            self.sock.sendall(_PREFIX.pack(len(data)) + bytes(data))
        else:  # avoid copying big payloads
            self.sock.sendall(_PREFIX.pack(len(data)))
            self.sock.sendall(data)

    def send_many(self, frames: Iterable[Bytes]) -> None:
        """Send several frames in one write."""
        self.sock.sendall(b"".join(encode_frame(f) for f in frames))

    def send_raw(self, raw: Bytes) -> None:
        """Send bytes as they are (no prefix added): for partial or malformed frames."""
        self.sock.sendall(raw)

    # -- receiving -------------------------------------------------------------

    def _recv_exact(self, n: int, *, boundary: bool) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                where = "between frames" if boundary and got == 0 else "in the middle of a frame"
                raise ConnectionClosed(f"connection closed by the server {where}")
            got += k
        return bytes(buf)

    def recv(self) -> bytes:
        """Read one frame's payload."""
        (length,) = _PREFIX.unpack(self._recv_exact(4, boundary=True))
        if length > self.max_frame:
            raise ValueError(f"server announced a {length}-byte frame (max_frame={self.max_frame})")
        return self._recv_exact(length, boundary=False) if length else b""

    def request(self, data: Bytes) -> bytes:
        """send(data), then recv()."""
        self.send(data)
        return self.recv()

    def closed_by_peer(self, timeout: float = 2.0) -> bool:
        """True when the server closes (EOF or reset) within `timeout` seconds, with no
        more data arriving first; False on timeout or if a byte arrives."""
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except (socket.timeout, TimeoutError):
            return False
        finally:
            self.sock.settimeout(old)

    # -- misc ------------------------------------------------------------------

    def settimeout(self, timeout: Optional[float]) -> None:
        self.sock.settimeout(timeout)

    def shutdown_write(self) -> None:
        """Half-close: tell the server we will send nothing more."""
        self.sock.shutdown(socket.SHUT_WR)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
