"""Server (callbacks on the library's loop thread) and PullServer (events polled by the host).

Both own one tf_server*; the ctypes callback objects live as long as the server object,
and a running server is kept alive by a module registry until it is stopped.

Batching (API.md "Batched delivery and sends"): inbound frames cross the ctypes boundary
a batch at a time (tf_config_set_on_messages + tf_events_pack in callback mode,
tf_server_poll + tf_events_pack in pull mode), and the send() calls a thread makes while
it handles a batch are collected and leave in one tf_send_packed call when the batch is
done. See "Batches and send()" in python/README.md for the exact rules.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import ctypes
import dataclasses
import logging
import struct
import threading
import time
import warnings
from itertools import chain
from types import TracebackType
from typing import (Any, AsyncIterator, Callable, Dict, Iterable, Iterator, List, Optional, Set,
                    Tuple, Type, TypeVar, Union, cast)

from . import _lib
from . import constants as C
from .client import Prefix
from .constants import Backend, CloseReason, EventKind, LogLevel, ProxyProtocol, _enum_or_int
from .errors import InvalidError, StoppedError, TfError, error_for

__all__ = ["Server", "PullServer", "Stats", "Event", "library_version",
           "Address", "Buffer", "Message", "ConnInfo", "Prefix"]

Address = Union[str, Tuple[str, int]]
"""A listening address: "host:port", "[::1]:0", or a (host, port) tuple."""
Buffer = Union[bytes, bytearray, memoryview]
"""What send() takes: any bytes-like object (copied before send() returns)."""
Message = Tuple[int, bytes]
"""One inbound frame in an on_messages batch: (connection id, payload)."""

OnMessage = Callable[[int, bytes], object]
OnMessages = Callable[[List[Message]], object]
OnConnect = Callable[[int, str], object]
OnClose = Callable[[int, CloseReason], object]
OnError = Callable[[BaseException, str, int], object]
OnSendError = Callable[[int, bytes, TfError], object]
LogFunction = Callable[[LogLevel, str], object]
OnWritable = Callable[[int], object]
Log = Union[logging.Logger, "logging.LoggerAdapter[Any]", LogFunction]

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
_I32_MAX = 2**31 - 1

# send() inside a batch: payloads shorter than this are collected; longer ones (rare,
# and costly to copy anyway) are sent at once, after what was collected before them, so
# their FullError / NoConnError is raised exactly as outside a batch.
SYNC_SEND_BYTES = 16 * 1024
# A thread's collected frames are sent early once they hold this many bytes.
_FLUSH_BYTES = 1 << 20
_DEFAULT_MAX_FRAME = 8 * 1024 * 1024  # API.md's default max frame
_PACK_START = 64 * 1024  # first size of a tf_events_pack buffer; grows on TF_ERR_FULL

_SEND_HEADER = struct.Struct("<QQ").pack          # tf_send_packed record header
_SEND_HEADER_UNPACK = struct.Struct("<QQ").unpack_from
_SH = _lib.PACKED_SEND_HEADER
_EVENT_HEADER = struct.Struct("<iiQQ").unpack_from  # tf_events_pack record header
_EVENT_HEADER_PACK = struct.Struct("<iiQQ").pack
_EH = _lib.PACKED_EVENT_HEADER
_get_ident = threading.get_ident
_new = object.__new__
_set = object.__setattr__
_string_at = ctypes.string_at


# ctypes runs a callback from a thread Python did not create (the library's loop thread)
# under a Python thread state made for that call and destroyed after it: tens of
# microseconds per call, and threading.local data gone each time. One extra
# PyGILState_Ensure, never released, keeps the loop thread's state for its whole life
# (the state of a loop thread that ended is kept until interpreter exit: a few KiB per
# started server). Without ctypes.pythonapi (PyPy) it is skipped.
_loop_tls = threading.local()
_gilstate_ensure: Optional[Callable[[], int]]
try:
    _ensure_fn = ctypes.pythonapi.PyGILState_Ensure
    _ensure_fn.restype = ctypes.c_int
    _ensure_fn.argtypes = []
    _gilstate_ensure = _ensure_fn
except (AttributeError, OSError):  # pragma: no cover - not CPython
    _gilstate_ensure = None


def _pin_thread_state() -> None:
    """Called at the top of callbacks from the loop thread (GIL held): keeps this
    thread's Python state alive across callbacks."""
    tls = _loop_tls
    if not getattr(tls, "pinned", False):
        if _gilstate_ensure is not None:
            _gilstate_ensure()
        tls.pinned = True


def _last_error() -> str:
    raw = _lib.func("tf_last_error")()
    return raw.decode("utf-8", "replace") if raw else ""


def _check(rc: int) -> None:
    # Called right after the C call, on the same thread: tf_last_error() is thread-local.
    if rc != C.TF_OK:
        raise error_for(rc, _last_error())


def library_version() -> str:
    """tf_version() of the loaded library, e.g. "0.1.0"."""
    version: bytes = _lib.func("tf_version")()
    return version.decode("ascii", "replace")


# ---------------------------------------------------------------------------
# Values handed back to Python


@dataclasses.dataclass(frozen=True)
class Stats:
    """A snapshot of tf_stats. Convert with `stats._asdict()`, `dict(stats)` or
    `dataclasses.asdict(stats)`."""
    connections_active: int
    connections_accepted: int
    connections_rejected: int
    frames_received: int
    frames_sent: int
    bytes_received: int
    bytes_sent: int
    closed_too_large: int
    closed_idle: int

    def _asdict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)

    def keys(self) -> List[str]:
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key: str) -> int:
        if key not in self.keys():
            raise KeyError(key)
        value: int = getattr(self, key)
        return value


@dataclasses.dataclass(frozen=True)
class Event:
    """One pull-mode event. The data is already copied: it stays valid forever.

    kind:   EventKind.CONNECT, MESSAGE or CLOSE (or WRITABLE, with writable_events=True)
    conn:   the connection id
    reason: CLOSE only, a CloseReason (an int if the library sends a newer value); else None
    data:   MESSAGE only, the payload (b"" otherwise)
    peer:   CONNECT only, e.g. "127.0.0.1:50412" (None otherwise)
    """
    kind: Union[EventKind, int]
    conn: int
    reason: Optional[Union[CloseReason, int]] = None
    data: bytes = b""
    peer: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class ConnInfo:
    """What info(conn) reports about one open connection (tf_conn_get_info)."""
    peer: str              # the text on_connect got (cut to 127 bytes)
    bytes_received: int    # prefixes included, as in Stats
    bytes_sent: int
    frames_received: int
    frames_sent: int
    queued_output: int     # bytes accepted by send*() and not yet written
    age_ms: int            # since it was accepted, or since connect()
    outbound: bool         # made by connect()
    paused: bool           # between pause() and resume()
    thread: int            # index of its loop thread, 0 .. threads - 1


_MESSAGE = EventKind.MESSAGE
_KINDS: Dict[int, Union[EventKind, int]] = {int(k): k for k in EventKind}
_REASONS: Dict[int, Union[CloseReason, int]] = {int(r): r for r in CloseReason}


# ---------------------------------------------------------------------------
# Lifetime


class _Handle:
    """Owns the tf_server* and makes tf_server_free wait for calls in flight on
    other threads, so no call ever uses a freed pointer."""

    __slots__ = ("ptr", "_cond", "_busy", "_gone")

    def __init__(self, ptr: int):
        self.ptr = ptr
        self._cond = threading.Condition(threading.Lock())
        self._busy = 0
        self._gone = False

    def enter(self) -> int:
        with self._cond:
            if self._gone:
                raise StoppedError(C.TF_ERR_STOPPED, "server was freed")
            self._busy += 1
            return self.ptr

    def exit(self) -> None:
        with self._cond:
            self._busy -= 1
            if self._busy == 0:
                self._cond.notify_all()

    @property
    def gone(self) -> bool:
        return self._gone

    def retire(self, timeout: float = 10.0) -> Optional[int]:
        """Refuse new calls, wait for calls in flight; the pointer to free, or None
        when already retired or when a call never returned (then we leak it: a leak
        beats a use-after-free)."""
        with self._cond:
            if self._gone:
                return None
            self._gone = True
            if not self._cond.wait_for(lambda: self._busy == 0, timeout):
                warnings.warn("tcpframe: a call on the server did not return; "
                              "its memory is leaked instead of freed", ResourceWarning)
                return None
            return self.ptr


