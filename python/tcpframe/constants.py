"""The TF_* constants of the C API, as plain ints and as IntEnums.

Values are fixed by API.md; the test suite checks them against include/tcpframe.h.
"""
from enum import IntEnum, IntFlag
from typing import Type, TypeVar, Union

_E = TypeVar("_E", bound=IntEnum)

# Return codes
TF_OK = 0
TF_ERR_INVALID = 1
TF_ERR_NO_CONN = 2
TF_ERR_FULL = 3
TF_ERR_TOO_LARGE = 4
TF_ERR_STOPPED = 5
TF_ERR_IO = 6
TF_ERR_INTERNAL = 7

# on_close reasons
TF_CLOSE_PEER = 0
TF_CLOSE_LOCAL = 1
TF_CLOSE_SHUTDOWN = 2
TF_CLOSE_IO = 3
TF_CLOSE_TOO_LARGE = 4
TF_CLOSE_IDLE = 5
TF_CLOSE_PROTOCOL = 6  # the peer broke the framing rules or sent a bad PROXY header
TF_CLOSE_CONNECT_FAILED = 7  # an outbound connection (Server.connect) could not be established
TF_CLOSE_SLOW = 8  # queued output stayed above the slow-consumer limit too long
TF_CLOSE_OVERLOAD = 9  # memory for the connection could not be had (max_buffered, allocation)

# Backends
TF_BACKEND_AUTO = 0
TF_BACKEND_POLL = 1
TF_BACKEND_EPOLL = 2

# Pull-mode event kinds
TF_EVENT_CONNECT = 1
TF_EVENT_MESSAGE = 2
TF_EVENT_CLOSE = 3
TF_EVENT_WRITABLE = 4  # pull mode, with writable_events=True: a full connection has room again

# Length-prefix flags (the `prefix=(width, flags)` option)
TF_PREFIX_BIG_ENDIAN = 1
TF_PREFIX_INCLUDES_ITSELF = 2

# PROXY protocol modes (the `proxy_protocol=` option)
TF_PROXY_OFF = 0
TF_PROXY_V1 = 1
TF_PROXY_V2 = 2
TF_PROXY_ANY = 3

# Log levels
TF_LOG_ERROR = 1
TF_LOG_WARN = 2
TF_LOG_INFO = 3
TF_LOG_DEBUG = 4


class CloseReason(IntEnum):
    """Why a connection ended (the `reason` of on_close and of CLOSE events)."""
    PEER = TF_CLOSE_PEER
    LOCAL = TF_CLOSE_LOCAL
    SHUTDOWN = TF_CLOSE_SHUTDOWN
    IO = TF_CLOSE_IO
    TOO_LARGE = TF_CLOSE_TOO_LARGE
    IDLE = TF_CLOSE_IDLE
    OVERLOAD = TF_CLOSE_OVERLOAD
    PROTOCOL = TF_CLOSE_PROTOCOL
    CONNECT_FAILED = TF_CLOSE_CONNECT_FAILED
    SLOW = TF_CLOSE_SLOW


class Backend(IntEnum):
    AUTO = TF_BACKEND_AUTO
    POLL = TF_BACKEND_POLL
    EPOLL = TF_BACKEND_EPOLL


class EventKind(IntEnum):
    CONNECT = TF_EVENT_CONNECT
    MESSAGE = TF_EVENT_MESSAGE
    CLOSE = TF_EVENT_CLOSE
    WRITABLE = TF_EVENT_WRITABLE


class PrefixFlag(IntFlag):
    """Flags of the length prefix: `prefix=(2, PrefixFlag.BIG_ENDIAN)`."""
    LITTLE_ENDIAN = 0
    BIG_ENDIAN = TF_PREFIX_BIG_ENDIAN
    INCLUDES_ITSELF = TF_PREFIX_INCLUDES_ITSELF


class ProxyProtocol(IntEnum):
    """Which PROXY protocol header accepted connections must begin with."""
    OFF = TF_PROXY_OFF
    V1 = TF_PROXY_V1
    V2 = TF_PROXY_V2
    ANY = TF_PROXY_ANY


class LogLevel(IntEnum):
    ERROR = TF_LOG_ERROR
    WARN = TF_LOG_WARN
    INFO = TF_LOG_INFO
    DEBUG = TF_LOG_DEBUG


def _enum_or_int(enum: Type[_E], value: int) -> Union[_E, int]:
    """An IntEnum member when the library sends a known value, else the plain int
    (API.md allows new enum values to be added)."""
    try:
        return enum(value)
    except ValueError:
        return value

# The plain constants (the package re-exports them; a literal list, so that type
# checkers see them as exported).
__all__ = ["TF_OK", "TF_ERR_INVALID", "TF_ERR_NO_CONN", "TF_ERR_FULL", "TF_ERR_TOO_LARGE",
    "TF_ERR_STOPPED", "TF_ERR_IO", "TF_ERR_INTERNAL", "TF_CLOSE_PEER", "TF_CLOSE_LOCAL",
    "TF_CLOSE_SHUTDOWN", "TF_CLOSE_IO", "TF_CLOSE_TOO_LARGE", "TF_CLOSE_IDLE",
    "TF_CLOSE_PROTOCOL", "TF_CLOSE_CONNECT_FAILED", "TF_CLOSE_SLOW", "TF_CLOSE_OVERLOAD",
    "TF_BACKEND_AUTO", "TF_BACKEND_POLL", "TF_BACKEND_EPOLL", "TF_EVENT_CONNECT",
    "TF_EVENT_MESSAGE", "TF_EVENT_CLOSE", "TF_EVENT_WRITABLE", "TF_PREFIX_BIG_ENDIAN",
    "TF_PREFIX_INCLUDES_ITSELF", "TF_PROXY_OFF", "TF_PROXY_V1", "TF_PROXY_V2",
    "TF_PROXY_ANY", "TF_LOG_ERROR", "TF_LOG_WARN", "TF_LOG_INFO", "TF_LOG_DEBUG"]
