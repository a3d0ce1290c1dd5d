"""Python bindings for tcpframe: a hardened TCP server for length-prefixed messages
(4-byte little-endian length + payload), implemented in Rust behind a C ABI.

    import tcpframe

    def on_message(conn, data):
        srv.send(conn, data)             # echo

    with tcpframe.Server("127.0.0.1:0", on_message=on_message) as srv:
        with tcpframe.Client("127.0.0.1", srv.port) as c:
            assert c.request(b"hi") == b"hi"

The shared library is found lazily, on first use: $TCPFRAME_LIB, a libtcpframe.so next
to this package, target/release/libtcpframe.so in a parent directory (source checkout),
then ctypes.util.find_library("tcpframe").
"""
from . import constants
from ._lib import LibraryNotFoundError, library_path, load_library
from .client import Client, ConnectionClosed, encode_frame
from .constants import *  # noqa: F401,F403 - the TF_* constants
from .constants import Backend, CloseReason, EventKind, LogLevel, PrefixFlag, ProxyProtocol
from .errors import (FullError, InternalError, InvalidError, NoConnError, StoppedError,
                     TfError, TfIOError, TooLargeError)
from .server import Address, Buffer, Event, Message, PullServer, Server, Stats, library_version
from .server import ConnInfo, Prefix

__version__ = "0.1.0"

__all__ = [
    "Server", "PullServer", "Client", "Stats", "Event",
    "Backend", "CloseReason", "EventKind", "LogLevel",
    "TfError", "InvalidError", "NoConnError", "FullError", "TooLargeError", "StoppedError",
    "TfIOError", "InternalError", "ConnectionClosed", "LibraryNotFoundError",
    "encode_frame", "library_version", "library_path", "load_library",
    "Address", "Buffer", "Message",
    "ConnInfo", "Prefix", "PrefixFlag", "ProxyProtocol",
]
__all__ += constants.__all__  # the TF_* constants (a form type checkers follow)