# Running servers are kept alive here (like running threads) until stop() succeeds, so
# the callbacks the loop thread calls can never be collected under it, and __del__ can
# only ever run on a stopped server.
_RUNNING: "set[_ServerBase]" = set()
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    # Stop before the interpreter finalizes, so no callback enters a dying interpreter.
    with _RUNNING_LOCK:
        servers = list(_RUNNING)
    for srv in servers:
        try:
            srv.free()
        except BaseException:  # noqa: BLE001 - nothing sensible to do at exit
            pass


class _Unraisable:
    """Reports an exception through sys.unraisablehook, the way an exception escaping
    any ctypes callback is reported: we re-raise it inside a tiny ctypes callback."""

    _FN = ctypes.CFUNCTYPE(None)

    def __init__(self, exc: Optional[BaseException], where: str):
        self.exc, self.where = exc, where

    def __call__(self) -> None:
        if self.exc is not None:
            raise self.exc

    def __repr__(self) -> str:
        return f"<{self.where}>"

    @classmethod
    def report(cls, exc: BaseException, where: str) -> None:
        thunk = cls(exc, where)
        try:
            cls._FN(thunk)()
        finally:
            thunk.exc = None  # break the exc -> traceback -> frame -> thunk cycle


_LOGGING_LEVELS = {
    C.TF_LOG_ERROR: logging.ERROR,
    C.TF_LOG_WARN: logging.WARNING,
    C.TF_LOG_INFO: logging.INFO,
    C.TF_LOG_DEBUG: logging.DEBUG,
}

_BACKEND_NAMES = {"auto": Backend.AUTO, "poll": Backend.POLL, "epoll": Backend.EPOLL}
_PROXY_NAMES = {"off": ProxyProtocol.OFF, "v1": ProxyProtocol.V1, "v2": ProxyProtocol.V2,
                "any": ProxyProtocol.ANY}
# set_user_data: ids of connections whose user data was released lately (bounded), so a
# set_user_data racing with the connection's end cannot store an object nobody releases.
_UDATA_RECENT = 4096


def _uint_settings(settings: List[Tuple[str, Any]],
                   table: Tuple[Tuple[str, Optional[int], str, int], ...]) -> None:
    """Queues (setter, value) for each option given: (name, value, setter, largest)."""
    for name, value, setter, largest in table:
        if value is not None:
            settings.append((setter, _uint(name, value, largest)))


def _named(what: str, value: Union[str, int], names: Dict[str, Any]) -> Any:
    """An option given by name ('poll', 'v2'...) or by its number."""
    if not isinstance(value, str):
        return value
    try:
        return names[value.lower()]
    except KeyError:
        choices = ", ".join(repr(n) for n in names)
        raise InvalidError(C.TF_ERR_INVALID, f"{what} must be one of {choices}, not {value!r}") from None


def _format_address(address: Address) -> str:
    if isinstance(address, str):
        return address
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{int(port)}"
    raise InvalidError(C.TF_ERR_INVALID, f"address must be 'host:port' or (host, port), not {address!r}")


def _uint(name: str, value: Any, maximum: int, minimum: int = 0) -> int:
    # Range-check here: ctypes would silently wrap -1 to 4294967295.
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidError(C.TF_ERR_INVALID, f"{name} must be an int in [{minimum}, {maximum}], not {value!r}")
    return value


def _check_callable(name: str, cb: object) -> None:
    if cb is not None and not callable(cb):
        raise InvalidError(C.TF_ERR_INVALID, f"{name} must be callable or None")


class _PackBuffer:
    """A reusable output buffer for tf_events_pack (grown on TF_ERR_FULL)."""

    __slots__ = ("buf", "addr", "cap", "needed", "needed_ref", "fn")

    def __init__(self, cap: int = _PACK_START):
        self.fn = _lib.func("tf_events_pack")
        self.needed = ctypes.c_size_t(0)
        self.needed_ref = ctypes.byref(self.needed)
        self.buf: ctypes.Array[ctypes.c_char] = ctypes.create_string_buffer(1)
        self.addr = 0
        self.cap = 0
        self.grow(cap)

    def grow(self, cap: int) -> None:
        cap = max(cap, 2 * self.cap)
        self.buf = ctypes.create_string_buffer(cap)
        self.addr = ctypes.addressof(self.buf)
        self.cap = cap

    def pack(self, events: int, count: int) -> bytes:
        """The packed bytes of `count` tf_event at address `events` (valid during the call)."""
        pack = self.fn
        rc = pack(events, count, self.addr, self.cap, self.needed_ref)
        if rc == C.TF_ERR_FULL:
            self.grow(self.needed.value + 4096)
            rc = pack(events, count, self.addr, self.cap, self.needed_ref)
        if rc:
            raise error_for(rc, _last_error())
        return _string_at(self.addr, self.needed.value)


class _Pending:
    """What one thread's send() calls collected during a batch, already in
    tf_send_packed's layout (uint64 conn, uint64 len, payload per frame), and the
    reusable results array of its tf_send_packed calls."""

    __slots__ = ("out", "depth", "tid", "results", "results_addr", "results_c", "count", "count_ref",
                 "on_loop")

    def __init__(self, tid: int):
        self.out = bytearray()
        self.depth = 0
        self.tid = tid
        self.count = ctypes.c_size_t(0)
        self.count_ref = ctypes.byref(self.count)
        # True while the batch is a callback batch on the server's own loop thread:
        # then the server cannot be freed under us (free() stops first, and stop joins
        # this thread), so no handle bookkeeping is needed.
        self.on_loop = False
        self.results = bytearray(0)
        self.results_c: Optional[ctypes.Array[ctypes.c_char]] = None
        self.results_addr = 0

    def results_for(self, n: int) -> int:
        """Address of room for `n` int32 results."""
        if len(self.results) < 4 * n:
            self.results_c = None  # release the export before replacing the buffer
            self.results = bytearray(max(4 * n, 4 * 1024))
            self.results_c = (ctypes.c_char * len(self.results)).from_buffer(self.results)
            self.results_addr = ctypes.addressof(self.results_c)
        return self.results_addr


def _records(out: bytes) -> List[Tuple[int, bytes]]:
    """The (conn, payload) records of a tf_send_packed buffer (for error reports)."""
    recs = []
    off, size = 0, len(out)
    while off < size:
        conn, n = _SEND_HEADER_UNPACK(out, off)
        off += _SH
        recs.append((conn, out[off:off + n]))
        off += n
    return recs


class _BatchScope:
    """`with server.batch():` — see _ServerBase.batch."""

    __slots__ = ("_srv", "_p")

    def __init__(self, srv: "_ServerBase"):
        self._srv = srv
        self._p: Optional[_Pending] = None

    def __enter__(self) -> "_BatchScope":
        self._p = self._srv._open_batch()
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        p, self._p = self._p, None
        if p is not None:
            self._srv._close_batch(p)


# ---------------------------------------------------------------------------


_S = TypeVar("_S", bound="_ServerBase")
_UNSET: Any = object()  # Server(on_message=...) not given at all


