"""A blocking client for the tcpframe wire format (4-byte little-endian length + payload,
or another prefix format with prefix=) over a plain TCP or Unix socket. Needs no
library: handy for tests, tools and other processes."""
from __future__ import annotations

import socket
import struct
from typing import Iterable, Optional, Tuple, Union

__all__ = ["Client", "ConnectionClosed", "encode_frame", "Prefix"]

_PREFIX = struct.Struct("<I")
Bytes = Union[bytes, bytearray, memoryview]
Prefix = Union[int, Tuple[int, int]]
"""A length-prefix format: the width in bytes (1, 2, 4 or 8; little-endian, payload
length only), or (width, flags) with flags a combination of TF_PREFIX_BIG_ENDIAN (1)
and TF_PREFIX_INCLUDES_ITSELF (2). The default, None, is (4, 0)."""

_WIDTH_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_FLAG_BITS = 1 | 2  # TF_PREFIX_BIG_ENDIAN | TF_PREFIX_INCLUDES_ITSELF


class _Framing:
    """A checked prefix format (see Prefix)."""

    __slots__ = ("width", "flags", "packer", "extra", "max_payload")

    def __init__(self, prefix: Optional[Prefix]):
        if prefix is None:
            width, flags = 4, 0
        elif isinstance(prefix, int) and not isinstance(prefix, bool):
            width, flags = prefix, 0
        elif isinstance(prefix, tuple) and len(prefix) == 2:
            width, flags = int(prefix[0]), int(prefix[1])
        else:
            raise ValueError(f"prefix must be a width or (width, flags), not {prefix!r}")
        if width not in _WIDTH_CODES:
            raise ValueError(f"prefix width must be 1, 2, 4 or 8, not {width}")
        if flags & ~_FLAG_BITS or flags < 0:
            raise ValueError(f"unknown prefix flag bits in {flags}")
        self.width, self.flags = width, flags
        self.packer = struct.Struct((">" if flags & 1 else "<") + _WIDTH_CODES[width])
        self.extra = width if flags & 2 else 0  # the prefix counts itself
        self.max_payload = (1 << (8 * width)) - 1 - self.extra

    def header(self, n: int) -> bytes:
        """The prefix of an n-byte payload."""
        if n > self.max_payload:
            raise ValueError(f"payload of {n} bytes does not fit a {self.width}-byte prefix "
                             f"(at most {self.max_payload})")
        return self.packer.pack(n + self.extra)

    def encode(self, payload: Bytes) -> bytes:
        return self.header(len(payload)) + bytes(payload)


_DEFAULT_FRAMING = _Framing(None)


class ConnectionClosed(ConnectionError):
    """The server closed the connection (at a frame boundary, or in the middle of one)."""


def encode_frame(payload: Bytes, prefix: Optional[Prefix] = None) -> bytes:
    """Prefix + payload, as the server expects it on the wire. `prefix`: the server's
    prefix format (see Prefix; default 4-byte little-endian)."""
    if prefix is not None:
        return _Framing(prefix).encode(payload)
    if len(payload) > 0xFFFFFFFF:
        raise ValueError("payload longer than 2**32 - 1 bytes")
    return _PREFIX.pack(len(payload)) + bytes(payload)


class Client:
    """Client(host="127.0.0.1", port, timeout=5.0), or Client("unix:/path") /
    Client("unix:@name") for a server listening on a Unix socket (no port).

    send(data) writes one frame, recv() reads one (raises ConnectionClosed on EOF,
    socket.timeout / TimeoutError after `timeout` seconds), request(data) does both.
    `max_frame` bounds what recv() accepts from the server (ValueError beyond it).
    `prefix` is the server's length-prefix format (see Prefix): give the same value
    as the server's `prefix=` option.
    """

    def __init__(self, host: str = "127.0.0.1", port: Optional[int] = None, *,
                 timeout: Optional[float] = 5.0, max_frame: int = 64 << 20,
                 prefix: Optional[Prefix] = None):
        self._framing = _DEFAULT_FRAMING if prefix is None else _Framing(prefix)
        self.prefix = prefix
        if port is None and host.startswith("unix:"):
            path = host[len("unix:"):]
            self.max_frame = max_frame
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.settimeout(timeout)
                # "unix:@name" is a Linux abstract socket: a leading NUL byte.
                self.sock.connect("\0" + path[1:] if path.startswith("@") else path)
            except BaseException:
                self.sock.close()
                raise
            return
        if port is None:
            raise TypeError("port is required")
        self.max_frame = max_frame
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- sending ---------------------------------------------------------------

    def send(self, data: Bytes) -> None:
        """Send one frame."""
        if self._framing is not _DEFAULT_FRAMING:
            header = self._framing.header(len(data))
            if len(data) < 65536:
                self.sock.sendall(header + bytes(data))
            else:  # avoid copying big payloads
                self.sock.sendall(header)
                self.sock.sendall(data)
            return
        if len(data) > 0xFFFFFFFF:
            raise ValueError("payload longer than 2**32 - 1 bytes")
        if len(data) < 65536:
            self.sock.sendall(_PREFIX.pack(len(data)) + bytes(data))
        else:  # avoid copying big payloads
            self.sock.sendall(_PREFIX.pack(len(data)))
            self.sock.sendall(data)

    def send_many(self, frames: Iterable[Bytes]) -> None:
        """Send several frames in one write."""
        if self._framing is not _DEFAULT_FRAMING:
            self.sock.sendall(b"".join(self._framing.encode(f) for f in frames))
            return
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
        framing = self._framing
        if framing is not _DEFAULT_FRAMING:
            (length,) = framing.packer.unpack(self._recv_exact(framing.width, boundary=True))
            if length < framing.extra:
                raise ValueError(f"server sent a prefix value of {length}, below its own width")
            length -= framing.extra
        else:
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

    def __exit__(self, *exc_info: object) -> None:
        self.close()
