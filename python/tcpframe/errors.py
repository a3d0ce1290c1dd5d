"""Exceptions named after the TF_ERR_* codes; each carries .code and the library's message."""
from __future__ import annotations

from typing import Dict, Optional

from . import constants as C


class TfError(Exception):
    """Base class of every error reported by libtcpframe.

    `code` is the TF_ERR_* value (None for errors detected by the binding itself
    that have no C code), `message` the text of tf_last_error() read on the calling
    thread right after the failing call (may be "").
    """

    default_code: Optional[int] = None

    def __init__(self, code: Optional[int] = None, message: str = ""):
        if code is None:
            code = self.default_code
        self.code = code
        self.message = message
        super().__init__(code, message)

    def __str__(self) -> str:
        name = _CODE_NAMES.get(self.code, str(self.code))
        return f"{name}: {self.message}" if self.message else name


class InvalidError(TfError):
    """TF_ERR_INVALID: NULL pointer, out-of-range value, unparsable address, or a
    call not allowed here (tf_server_stop from inside a callback)."""
    default_code = C.TF_ERR_INVALID


class NoConnError(TfError):
    """TF_ERR_NO_CONN: connection id unknown or already closed."""
    default_code = C.TF_ERR_NO_CONN


class FullError(TfError):
    """TF_ERR_FULL: the connection's queued output would pass its limit; nothing was queued."""
    default_code = C.TF_ERR_FULL


class TooLargeError(TfError):
    """TF_ERR_TOO_LARGE: payload longer than the configured max frame."""
    default_code = C.TF_ERR_TOO_LARGE


class StoppedError(TfError):
    """TF_ERR_STOPPED: the server is stopping, stopped, or freed."""
    default_code = C.TF_ERR_STOPPED


class TfIOError(TfError):
    """TF_ERR_IO: an operating-system error (bind, listen, thread spawn...).
    Named TfIOError so it does not shadow the builtin IOError."""
    default_code = C.TF_ERR_IO


class InternalError(TfError):
    """TF_ERR_INTERNAL: a bug was caught at the library boundary."""
    default_code = C.TF_ERR_INTERNAL


_CODE_NAMES: Dict[Optional[int], str] = {
    C.TF_ERR_INVALID: "TF_ERR_INVALID",
    C.TF_ERR_NO_CONN: "TF_ERR_NO_CONN",
    C.TF_ERR_FULL: "TF_ERR_FULL",
    C.TF_ERR_TOO_LARGE: "TF_ERR_TOO_LARGE",
    C.TF_ERR_STOPPED: "TF_ERR_STOPPED",
    C.TF_ERR_IO: "TF_ERR_IO",
    C.TF_ERR_INTERNAL: "TF_ERR_INTERNAL",
}

_BY_CODE = {cls.default_code: cls for cls in
            (InvalidError, NoConnError, FullError, TooLargeError, StoppedError, TfIOError, InternalError)}


def error_for(code: int, message: str) -> TfError:
    """The exception instance for a non-zero TF_ERR_* code (unknown codes give TfError)."""
    return _BY_CODE.get(code, TfError)(code, message)