class _ServerBase:
    """What Server and PullServer share: configuration, send/close/stats/stop/free,
    and the collection of send() calls made during a batch."""

    def __init__(
        self,
        address: Address = "127.0.0.1:0",
        *,
        max_connections: Optional[int] = None,
        max_frame: Optional[int] = None,
        idle_timeout_ms: Optional[int] = None,
        max_queued_output: Optional[int] = None,
        close_timeout_ms: Optional[int] = None,
        max_buffered: Optional[int] = None,
        backend: Union[None, str, int] = None,
        log: Optional[Log] = None,
        on_error: Optional[OnError] = None,
        on_send_error: Optional[OnSendError] = None,
        defer_sends: bool = True,
        prefix: Optional[Prefix] = None,
        threads: Optional[int] = None,
        unix_mode: Optional[int] = None,
        connect_timeout_ms: Optional[int] = None,
        proxy_protocol: Union[None, str, int] = None,
        max_connections_per_ip: Optional[int] = None,
        slow_consumer: Optional[Tuple[int, int]] = None,
    ):
        self._h: Optional[_Handle] = None
        self._ptr = 0  # the tf_server*, for the loop thread's own calls (see _Pending.on_loop)
        self._f_send: Any = None
        self._f_send_packed: Any = None
        self._keep: List[Any] = []  # ctypes callback objects: must outlive the loop thread
        self._stopped = False
        _check_callable("on_error", on_error)
        _check_callable("on_send_error", on_send_error)
        self._on_error = on_error
        self._on_send_error = on_send_error
        self._errors = 0
        self._send_errors = 0
        self._errors_lock = threading.Lock()
        # Batches: thread id -> what that thread's send() calls collected. Touched only
        # by its own thread (dict operations are atomic under the GIL).
        self._batches: Dict[int, _Pending] = {}
        self._idle: Dict[int, _Pending] = {}
        # Connections a collected send may go to: opened (on_connect accepted / CONNECT
        # polled) and not yet closed by us or by the library as far as we saw. A send
        # to anything else is made at once, so its NoConnError is exact.
        self._live: Set[int] = set()
        # Closed or aborted by us, on_close not seen yet: their frames still in the
        # batch being delivered are skipped, as the library skips later ones.
        self._closing: Set[int] = set()
        self._defer = bool(defer_sends)
        self._limit = min(SYNC_SEND_BYTES, (_DEFAULT_MAX_FRAME if max_frame is None else max_frame) + 1)
        self._address = _format_address(address)
        self._port = 0
        settings: List[Tuple[str, Any]] = []  # (setter name, value) applied to a fresh tf_config
        settings.append(("tf_config_set_address", self._address.encode("utf-8")))
        _uint_settings(settings, (
            ("max_connections", max_connections, "tf_config_set_max_connections", _U32_MAX),
            ("max_frame", max_frame, "tf_config_set_max_frame", _U32_MAX),
            ("idle_timeout_ms", idle_timeout_ms, "tf_config_set_idle_timeout_ms", _U32_MAX),
            ("max_queued_output", max_queued_output, "tf_config_set_max_queued_output", _U64_MAX),
            ("close_timeout_ms", close_timeout_ms, "tf_config_set_close_timeout_ms", _U32_MAX),
            ("max_buffered", max_buffered, "tf_config_set_max_buffered", _U64_MAX),
        ))
        if backend is not None:
            backend = _named("backend", backend, _BACKEND_NAMES)
            settings.append(("tf_config_set_backend", _uint("backend", int(backend), _I32_MAX)))
        if log is not None and not callable(log) and not isinstance(log, (logging.Logger, logging.LoggerAdapter)):
            raise InvalidError(C.TF_ERR_INVALID, "log must be a logging.Logger or a callable(level, message)")
        self._settings = settings
        self._log = log
        # Setters that take more than one value, or a callback (applied after _settings).
        self._setup: List[Callable[[int], None]] = []
        self._configure_reach(prefix, threads, unix_mode, connect_timeout_ms, proxy_protocol,
                              max_connections_per_ip, slow_consumer)
        # Per-connection Python objects (set_user_data); see _udata_* below.
        self._udata: Dict[int, object] = {}
        self._udata_lock = threading.Lock()
        self._udata_recent: "collections.OrderedDict[int, None]" = collections.OrderedDict()
        self._udata_dead: "collections.deque[int]" = collections.deque()  # pull mode: released at the next poll

    def _configure_reach(self, prefix: Optional[Prefix], threads: Optional[int], unix_mode: Optional[int],
                         connect_timeout_ms: Optional[int], proxy_protocol: Union[None, str, int],
                         max_connections_per_ip: Optional[int],
                         slow_consumer: Optional[Tuple[int, int]]) -> None:
        """Checks the options of API.md's second set of additions and queues them for _start."""
        settings = self._settings
        _uint_settings(settings, (
            ("threads", threads, "tf_config_set_threads", _U32_MAX),
            ("unix_mode", unix_mode, "tf_config_set_unix_mode", _U32_MAX),
            ("connect_timeout_ms", connect_timeout_ms, "tf_config_set_connect_timeout_ms", _U32_MAX),
            ("max_connections_per_ip", max_connections_per_ip, "tf_config_set_max_connections_per_ip", _U32_MAX),
        ))
        if proxy_protocol is not None:
            proxy_protocol = _named("proxy_protocol", proxy_protocol, _PROXY_NAMES)
            settings.append(("tf_config_set_proxy_protocol", _uint("proxy_protocol", proxy_protocol, _I32_MAX)))
        if prefix is not None:
            if isinstance(prefix, tuple) and len(prefix) == 2:
                width = _uint("prefix width", prefix[0], _U32_MAX)
                flags = _uint("prefix flags", prefix[1], _U32_MAX)
            else:
                width, flags = _uint("prefix", prefix, _U32_MAX), 0

            def set_prefix(cfg: int) -> None:
                _check(_lib.func("tf_config_set_prefix")(cfg, width, flags))
            self._setup.append(set_prefix)
            if width in (1, 2, 4, 8):
                # What the prefix can express: a longer send() must raise TooLargeError at
                # once, never be collected (see SYNC_SEND_BYTES).
                cap = (1 << (8 * width)) - 1 - (width if flags & C.TF_PREFIX_INCLUDES_ITSELF else 0)
                self._limit = min(self._limit, cap + 1)
        if slow_consumer is not None:
            if not isinstance(slow_consumer, tuple) or len(slow_consumer) != 2:
                raise InvalidError(C.TF_ERR_INVALID,
                                   f"slow_consumer must be (soft_bytes, seconds), not {slow_consumer!r}")
            soft = _uint("slow_consumer soft_bytes", slow_consumer[0], _U64_MAX)
            seconds = _uint("slow_consumer seconds", slow_consumer[1], _U32_MAX)

            def set_slow(cfg: int) -> None:
                _check(_lib.func("tf_config_set_slow_consumer")(cfg, soft, seconds))
            self._setup.append(set_slow)

    # -- start ---------------------------------------------------------------

    def _start(self, starter: Callable[[int, Any], int], extra: Optional[Callable[[int], None]] = None) -> None:
        cfg = _lib.func("tf_config_new")()
        if not cfg:
            raise MemoryError("tf_config_new returned NULL")
        # Collected sends need tf_send_packed (an older library lacks it: send at once).
        self._defer = self._defer and _lib.has("tf_send_packed")
        self._f_send = _lib.func("tf_send")
        self._f_send_packed = _lib.func("tf_send_packed") if _lib.has("tf_send_packed") else None
        try:
            for setter, value in self._settings:
                _check(_lib.func(setter)(cfg, value))
            if self._log is not None:
                fn = _lib.LOG_FN(self._log_thunk(self._log))
                self._keep.append(fn)
                _check(_lib.func("tf_config_set_log")(cfg, fn, None))
            for setup in self._setup:
                setup(cfg)
            if extra is not None:
                extra(cfg)
            out = ctypes.c_void_p()
            _check(starter(cfg, ctypes.byref(out)))
        except BaseException:
            self._keep.clear()  # nothing runs: start failed before any loop thread existed
            raise
        finally:
            _lib.func("tf_config_free")(cfg)
        assert out.value is not None
        self._h = _Handle(out.value)
        self._ptr = out.value
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        self._port = _lib.func("tf_server_port")(out.value)

    def _log_thunk(self, log: Log) -> Callable[[Any, int, Optional[bytes]], None]:
        is_logger = isinstance(log, (logging.Logger, logging.LoggerAdapter))

        def c_log(_ud: Any, level: int, msg: Optional[bytes]) -> None:
            try:
                text = msg.decode("utf-8", "replace") if msg else ""
                if is_logger:
                    cast("logging.Logger", log).log(_LOGGING_LEVELS.get(level, logging.INFO), "%s", text)
                else:
                    cast(LogFunction, log)(cast(LogLevel, _enum_or_int(LogLevel, level)), text)
            except BaseException as exc:  # noqa: BLE001 - never let it reach C
                self._report("log", 0, exc)
        return c_log

    def _report(self, where: str, conn: int, exc: BaseException) -> None:
        """An exception escaped a Python callback: count it, hand it to on_error, or
        else to sys.unraisablehook. Never raises."""
        with self._errors_lock:
            self._errors += 1
        hook = self._on_error
        if hook is not None:
            try:
                hook(exc, where, conn)
                return
            except BaseException as hook_exc:  # noqa: BLE001
                exc, where = hook_exc, "on_error"
        try:
            _Unraisable.report(exc, f"tcpframe {type(self).__name__} {where} callback, conn {conn}")
        except BaseException:  # noqa: BLE001
            pass

    # -- properties ----------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the one picked when the address said port 0)."""
        return self._port

    @property
    def address(self) -> str:
        """The configured address text, e.g. "127.0.0.1:0"."""
        return self._address

    @property
    def running(self) -> bool:
        """True from construction until stop() or free()."""
        return self._h is not None and not self._stopped and not self._h.gone

    @property
    def callback_errors(self) -> int:
        """How many exceptions escaped Python callbacks (on_connect, on_message(s),
        on_close, on_send_error, log) of this server so far."""
        return self._errors

    @property
    def send_errors(self) -> int:
        """How many collected frames the library refused when they were flushed (each
        also went to on_send_error, when given). Sends made at once raise instead."""
        return self._send_errors

    def _enter(self) -> int:
        if self._h is None:
            raise StoppedError(C.TF_ERR_STOPPED, "server was never started")
        return self._h.enter()

    def _call(self, name: str, *args: Any) -> None:
        """Calls a TF_* returning function on this server's handle, raising the
        matching exception (with the library's message) on failure."""
        ptr = self._enter()
        try:
            rc = _lib.func(name)(ptr, *args)
            if rc:
                raise error_for(rc, _last_error())
        finally:
            self._h.exit()  # type: ignore[union-attr]

    # -- batches ---------------------------------------------------------------

    def _open_batch(self) -> _Pending:
        """Start (or nest) collecting the calling thread's send() calls."""
        tid = _get_ident()
        p = self._batches.get(tid)
        if p is None:
            p = self._idle.pop(tid, None) or _Pending(tid)
            self._batches[tid] = p
        p.depth += 1
        return p

    def _close_batch(self, p: _Pending) -> None:
        """Send what `p` collected; stop collecting when the outermost batch ends.
        Never raises (refused frames are reported)."""
        try:
            self._flush(p)
        finally:
            if p.depth > 0:
                p.depth -= 1
                if p.depth == 0 and self._batches.get(p.tid) is p:
                    del self._batches[p.tid]
                    if len(self._idle) < 16:  # kept for this thread's next batch
                        self._idle[p.tid] = p

    def _end_batch_now(self, p: _Pending) -> None:
        """Send what `p` collected and stop collecting for its thread altogether."""
        p.depth = 1
        self._close_batch(p)

    def _flush_mine(self) -> None:
        if self._batches:
            p = self._batches.get(_get_ident())
            if p is not None and p.out:
                self._flush(p)

    def _flush(self, p: _Pending, raise_stopped: bool = False) -> None:
        """One tf_send_packed for everything `p` holds. Never raises (unless
        raise_stopped, for a stopped server): a frame the library refuses is dropped
        and reported (send_errors, on_send_error)."""
        if not p.out:
            return
        out = bytes(p.out)
        del p.out[:]
        self._send_packed(p, out, raise_stopped)

    def _send_packed(self, p: _Pending, out: bytes, raise_stopped: bool = False) -> None:
        if self._f_send_packed is None:  # an older library: one call per frame
            for conn, data in _records(out):
                try:
                    self._send_now(conn, data)
                except TfError as exc:
                    self._refused(conn, data, exc)
            return
        max_frames = len(out) // _SH  # every record has a 16-byte header
        addr = p.results_for(max_frames)
        if p.on_loop:
            rc = self._f_send_packed(self._ptr, out, len(out), addr, max_frames, p.count_ref)
            msg = _last_error() if rc else ""
        else:
            try:
                ptr = self._enter()
            except StoppedError as exc:
                if raise_stopped:
                    raise
                for conn, data in _records(out):
                    self._refused(conn, data, exc)
                return
            try:
                rc = self._f_send_packed(ptr, out, len(out), addr, max_frames, p.count_ref)
                msg = _last_error() if rc else ""
            finally:
                self._h.exit()  # type: ignore[union-attr]
        if rc == C.TF_ERR_STOPPED and raise_stopped:
            raise StoppedError(rc, msg)
        if rc:
            for conn, data in _records(out):
                self._refused(conn, data, error_for(rc, msg or "the collected frames were not queued"))
            return
        n = p.count.value
        results = p.results
        if results.count(0, 0, 4 * n) == 4 * n:
            return
        codes = memoryview(results).cast("i")
        try:
            failed = [(i, code) for i, code in enumerate(codes[:n]) if code]
        finally:
            codes.release()
        recs = _records(out)
        for i, code in failed:
            conn, data = recs[i]
            if code == C.TF_ERR_NO_CONN:
                self._live.discard(conn)
            self._refused(conn, data, error_for(
                code, f"frame of {len(data)} bytes for connection {conn}, collected during a batch, "
                      f"was refused when the batch was sent, and dropped"))

    def _refused(self, conn: int, data: bytes, exc: TfError) -> None:
        with self._errors_lock:
            self._send_errors += 1
        hook = self._on_send_error
        if hook is not None:
            try:
                hook(conn, data, exc)
            except BaseException as hook_exc:  # noqa: BLE001
                self._report("on_send_error", conn, hook_exc)

    def batch(self) -> _BatchScope:
        """`with server.batch(): ...` — the send()/send_many() calls this thread makes
        inside the block are collected and leave in one library call when the block
        ends (or when flush() is called), exactly as inside an on_message callback (see
        the README, "Batches and send()"). Nesting is fine; other threads are not
        affected. Callback batches and events() iteration do this for you."""
        return _BatchScope(self)

    def flush(self) -> None:
        """Send now what this thread's send() calls collected in the current batch
        (one library call); refused frames are reported before it returns. A no-op
        outside a batch. Any thread (it only flushes its own)."""
        self._flush_mine()

    # -- calls ---------------------------------------------------------------

    def send(self, conn: int, data: Buffer) -> None:
        """Queue one frame for `conn` (the library adds the length prefix; `data` is
        copied before send() returns). Any thread, including inside callbacks.

        Outside a batch it raises NoConnError, TooLargeError, FullError (nothing was
        queued) or StoppedError. Inside a batch (on_message/on_messages callbacks, the
        events()/aevents() loop, `with server.batch()`) a frame shorter than 16 KiB
        to an open connection is collected and sent at the end of the batch: it raises
        nothing for a full queue or a connection that closed meanwhile; the library's
        refusal is reported to on_send_error and counted in send_errors instead, and
        the frame is dropped. See the README, "Batches and send()"."""
        if self._batches:
            p = self._batches.get(_get_ident())
            if p is not None:
                if type(data) is not bytes:
                    data = bytes(data)
                n = len(data)
                if n < self._limit and conn in self._live:
                    out = p.out
                    out += _SEND_HEADER(conn, n)
                    out += data
                    if len(out) >= _FLUSH_BYTES:
                        self._flush(p)
                    return
                if p.out:
                    self._flush(p)  # what this thread sent before leaves first
        self._send_now(conn, data if type(data) is bytes else bytes(data))

    def _send_now(self, conn: int, data: bytes) -> None:
        ptr = self._enter()
        try:
            rc = self._f_send(ptr, conn, data, len(data))
            if rc:
                raise error_for(rc, _last_error())
        finally:
            self._h.exit()  # type: ignore[union-attr]

    def send_many(self, frames: Iterable[Tuple[int, Buffer]]) -> None:
        """Queue many frames, for any connections, in order: `frames` is an iterable of
        (conn, data) pairs, e.g. the batch given to on_messages. One library call for
        all of them. A frame the library refuses (FullError, NoConnError,
        TooLargeError...) never stops the others and is never raised: it is dropped,
        counted in send_errors and passed to on_send_error. Raises StoppedError (nothing
        queued) when called outside a batch on a stopped server. Inside a batch the
        frames are collected like send()'s."""
        items = frames if isinstance(frames, list) else list(frames)
        if not items:
            return
        p = self._batches.get(_get_ident()) if self._batches else None
        if p is None:
            if self._h is None or self._h.gone or self._stopped:
                raise StoppedError(C.TF_ERR_STOPPED, "server is stopped")
            p = _Pending(_get_ident())
            self._collect_many(p, items)
            self._flush(p, raise_stopped=True)
            return
        self._collect_many(p, items)
        if len(p.out) >= _FLUSH_BYTES:
            self._flush(p)

    def _collect_many(self, p: _Pending, items: List[Tuple[int, Buffer]]) -> None:
        conns, datas = zip(*items)  # ValueError/TypeError for items that are not pairs
        live, limit = self._live, self._limit
        if (all(map(bytes.__instancecheck__, datas)) and max(map(len, datas)) < limit
                and live.issuperset(conns)):
            p.out += b"".join(chain.from_iterable(zip(map(_SEND_HEADER, conns, map(len, datas)), datas)))
            return
        out = p.out
        for conn, data in zip(conns, datas):
            data = data if type(data) is bytes else bytes(data)
            if len(data) < limit and conn in live:
                out += _SEND_HEADER(conn, len(data))
                out += data
                continue
            # Sent at once (keeping the order), refusals reported like the others.
            self._flush(p)
            try:
                self._send_now(conn, data)
            except TfError as exc:
                self._refused(conn, data, exc)

    def close(self, conn: int) -> None:
        """Stop reading from `conn`, write what is queued for it, then close it
        (on_close / CLOSE event with CloseReason.LOCAL follows). Any thread.
        A peer that has not read it all within close_timeout_ms (default 10 s) is
        reset, still as LOCAL. Raises NoConnError for an unknown or closed id, or one
        already closing for another reason (too large, idle, I/O error, overload, peer
        gone: its on_close / CLOSE event carries that reason); StoppedError once stopping.
        Frames this thread collected in the current batch are sent first. Inside an
        on_message batch, the connection's remaining frames of that batch are skipped."""
        self._flush_mine()
        self._call("tf_conn_close", conn)
        self._closed_here(conn)

    def abort(self, conn: int) -> None:
        """Close `conn` now: what is queued for it is discarded and the socket is reset
        (the peer sees a connection reset); on_close / CLOSE event with
        CloseReason.LOCAL follows. Also allowed after close(), to give up on a peer
        that does not read. Any thread. Raises NoConnError for an unknown id, one whose
        on_close ran (or whose CLOSE event was produced), or one closing for a reason
        of its own; StoppedError once stopping."""
        self._flush_mine()
        self._call("tf_conn_abort", conn)
        self._closed_here(conn)

    def _closed_here(self, conn: int) -> None:
        self._live.discard(conn)
        self._closing.add(conn)

    def _gone(self, conn: int) -> None:
        self._live.discard(conn)
        self._closing.discard(conn)

    def stats(self) -> Stats:
        """A snapshot of the library's counters (frames this thread collected in the
        current batch are sent first, so they are counted). Any thread; also after
        stop() (the final counters)."""
        self._flush_mine()
        out = _lib.TfStats()
        self._call("tf_server_stats", ctypes.byref(out))
        return Stats(**{name: getattr(out, name) for name in _lib.STATS_FIELDS})

    # -- reach and per-connection control (API.md "Second set of additions") --

    def connect(self, address: Address) -> int:
        """Start an outbound connection and return its id at once. `address`: "ip:port",
        "[ipv6]:port", (host, port), "unix:/path" or "unix:@name" (host names are not
        resolved: InvalidError). Any thread, callbacks included; works on a server whose
        address is "none" and after drain().

        Once established it is like an accepted connection: on_connect(conn, peer) runs
        (peer is the address as connected to; its return value is ignored) or a CONNECT
        event comes, then its frames, then exactly one on_close / CLOSE. If it cannot be
        established (refused, unreachable, missing Unix path, no answer within
        connect_timeout_ms) on_close / CLOSE comes with CloseReason.CONNECT_FAILED and
        on_connect never runs. Frames sent before it is established are queued and
        written once it is (dropped if it fails); close() before then abandons it (LOCAL).
        Raises FullError when max_connections is reached, StoppedError once stopping."""
        addr = _format_address(address).encode("utf-8")
        out = _lib.tf_conn_id(0)
        self._call("tf_connect", addr, ctypes.byref(out))
        return int(out.value)

    def drain(self) -> None:
        """Close the listener now (a Unix socket's file is removed): new connection
        attempts are refused, a load balancer's health check marks the instance down,
        and another server (this process or a new one) can bind the same address as soon
        as this returns. Every open connection goes on being served normally, and
        connect() still works. For rolling restarts: drain(), wait until
        stats().connections_active is 0 (or a deadline), stop(). Idempotent; any thread,
        callbacks included (then the listener closes when the callback returns).
        StoppedError once stopping."""
        self._call("tf_server_drain")

    def pause(self, conn: int) -> None:
        """Stop reading from `conn` (the peer is slowed by TCP); writing to it goes on,
        and its idle timeout does not run. From another thread it takes effect within one
        loop iteration. Inside an on_message / on_messages callback it applies to the
        batches after the current one: frames of `conn` already in the batch being
        delivered are still delivered (the package receives frames a batch at a time),
        none come in later batches until resume(). A peer that leaves meanwhile may be
        noticed only at resume() or stop(). Idempotent (no nesting count). Any thread.
        Raises NoConnError for an unknown or closed id, StoppedError once stopping."""
        self._call("tf_conn_pause", conn)

    def resume(self, conn: int) -> None:
        """End a pause(): what the library held back is delivered first, in order, on
        the connection's loop thread (or as events), then `conn` is read again.
        Idempotent. Any thread. Raises like pause()."""
        self._call("tf_conn_resume", conn)

    def sendv(self, conn: int, parts: Iterable[Buffer]) -> None:
        """Queue ONE frame whose payload is `parts` joined (a header and a body kept
        apart, say), without joining them in Python: the library copies the pieces once.
        No parts is an empty frame. Same rules and exceptions as send() outside a batch
        (NoConnError, TooLargeError for the joined length, FullError, StoppedError). It
        is never collected: inside a batch, what this thread collected is sent first (so
        the order holds) and the frame is queued at once. Any thread."""
        pieces = parts if isinstance(parts, list) else list(parts)
        iov = (_lib.TfIovec * max(1, len(pieces)))()
        keep: List[Any] = []  # the buffers whose addresses iov holds, alive for the call
        for i, part in enumerate(pieces):
            if type(part) is not bytes:
                view = memoryview(part)
                if view.readonly or not view.c_contiguous or not view.nbytes:
                    part = view.tobytes()
                else:  # a writable buffer (bytearray...): passed in place, no copy
                    arr = (ctypes.c_char * view.nbytes).from_buffer(view)
                    keep.append(arr)
                    iov[i].base = ctypes.addressof(arr)
                    iov[i].len = view.nbytes
                    continue
            if part:
                ref = ctypes.c_char_p(part)
                keep.append(ref)
                iov[i].base = ctypes.cast(ref, ctypes.c_void_p).value
            iov[i].len = len(part)
        self._flush_mine()
        self._call("tf_sendv", conn, iov, len(pieces))
        del keep

    def broadcast(self, conns: Iterable[int], data: Buffer) -> int:
        """Queue the same frame for every connection in `conns` (fan-out; an id listed
        twice gets it twice) in one library call; the payload is copied once and shared.
        Returns how many entries took it: connections unknown, closed or full are
        skipped, not raised (a full one gets on_writable / a WRITABLE event later, as
        after a FullError). Raises TooLargeError and StoppedError like send(). Never
        collected: inside a batch, what this thread collected is sent first. Any thread.
        (send_many() is the other way round: different frames, one call.)"""
        ids = conns if isinstance(conns, list) else list(conns)
        arr = (_lib.tf_conn_id * len(ids))(*ids)
        payload = data if type(data) is bytes else bytes(data)
        queued = ctypes.c_size_t(0)
        self._flush_mine()
        self._call("tf_send_many", arr, len(ids), payload, len(payload), ctypes.byref(queued))
        return int(queued.value)

    def info(self, conn: int) -> ConnInfo:
        """What the library knows about one open connection: peer, counters, queued
        output, age, outbound, paused, loop thread (frames this thread collected in the
        current batch are sent first, so queued_output counts them). Any thread,
        callbacks included. Raises NoConnError for an unknown or closed id (one closing
        by close() still answers while its output is written, until its on_close)."""
        self._flush_mine()
        out = _lib.TfConnInfo()
        self._call("tf_conn_get_info", conn, ctypes.byref(out))
        return ConnInfo(peer=out.peer.decode("utf-8", "replace"), bytes_received=out.bytes_received,
                        bytes_sent=out.bytes_sent, frames_received=out.frames_received,
                        frames_sent=out.frames_sent, queued_output=out.queued_output,
                        age_ms=out.age_ms, outbound=bool(out.outbound), paused=bool(out.paused),
                        thread=out.thread)

    def set_user_data(self, conn: int, obj: object) -> None:
        """Attach any Python object to `conn` (None clears it); user_data(conn) returns
        it. The package keeps the reference (the library only stores a marker) and drops
        it once the connection has ended: after on_close(conn) has returned (so on_close
        can still read it), when on_connect refuses the connection (returns a false
        value or raises), or, in pull mode, at the poll after the one that returned its
        CLOSE event. Any thread, on_connect included. Raises NoConnError for an unknown
        id or one that has ended (also when it ends while this call runs), StoppedError
        once the server is freed."""
        self._call("tf_conn_set_user_data", conn, None if obj is None else 1)
        with self._udata_lock:
            if conn in self._udata_recent:  # it ended while we were in the library
                raise error_for(C.TF_ERR_NO_CONN, f"connection {conn} has closed")
            if obj is None:
                self._udata.pop(conn, None)
            else:
                self._udata[conn] = obj

    def user_data(self, conn: int, default: Any = None) -> Any:
        """The object set_user_data() attached to `conn`, else `default` (also for an
        unknown or ended connection). Any thread; a dict lookup, no library call."""
        return self._udata.get(conn, default)

    def _udata_release(self, conn: int) -> None:
        """`conn` has ended: drop its user data, and refuse a set_user_data racing with it."""
        with self._udata_lock:
            self._udata.pop(conn, None)
            recent = self._udata_recent
            recent[conn] = None
            if len(recent) > _UDATA_RECENT:
                recent.popitem(last=False)

    def _udata_hooks(self, on_connect: Optional[OnConnect],
                     on_close: Optional[OnClose]) -> Tuple[Optional[OnConnect], OnClose]:
        """on_connect / on_close wrapped to release user data (callback mode). They run
        where the wrapped callbacks run: on the connection's loop thread."""
        release = self._udata_release

        def close_hook(conn: int, reason: CloseReason) -> None:
            try:
                if on_close is not None:
                    on_close(conn, reason)
            finally:
                release(conn)
        if on_connect is None:
            return None, close_hook
        user_on_connect = on_connect

        def connect_hook(conn: int, peer: str) -> object:
            try:
                verdict = user_on_connect(conn, peer)
            except BaseException:
                if not self._is_outbound(conn):
                    release(conn)  # refused: no on_close follows
                raise
            if verdict is not None and not verdict and not self._is_outbound(conn):
                release(conn)  # refused: no on_close follows
            return verdict
        return connect_hook, close_hook

    def _is_outbound(self, conn: int) -> bool:
        out = _lib.TfConnInfo()
        try:
            self._call("tf_conn_get_info", conn, ctypes.byref(out))
        except TfError:
            return False
        return bool(out.outbound)

    def stop(self, drain_ms: int = 1000) -> None:
        """Stop accepting, give queued output up to drain_ms to leave, close every
        connection, join the loop thread. Idempotent; a no-op once freed.
        From inside a callback it raises InvalidError (the library refuses to deadlock)."""
        drain_ms = _uint("drain_ms", drain_ms, _U32_MAX)
        if self._h is None or self._h.gone:
            return
        self._flush_mine()
        self._call("tf_server_stop", drain_ms)
        self._stopped = True
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        self._after_stop()

    def _after_stop(self) -> None:
        pass

    def free(self) -> None:
        """Stop (drain 0) if still running, then release the library's memory and the
        Python callbacks. Idempotent. Not from inside a callback (InvalidError)."""
        if self._h is None or self._h.gone:
            return
        if not self._stopped:
            self.stop(0)
        ptr = self._h.retire()
        if ptr is not None:
            _lib.func("tf_server_free")(ptr)
        # tf_server_stop has returned: the loop thread is gone, the callbacks may go.
        self._keep.clear()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.free()

    def __del__(self) -> None:
        # Only reachable for stopped servers (running ones sit in _RUNNING).
        try:
            h = self._h
            if h is not None and not h.gone:
                self.free()
        except BaseException:  # noqa: BLE001 - never raise from __del__
            pass

    def __repr__(self) -> str:
        state = "running" if self.running else ("freed" if self._h is None or self._h.gone else "stopped")
        return f"<tcpframe.{type(self).__name__} {self._address} port={self._port} {state}>"


