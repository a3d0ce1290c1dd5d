"""Finds and loads libtcpframe, and declares the C signature of every function of API.md.

Nothing here is public: the rest of the package calls `lib()` and the `_Tf*` structs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["lib", "load_library", "library_path", "LibraryNotFoundError"]

LIB_ENV = "TCPFRAME_LIB"
_SONAMES = ("libtcpframe.so", "libtcpframe.so.0", "libtcpframe.dylib")
# What a wheel built by setuptools-rust (python/setup.py) puts next to __init__.py.
_WHEEL_NAMES = ("libtcpframe.abi3.so", "libtcpframe.abi3.dylib")


class LibraryNotFoundError(ImportError):
    """No libtcpframe shared library could be found or loaded."""


# ---------------------------------------------------------------------------
# C types (see include/tcpframe.h). Layouts must match the header exactly; the
# test suite compares them with the generated header.

tf_conn_id = ctypes.c_uint64


class _TfStatsFields(ctypes.Structure):
    _fields_ = [
        ("connections_active", ctypes.c_uint64),
        ("connections_accepted", ctypes.c_uint64),
        ("connections_rejected", ctypes.c_uint64),
        ("frames_received", ctypes.c_uint64),
        ("frames_sent", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
        ("bytes_sent", ctypes.c_uint64),
        ("closed_too_large", ctypes.c_uint64),
        ("closed_idle", ctypes.c_uint64),
    ]


STATS_FIELDS = [field[0] for field in _TfStatsFields._fields_]


class TfStats(ctypes.Structure):
    # API.md lets the library ADD stats fields at the end. tf_server_stats writes
    # sizeof(tf_stats) of the library it was built with, so we hand it a buffer with
    # spare room: a newer library can never write past our allocation.
    _fields_ = _TfStatsFields._fields_ + [("_reserved", ctypes.c_uint64 * 55)]


class TfCallbacks(ctypes.Structure):
    pass  # fields set below, after the function pointer types


ON_CONNECT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, tf_conn_id, ctypes.c_char_p)
# `data` is declared as void* so ctypes hands us an int (or None) without copying;
# the wrapper copies exactly `len` bytes with ctypes.string_at.
ON_MESSAGE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, tf_conn_id, ctypes.c_void_p, ctypes.c_size_t)
ON_CLOSE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, tf_conn_id, ctypes.c_int32)
LOG_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p)
# `events` as void*: the binding never touches tf_event fields one by one; it hands the
# pointer to tf_events_pack and slices the packed bytes.
ON_MESSAGES = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

TfCallbacks._fields_ = [
    ("user_data", ctypes.c_void_p),
    ("on_connect", ON_CONNECT),
    ("on_message", ON_MESSAGE),
    ("on_close", ON_CLOSE),
]


class TfEvent(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("reason", ctypes.c_int32),
        ("conn", tf_conn_id),
        ("data", ctypes.c_void_p),
        ("len", ctypes.c_size_t),
    ]


class TfOut(ctypes.Structure):
    _fields_ = [
        ("conn", tf_conn_id),
        ("data", ctypes.c_void_p),
        ("len", ctypes.c_size_t),
        ("result", ctypes.c_int32),
    ]


class TfIovec(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_void_p),
        ("len", ctypes.c_size_t),
    ]


class TfConnInfo(ctypes.Structure):
    _fields_ = [
        ("peer", ctypes.c_char * 128),
        ("bytes_received", ctypes.c_uint64),
        ("bytes_sent", ctypes.c_uint64),
        ("frames_received", ctypes.c_uint64),
        ("frames_sent", ctypes.c_uint64),
        ("queued_output", ctypes.c_uint64),
        ("age_ms", ctypes.c_uint64),
        ("outbound", ctypes.c_int32),
        ("paused", ctypes.c_int32),
        ("thread", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


ON_WRITABLE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, tf_conn_id)

PACKED_EVENT_HEADER = 24  # tf_events_pack: int32 kind, int32 reason, uint64 conn, uint64 len
PACKED_SEND_HEADER = 16   # tf_send_packed: uint64 conn, uint64 len

_p = ctypes.c_void_p  # opaque tf_server* / tf_config*, and buffers passed by address
_i32 = ctypes.c_int32
_size_p = ctypes.POINTER(ctypes.c_size_t)

# name -> (restype, argtypes). Every function of API.md, additions included.
SIGNATURES: Dict[str, Tuple[Any, List[Any]]] = {
    "tf_config_new": (_p, []),
    "tf_config_free": (None, [_p]),
    "tf_config_set_address": (_i32, [_p, ctypes.c_char_p]),
    "tf_config_set_max_connections": (_i32, [_p, ctypes.c_uint32]),
    "tf_config_set_max_frame": (_i32, [_p, ctypes.c_uint32]),
    "tf_config_set_idle_timeout_ms": (_i32, [_p, ctypes.c_uint32]),
    "tf_config_set_max_queued_output": (_i32, [_p, ctypes.c_uint64]),
    "tf_config_set_close_timeout_ms": (_i32, [_p, ctypes.c_uint32]),
    "tf_config_set_max_buffered": (_i32, [_p, ctypes.c_uint64]),
    "tf_config_set_backend": (_i32, [_p, _i32]),
    "tf_config_set_log": (_i32, [_p, LOG_FN, _p]),
    "tf_server_start": (_i32, [_p, ctypes.POINTER(TfCallbacks), ctypes.POINTER(_p)]),
    "tf_server_start_pull": (_i32, [_p, ctypes.POINTER(_p)]),
    "tf_server_port": (ctypes.c_uint16, [_p]),
    "tf_server_fd": (ctypes.c_int, [_p]),
    "tf_server_poll": (
        _i32,
        [_p, ctypes.POINTER(TfEvent), ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t), _i32],
    ),
    # data is char* so a `bytes` object is passed by pointer, without a copy.
    "tf_send": (_i32, [_p, tf_conn_id, ctypes.c_char_p, ctypes.c_size_t]),
    "tf_conn_close": (_i32, [_p, tf_conn_id]),
    "tf_conn_abort": (_i32, [_p, tf_conn_id]),
    "tf_server_stats": (_i32, [_p, ctypes.POINTER(TfStats)]),
    "tf_server_stop": (_i32, [_p, ctypes.c_uint32]),
    "tf_server_free": (None, [_p]),
    "tf_last_error": (ctypes.c_char_p, []),
    "tf_version": (ctypes.c_char_p, []),
    # Batched delivery and sends (API.md "Batched delivery and sends"). Buffers are
    # passed by address (c_void_p) or as bytes (c_char_p, no copy).
    "tf_config_set_on_messages": (_i32, [_p, ON_MESSAGES]),
    "tf_send_batch": (_i32, [_p, ctypes.POINTER(TfOut), ctypes.c_size_t]),
    "tf_events_pack": (_i32, [_p, ctypes.c_size_t, _p, ctypes.c_size_t, _size_p]),
    "tf_send_packed": (_i32, [_p, ctypes.c_char_p, ctypes.c_size_t, _p, ctypes.c_size_t, _size_p]),
    # Reach, cores, scale-out, host control (API.md "Second set of additions").
    "tf_config_set_prefix": (_i32, [_p, ctypes.c_uint32, ctypes.c_uint32]),
    "tf_config_set_unix_mode": (_i32, [_p, ctypes.c_uint32]),
    "tf_config_set_connect_timeout_ms": (_i32, [_p, ctypes.c_uint32]),
    "tf_config_set_threads": (_i32, [_p, ctypes.c_uint32]),
    "tf_config_set_proxy_protocol": (_i32, [_p, _i32]),
    "tf_config_set_max_connections_per_ip": (_i32, [_p, ctypes.c_uint32]),
    "tf_config_set_on_writable": (_i32, [_p, ON_WRITABLE]),
    "tf_config_set_slow_consumer": (_i32, [_p, ctypes.c_uint64, ctypes.c_uint32]),
    "tf_connect": (_i32, [_p, ctypes.c_char_p, ctypes.POINTER(tf_conn_id)]),
    "tf_server_drain": (_i32, [_p]),
    "tf_conn_set_user_data": (_i32, [_p, tf_conn_id, _p]),
    "tf_conn_user_data": (_p, [_p, tf_conn_id]),
    "tf_conn_pause": (_i32, [_p, tf_conn_id]),
    "tf_conn_resume": (_i32, [_p, tf_conn_id]),
    "tf_sendv": (_i32, [_p, tf_conn_id, ctypes.POINTER(TfIovec), ctypes.c_size_t]),
    "tf_send_many": (_i32, [_p, ctypes.POINTER(tf_conn_id), ctypes.c_size_t, ctypes.c_char_p,
                            ctypes.c_size_t, _size_p]),
    "tf_conn_get_info": (_i32, [_p, tf_conn_id, ctypes.POINTER(TfConnInfo)]),
}


# ---------------------------------------------------------------------------
# Discovery

def _candidates() -> List[Path]:
    """Where to look, in order. TCPFRAME_LIB is handled by the caller (it is exclusive)."""
    here = Path(__file__).resolve().parent
    out = [here / name for name in _SONAMES + _WHEEL_NAMES]
    target_dir = os.environ.get("CARGO_TARGET_DIR")
    if target_dir:
        out.append(Path(target_dir) / "release" / "libtcpframe.so")
    for parent in here.parents:
        out.append(parent / "target" / "release" / "libtcpframe.so")
    return out


_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_path: Optional[str] = None
MISSING: List[str] = []


def _declare(cdll: ctypes.CDLL) -> List[str]:
    missing: List[str] = []
    for name, (restype, argtypes) in SIGNATURES.items():
        try:
            fn = getattr(cdll, name)
        except AttributeError:
            missing.append(name)
            continue
        fn.restype = restype
        fn.argtypes = argtypes
    return missing


def load_library(path: Optional[str] = None) -> ctypes.CDLL:
    """Load libtcpframe (once per process) and return the ctypes handle.

    Search order: `path` if given; else $TCPFRAME_LIB; else a libtcpframe.so next to
    this package; else target/release/libtcpframe.so in any parent directory of the
    package (a source checkout); else ctypes.util.find_library("tcpframe").
    Raises LibraryNotFoundError listing every place tried.
    """
    global _lib, _path, MISSING
    with _lock:
        if _lib is not None:
            return _lib
        tried: List[str] = []
        where: Optional[str]
        explicit = path or os.environ.get(LIB_ENV)
        if explicit:
            # An explicit choice is never silently replaced by another library.
            choices = [explicit]
            where = "the path given" if path else "$" + LIB_ENV
        else:
            choices = [str(p) for p in _candidates() if p.is_file()]
            tried = [str(p) for p in _candidates()]
            found = ctypes.util.find_library("tcpframe")
            if found:
                choices.append(found)
            tried.append('ctypes.util.find_library("tcpframe")')
            where = None
        errors: List[str] = []
        for choice in choices:
            try:
                cdll = ctypes.CDLL(choice)
            except OSError as e:
                errors.append(f"{choice}: {e}")
                continue
            MISSING = _declare(cdll)
            _lib, _path = cdll, choice
            return cdll
        if explicit:
            raise LibraryNotFoundError(
                f"cannot load libtcpframe from {where} ({explicit!r}): "
                + ("; ".join(errors) or "not found")
            )
        msg = "cannot find libtcpframe.so. Build it (`cargo build --release` in the tcpframe " \
              f"repository) or set {LIB_ENV}=/path/to/libtcpframe.so. Tried: " + ", ".join(tried)
        if errors:
            msg += ". Load errors: " + "; ".join(errors)
        raise LibraryNotFoundError(msg)


def lib() -> ctypes.CDLL:
    """The loaded library (loading it on first use)."""
    return _lib if _lib is not None else load_library()


def library_path() -> str:
    """Path (or name) of the loaded library, loading it if needed."""
    lib()
    assert _path is not None
    return _path


def has(name: str) -> bool:
    """Whether the loaded library exports `name` (older builds lack the newest calls)."""
    lib()
    return name not in MISSING


def func(name: str) -> Any:
    """A declared library function; a clear TfError if this library build lacks it."""
    cdll = lib()
    if name in MISSING:
        from .errors import TfError
        raise TfError(None, f"{name} is not exported by {_path}: the library is older than this binding")
    return getattr(cdll, name)
