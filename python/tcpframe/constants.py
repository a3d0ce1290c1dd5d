"""The TF_* constants of the C API, as plain ints and as IntEnums.

Values are fixed by API.md; the test suite checks them against include/tcpframe.h.
"""
from enum import IntEnum

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
TF_CLOSE_OVERLOAD = 9  # memory for the connection could not be had (max_buffered, allocation)

# Backends
TF_BACKEND_AUTO = 0
TF_BACKEND_POLL = 1
TF_BACKEND_EPOLL = 2

# Pull-mode event kinds
TF_EVENT_CONNECT = 1
TF_EVENT_MESSAGE = 2
TF_EVENT_CLOSE = 3

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


class Backend(IntEnum):
    AUTO = TF_BACKEND_AUTO
    POLL = TF_BACKEND_POLL
    EPOLL = TF_BACKEND_EPOLL


class EventKind(IntEnum):
    CONNECT = TF_EVENT_CONNECT
    MESSAGE = TF_EVENT_MESSAGE
    CLOSE = TF_EVENT_CLOSE


class LogLevel(IntEnum):
    ERROR = TF_LOG_ERROR
    WARN = TF_LOG_WARN
    INFO = TF_LOG_INFO
    DEBUG = TF_LOG_DEBUG


def _enum_or_int(enum, value: int):
    """An IntEnum member when the library sends a known value, else the plain int
    (API.md allows new enum values to be added)."""
    try:
        return enum(value)
    except ValueError:
        return value