class Server(_ServerBase):
    """A tcpframe server whose callbacks run on the library's loop thread.

    on_message(conn: int, data: bytes)        one call per inbound frame (give this...)
    on_messages(batch: list[(conn, data)])    ...or this: one call per batch of frames
    on_connect(conn: int, peer: str) -> bool  optional; a false value refuses the
                                              connection (None accepts, so a hook that only
                                              logs need not return anything)
    on_close(conn: int, reason: CloseReason)  optional; exactly once per accepted connection
    on_error(exc, callback_name, conn)        optional; receives exceptions raised by the
                                              callbacks above (default: sys.unraisablehook)
    on_send_error(conn, data, exc)            optional; a frame collected during a batch
                                              that the library refused when the batch was
                                              sent (FullError, NoConnError...): dropped
    on_writable(conn: int)                    optional; once after a send*() to conn met a
                                              full queue (FullError, or skipped by
                                              broadcast()), when its queued output has
                                              fallen to half of max_queued_output

    Threads: every callback above runs on the library's loop thread (one at a time,
    holding the GIL, which ctypes takes), except on_send_error for frames sent with
    send_many()/batch() from another thread, which runs on that thread. While a
    callback runs, the server does no I/O. An exception escaping a callback is reported
    and the loop goes on; one escaping on_connect refuses that connection.

    Frames arrive in batches (one ctypes crossing per loop pass, up to 4096 frames or
    1 MiB); on_message is called for each frame of a batch in order. send() calls made
    on the loop thread during a batch are collected and leave in one library call when
    the batch is done (defer_sends=False turns that off). See the README.

    Configuration: address "host:port" or (host, port) (port 0 picks one, see .port),
    max_connections, max_frame, idle_timeout_ms, max_queued_output, close_timeout_ms (how
    long close() waits for queued output before a reset), max_buffered (budget for partial
    inbound frames of all connections together; over it, the connection holding the most
    is closed with CloseReason.OVERLOAD) (None: library default), backend "auto" / "poll" /
    "epoll", log: a logging.Logger or callable(level, message).
    Reach and control (see the README): address also "unix:/path", "unix:@name", "fd:N",
    "none"; prefix=width or (width, TF_PREFIX_* flags); unix_mode (e.g. 0o660);
    connect_timeout_ms (for connect()); threads=n loop threads (0: one per CPU; with
    n > 1 the callbacks of connections on different loop threads run at the same time,
    each on its own thread, taking turns for the GIL: lock what they share);
    proxy_protocol "off" / "v1" / "v2" / "any"; max_connections_per_ip;
    slow_consumer=(soft_bytes, seconds).
    The server starts in the constructor; use it as a context manager or call stop()/free().
    """

    def __init__(
        self,
        address: Address = "127.0.0.1:0",
        *,
        on_message: Optional[OnMessage] = _UNSET,
        on_messages: Optional[OnMessages] = None,
        on_connect: Optional[OnConnect] = None,
        on_close: Optional[OnClose] = None,
        on_error: Optional[OnError] = None,
        on_send_error: Optional[OnSendError] = None,
        defer_sends: bool = True,
        max_connections: Optional[int] = None,
        max_frame: Optional[int] = None,
        idle_timeout_ms: Optional[int] = None,
        max_queued_output: Optional[int] = None,
        close_timeout_ms: Optional[int] = None,
        max_buffered: Optional[int] = None,
        backend: Union[None, str, int] = None,
        log: Optional[Log] = None,
        on_writable: Optional[OnWritable] = None,
        prefix: Optional[Prefix] = None,
        threads: Optional[int] = None,
        unix_mode: Optional[int] = None,
        connect_timeout_ms: Optional[int] = None,
        proxy_protocol: Union[None, str, int] = None,
        max_connections_per_ip: Optional[int] = None,
        slow_consumer: Optional[Tuple[int, int]] = None,
    ):
        if on_message is _UNSET:
            if on_messages is None:  # like a missing required argument
                raise TypeError("Server() needs the keyword argument on_message (or on_messages)")
            on_message = None
        if (on_message is None) == (on_messages is None):
            raise InvalidError(C.TF_ERR_INVALID, "give exactly one of on_message and on_messages")
        if not callable(on_message if on_message is not None else on_messages):
            raise InvalidError(C.TF_ERR_INVALID,
                               ("on_message" if on_message is not None else "on_messages") + " must be callable")
        for name, cb in (("on_connect", on_connect), ("on_close", on_close), ("on_writable", on_writable)):
            _check_callable(name, cb)
        super().__init__(address, max_connections=max_connections, max_frame=max_frame,
                         idle_timeout_ms=idle_timeout_ms, max_queued_output=max_queued_output,
                         close_timeout_ms=close_timeout_ms, max_buffered=max_buffered,
                         backend=backend, log=log, on_error=on_error,
                         on_send_error=on_send_error, defer_sends=defer_sends,
                         prefix=prefix, threads=threads, unix_mode=unix_mode,
                         connect_timeout_ms=connect_timeout_ms, proxy_protocol=proxy_protocol,
                         max_connections_per_ip=max_connections_per_ip, slow_consumer=slow_consumer)
        if on_writable is not None:
            wfn = self._keep_fn(_lib.ON_WRITABLE(self._writable_thunk(on_writable)))

            def set_on_writable(cfg: int) -> None:
                _check(_lib.func("tf_config_set_on_writable")(cfg, wfn))
            self._setup.append(set_on_writable)
        # set_user_data(): objects are released after on_close / a refusing on_connect.
        on_connect, on_close = self._udata_hooks(on_connect, on_close)
        cbs = _lib.TfCallbacks()
        batched = _lib.has("tf_config_set_on_messages") and _lib.has("tf_events_pack")
        extra: Optional[Callable[[int], None]] = None
        if batched:
            fn = self._keep_fn(_lib.ON_MESSAGES(self._messages_thunk(on_message, on_messages)))

            def extra(cfg: int) -> None:
                _check(_lib.func("tf_config_set_on_messages")(cfg, fn))
        else:  # an older library: one crossing per frame, sends at once
            self._defer = False
            cbs.on_message = self._keep_fn(_lib.ON_MESSAGE(self._message_thunk(on_message, on_messages)))
        # on_connect / on_close are always ours: they keep the set of open connections
        # that collected sends may go to.
        cbs.on_connect = self._keep_fn(_lib.ON_CONNECT(self._connect_thunk(on_connect)))
        cbs.on_close = self._keep_fn(_lib.ON_CLOSE(self._close_thunk(on_close)))
        # tf_server_start copies *cbs; the function objects stay in self._keep.
        self._start(lambda cfg, out: int(_lib.func("tf_server_start")(cfg, ctypes.byref(cbs), out)), extra)

    def _keep_fn(self, fn: Any) -> Any:
        self._keep.append(fn)
        return fn

    def _writable_thunk(self, on_writable: OnWritable) -> Callable[[Any, int], None]:
        report = self._report

        def c_on_writable(_ud: Any, conn: int) -> None:
            # The loop thread of `conn`, GIL held (ctypes takes it); never raises into C.
            try:
                _pin_thread_state()
                on_writable(conn)
            except BaseException as exc:  # noqa: BLE001
                report("on_writable", conn, exc)
        return c_on_writable

    # Thunks run on the loop thread with the GIL held (ctypes takes it). They catch
    # everything: an exception must never reach the C caller.

    def _messages_thunk(self, on_message: Optional[OnMessage],
                        on_messages: Optional[OnMessages]) -> Callable[[Any, int, int], None]:
        report = self._report
        closing = self._closing
        open_batch, close_batch = self._open_batch, self._close_batch

        packers: Dict[int, _PackBuffer] = {}  # one per loop thread; freed with the server

        def c_on_messages(_ud: Any, events: int, count: int) -> None:
            try:
                _pin_thread_state()
                tid = _get_ident()
                packer = packers.get(tid)
                if packer is None:
                    packer = packers[tid] = _PackBuffer()
                # One copy of the whole batch now: the library's pointers die when we
                # return. Each payload is then sliced out of it as its own bytes.
                raw = packer.pack(events, count)
            except BaseException as exc:  # noqa: BLE001 - never let it reach C
                report("on_messages" if on_messages is not None else "on_message", 0, exc)
                return
            p = None
            if self._defer:
                p = open_batch()
                p.on_loop = True
            off = 0
            unpack = _EVENT_HEADER
            try:
                if on_messages is not None:
                    batch: List[Message] = []
                    append = batch.append
                    for _ in range(count):
                        _kind, _reason, conn, n = unpack(raw, off)
                        off += _EH
                        end = off + n
                        append((conn, raw[off:end]))
                        off = end
                    try:
                        on_messages(batch)
                    except BaseException as exc:  # noqa: BLE001
                        report("on_messages", 0, exc)
                else:
                    assert on_message is not None
                    for _ in range(count):
                        _kind, _reason, conn, n = unpack(raw, off)
                        off += _EH
                        end = off + n
                        data = raw[off:end]
                        off = end
                        if closing and conn in closing:
                            continue  # closed by us earlier in this batch
                        try:
                            on_message(conn, data)
                        except BaseException as exc:  # noqa: BLE001
                            report("on_message", conn, exc)
            except BaseException as exc:  # noqa: BLE001
                report("on_message", 0, exc)
            finally:
                if p is not None:
                    try:
                        close_batch(p)
                    except BaseException as exc:  # noqa: BLE001
                        report("on_message", 0, exc)
                    finally:
                        p.on_loop = False
        return c_on_messages

    def _message_thunk(self, on_message: Optional[OnMessage],
                       on_messages: Optional[OnMessages]) -> Callable[[Any, int, Optional[int], int], None]:
        report, string_at = self._report, ctypes.string_at

        def c_on_message(_ud: Any, conn: int, data: Optional[int], length: int) -> None:
            try:
                payload = string_at(data, length) if length and data else b""
                if on_messages is not None:
                    on_messages([(conn, payload)])
                else:
                    assert on_message is not None
                    on_message(conn, payload)
            except BaseException as exc:  # noqa: BLE001 - never let it reach C
                report("on_message" if on_message is not None else "on_messages", conn, exc)
        return c_on_message

    def _connect_thunk(self, on_connect: Optional[OnConnect]) -> Callable[[Any, int, Optional[bytes]], int]:
        report, live, is_outbound = self._report, self._live, self._is_outbound

        def c_on_connect(_ud: Any, conn: int, peer: Optional[bytes]) -> int:
            try:
                _pin_thread_state()
            except BaseException:  # noqa: BLE001 - only an optimization
                pass
            if on_connect is not None:
                try:
                    verdict = on_connect(conn, peer.decode("utf-8", "replace") if peer else "")
                except BaseException as exc:  # noqa: BLE001
                    report("on_connect", conn, exc)
                    verdict = False  # an on_connect that fails refuses
                # The library ignores the verdict for an outbound connection
                # (tf_connect): it stays open, so it is live here too.
                if verdict is not None and not verdict and not is_outbound(conn):
                    return 1
            live.add(conn)
            return 0
        return c_on_connect

    def _close_thunk(self, on_close: Optional[OnClose]) -> Callable[[Any, int, int], None]:
        report, gone = self._report, self._gone

        def c_on_close(_ud: Any, conn: int, reason: int) -> None:
            gone(conn)
            if on_close is None:
                return
            try:
                on_close(conn, _REASONS.get(reason, reason))  # type: ignore[arg-type]
            except BaseException as exc:  # noqa: BLE001
                report("on_close", conn, exc)
        return c_on_close


class PullServer(_ServerBase):
    """A tcpframe server in pull mode: no callback runs on a foreign thread; the host
    takes events with poll(), events() or, under asyncio, `async for ev in aevents()`.

    Events of one connection arrive CONNECT, MESSAGE..., CLOSE. `fd` is readable
    (level-triggered) while events wait. Poll from one thread (or one asyncio task) at a
    time; calls are serialized by a lock, and poll(timeout_ms=0) never waits for it: while
    another thread is inside poll() it returns [] at once, as tf_server_poll does. Same
    configuration keywords as Server (plus on_error, on_send_error, defer_sends); `log`
    may run on the library's thread; on_send_error runs on the thread that sends the
    collected frames (the one iterating events()/aevents(), or leaving a batch()).

    While a thread iterates events() (or an asyncio task aevents()), the send() calls it
    makes between two polls are collected and leave in one library call before the next
    poll (see the README, "Batches and send()"). poll() itself does not collect: wrap a
    poll loop's body in `with server.batch():` for that.

    writable_events=True asks for EventKind.WRITABLE events: one after a send*() to a
    connection met a full queue (FullError, or skipped by broadcast()), once its queued
    output has fallen to half of max_queued_output (the pull-mode on_writable).
    """

    def __init__(self, address: Address = "127.0.0.1:0", *, writable_events: bool = False, **config: Any):
        super().__init__(address, **config)
        if writable_events:
            # In pull mode a non-NULL on_writable only turns the WRITABLE events on; the
            # library never calls it.
            noop = _lib.ON_WRITABLE(lambda _ud, _conn: None)
            self._keep.append(noop)

            def set_writable_events(cfg: int) -> None:
                _check(_lib.func("tf_config_set_on_writable")(cfg, noop))
            self._setup.append(set_writable_events)
        self._poll_lock = threading.Lock()
        self._array: Optional[ctypes.Array[_lib.TfEvent]] = None
        self._array_addr = 0
        self._packer: Optional[_PackBuffer] = None
        self._fd: Optional[int] = None
        self._waiters: "set[Tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]" = set()
        self._waiters_lock = threading.Lock()
        self._start(lambda cfg, out: int(_lib.func("tf_server_start_pull")(cfg, out)))

    @property
    def fd(self) -> int:
        """A descriptor readable while events wait (level-triggered). Owned by the
        library: never close it; it is invalid after free()."""
        if self._fd is None:
            ptr = self._enter()
            try:
                fd: int = _lib.func("tf_server_fd")(ptr)
                if fd < 0:
                    raise TfError(C.TF_ERR_INVALID, _last_error() or "tf_server_fd returned -1")
            finally:
                self._h.exit()  # type: ignore[union-attr]
            self._fd = fd
        return self._fd

    # Long waits are cut into slices so that Ctrl-C (handled between slices on the main
    # thread) and free() from another thread never wait on a forever-blocked poll.
    _SLICE_MS = 250

    def poll(self, max: int = 64, timeout_ms: int = 0) -> List[Event]:  # noqa: A002 - API name
        """Up to `max` events, waiting up to timeout_ms (0: no wait, -1: until one comes).
        The GIL is released while waiting. Payloads are copied out at once (the library's
        pointers die at the next poll), with one library call for the whole batch. With
        timeout_ms=0 it never waits, not even for another thread's poll in progress: it
        then returns [] (like tf_server_poll). Frames this thread collected (batch())
        are sent first. Raises StoppedError once stopped and drained."""
        max = _uint("max", max, 1 << 20, 1)  # noqa: A001
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or not -1 <= timeout_ms <= _I32_MAX:
            raise InvalidError(C.TF_ERR_INVALID, f"timeout_ms must be -1 or an int >= 0, not {timeout_ms!r}")
        self._flush_mine()
        if timeout_ms == -1:
            while True:
                batch = self._poll_once(max, self._SLICE_MS)
                if batch:
                    return batch
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            batch = self._poll_once(max, min(timeout_ms, self._SLICE_MS), wait_turn=timeout_ms != 0)
            if batch or timeout_ms == 0:
                return batch
            timeout_ms = int((deadline - time.monotonic()) * 1000.0 + 0.999)
            if timeout_ms <= 0:
                return batch

    def _poll_once(self, max: int, timeout_ms: int, wait_turn: bool = True) -> List[Event]:  # noqa: A002
        # The lock keeps one tf_server_poll (and the copy of its data) at a time: another
        # thread's poll would invalidate the pointers we are copying from.
        if not self._poll_lock.acquire(blocking=wait_turn):
            return []  # another thread is polling; timeout 0 means no wait at all
        try:
            if self._array is None or len(self._array) < max:
                self._array = (_lib.TfEvent * max)()
                self._array_addr = ctypes.addressof(self._array)
            count = ctypes.c_size_t(0)
            ptr = self._enter()
            try:
                rc = _lib.func("tf_server_poll")(ptr, self._array, max, ctypes.byref(count), timeout_ms)
                if self._udata_dead:  # CLOSEd before this poll: the library forgot them now
                    self._release_dead()
                if rc:
                    raise error_for(rc, _last_error())
                n = min(count.value, max)
                if not n:
                    return []
                # Copy now: the library's data pointers die at the next tf_server_poll.
                if self._packer is None:
                    if not _lib.has("tf_events_pack"):  # an older library: field by field
                        return [self._copy(self._array[i]) for i in range(n)]
                    self._packer = _PackBuffer()
                raw = self._packer.pack(self._array_addr, n)
            finally:
                self._h.exit()  # type: ignore[union-attr]
        finally:
            self._poll_lock.release()
        return self._parse(raw, n)

    def _copy(self, ev: _lib.TfEvent) -> Event:
        raw = ctypes.string_at(ev.data, ev.len) if ev.len and ev.data else b""
        return self._parse(_EVENT_HEADER_PACK(ev.kind, ev.reason, ev.conn, len(raw)) + raw, 1)[0]

    def _release_dead(self) -> None:
        dead = self._udata_dead
        while dead:  # a deque: a CLOSE parsed meanwhile by another thread is never lost
            self._udata_release(dead.popleft())

    def _parse(self, raw: bytes, count: int) -> List[Event]:
        out: List[Event] = []
        append = out.append
        off = 0
        unpack = _EVENT_HEADER
        for _ in range(count):
            kind, reason, conn, n = unpack(raw, off)
            off += _EH
            if kind == C.TF_EVENT_MESSAGE:
                # The frozen dataclass built without its __init__ (five object.__setattr__
                # calls): fields left out of __dict__ read as their class-level defaults
                # (reason None, peer None), so ==, repr, hash and asdict see the same Event.
                ev: Event = _new(Event)
                _set(ev, "__dict__", {"kind": _MESSAGE, "conn": conn, "data": raw[off:off + n]})
            elif kind == C.TF_EVENT_CONNECT:
                self._live.add(conn)
                ev = Event(EventKind.CONNECT, conn, peer=raw[off:off + n].decode("utf-8", "replace"))
            elif kind == C.TF_EVENT_CLOSE:
                self._gone(conn)
                self._udata_dead.append(conn)  # user data readable until the next poll
                ev = Event(EventKind.CLOSE, conn, reason=_REASONS.get(reason, reason))
            elif kind == C.TF_EVENT_WRITABLE:
                ev = Event(EventKind.WRITABLE, conn)
            else:
                ev = Event(_KINDS.get(kind, kind), conn, reason=reason, data=raw[off:off + n])
            off += n
            append(ev)
        return out

    def events(self, timeout_ms: int = -1, max: int = 1024) -> Iterator[Event]:  # noqa: A002
        """Yield events as they come. Ends when a wait of timeout_ms passes with no event
        (never, for -1), or once the server is stopped and its last events were yielded.
        The send() calls the iterating thread makes meanwhile are collected per batch
        of events and leave together before the next poll (or when the iteration ends)."""
        max = _uint("max", max, 1 << 20, 1)  # noqa: A001
        while True:
            stopped = self._stopped
            try:
                # Once stopped, drain: wait for our turn rather than take another
                # thread's poll in progress for "no events left".
                batch = self._poll_once(max, 0) if stopped else self.poll(max, timeout_ms)
            except StoppedError:
                return
            if batch:
                if self._defer:
                    p = self._open_batch()
                    try:
                        yield from batch
                    finally:
                        self._close_batch(p)
                else:
                    yield from batch
            elif stopped or timeout_ms >= 0:
                return

    def __iter__(self) -> Iterator[Event]:
        return self.events(-1)

    async def aevents(self, max: int = 1024) -> AsyncIterator[Event]:  # noqa: A002
        """`async for ev in server.aevents()`: waits with loop.add_reader(server.fd) and
        never blocks the event loop. Ends once the server is stopped and drained.
        One consumer at a time (add_reader keeps one callback per fd). The send() calls
        made on the loop's thread while a batch of events is handed out are collected
        and leave together at the end of the batch, or as soon as the consumer awaits
        something that lets the loop run (like transport.write, nothing waits for long)."""
        max = _uint("max", max, 1 << 20, 1)  # noqa: A001
        loop = asyncio.get_running_loop()
        fd = self.fd
        while True:
            stopped = self._stopped
            try:
                self._flush_mine()
                batch = self._poll_once(max, 0)
            except StoppedError:
                return
            if batch:
                if self._defer:
                    open_batch: List[Optional[_Pending]] = [self._open_batch()]

                    def end_now() -> None:
                        q, open_batch[0] = open_batch[0], None
                        if q is not None:
                            self._end_batch_now(q)
                    # If the consumer awaits mid-batch, the loop runs end_now: what was
                    # collected leaves, and sends go out at once for the rest of the batch.
                    handle = loop.call_soon(end_now)
                    try:
                        for ev in batch:
                            yield ev
                    finally:
                        handle.cancel()
                        q, open_batch[0] = open_batch[0], None
                        if q is not None:
                            self._close_batch(q)
                else:
                    for ev in batch:
                        yield ev
                # Let other tasks run between batches, even under a steady stream.
                await asyncio.sleep(0)
                continue
            if stopped:
                return
            fut: asyncio.Future[None] = loop.create_future()

            def ready(fut: "asyncio.Future[None]" = fut) -> None:
                if not fut.done():
                    fut.set_result(None)
            entry = (loop, fut)
            with self._waiters_lock:
                self._waiters.add(entry)
            loop.add_reader(fd, ready)
            try:
                if self._stopped:  # stop() ran between our poll and add_reader
                    continue
                await fut
            finally:
                loop.remove_reader(fd)
                with self._waiters_lock:
                    self._waiters.discard(entry)

    def _after_stop(self) -> None:
        # Wake every aevents() waiter so it drains and ends instead of waiting forever.
        with self._waiters_lock:
            waiters = list(self._waiters)
        current: Optional[asyncio.AbstractEventLoop]
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, fut in waiters:
            if loop is current:
                # Same loop: unregister now, before free() can close the fd (and the
                # number be reused) ahead of the waiter's own clean-up.
                loop.remove_reader(self.fd)
                if not fut.done():
                    fut.set_result(None)
                continue
            try:
                loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))  # type: ignore[misc]
            except RuntimeError:  # that loop is closed
                pass
