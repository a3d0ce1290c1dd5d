"""Server (callbacks on the library's loop thread) and PullServer (events polled by the host).

Both own one tf_server*; the ctypes callback objects live as long as the server object,
and a running server is kept alive by a module registry until it is stopped.
"""
from __future__ import annotations

import asyncio
import atexit
import ctypes
import dataclasses
import logging
import threading
import time
import warnings
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Tuple, Union

from . import _lib
from . import constants as C
from .constants import Backend, CloseReason, EventKind, LogLevel, _enum_or_int
from .errors import InvalidError, StoppedError, TfError, error_for

__all__ = ["Server", "PullServer", "Stats", "Event", "library_version"]

Address = Union[str, Tuple[str, int]]
_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
_I32_MAX = 2**31 - 1


def _last_error() -> str:
    raw = _lib.func("tf_last_error")()
    return raw.decode("utf-8", "replace") if raw else ""


def _check(rc: int) -> None:
    # Called right after the C call, on the same thread: tf_last_error() is thread-local.
    if rc != C.TF_OK:
        raise error_for(rc, _last_error())


def library_version() -> str:
    """tf_version() of the loaded library, e.g. "0.1.0"."""
    return _lib.func("tf_version")().decode("ascii", "replace")


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

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key: str) -> int:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)


@dataclasses.dataclass(frozen=True)
class Event:
    """One pull-mode event. The data is already copied: it stays valid forever.

    kind:   EventKind.CONNECT, MESSAGE or CLOSE
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

    def __init__(self, exc: BaseException, where: str):
        self.exc, self.where = exc, where

    def __call__(self) -> None:
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


# ---------------------------------------------------------------------------


class _ServerBase:
    """What Server and PullServer share: configuration, send/close/stats/stop/free."""

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
        log: Union[None, logging.Logger, Callable[[int, str], Any]] = None,
        on_error: Optional[Callable[[BaseException, str, int], Any]] = None,
    ):
        self._h: Optional[_Handle] = None
        self._keep: List[Any] = []  # ctypes callback objects: must outlive the loop thread
        self._stopped = False
        self._on_error = on_error
        self._errors = 0
        self._errors_lock = threading.Lock()
        self._address = _format_address(address)
        self._port = 0
        settings = []  # (setter name, value) applied to a fresh tf_config
        settings.append(("tf_config_set_address", self._address.encode("utf-8")))
        if max_connections is not None:
            settings.append(("tf_config_set_max_connections", _uint("max_connections", max_connections, _U32_MAX)))
        if max_frame is not None:
            settings.append(("tf_config_set_max_frame", _uint("max_frame", max_frame, _U32_MAX)))
        if idle_timeout_ms is not None:
            settings.append(("tf_config_set_idle_timeout_ms", _uint("idle_timeout_ms", idle_timeout_ms, _U32_MAX)))
        if max_queued_output is not None:
            settings.append(("tf_config_set_max_queued_output",
                             _uint("max_queued_output", max_queued_output, _U64_MAX)))
        if close_timeout_ms is not None:
            settings.append(("tf_config_set_close_timeout_ms",
                             _uint("close_timeout_ms", close_timeout_ms, _U32_MAX)))
        if max_buffered is not None:
            settings.append(("tf_config_set_max_buffered", _uint("max_buffered", max_buffered, _U64_MAX)))
        if backend is not None:
            if isinstance(backend, str):
                try:
                    backend = _BACKEND_NAMES[backend.lower()]
                except KeyError:
                    raise InvalidError(C.TF_ERR_INVALID,
                                       f"backend must be 'auto', 'poll' or 'epoll', not {backend!r}") from None
            settings.append(("tf_config_set_backend", _uint("backend", int(backend), _I32_MAX)))
        if log is not None and not callable(log) and not isinstance(log, (logging.Logger, logging.LoggerAdapter)):
            raise InvalidError(C.TF_ERR_INVALID, "log must be a logging.Logger or a callable(level, message)")
        self._settings = settings
        self._log = log

    # -- start ---------------------------------------------------------------

    def _start(self, starter: Callable[[int, Any], int]) -> None:
        cfg = _lib.func("tf_config_new")()
        if not cfg:
            raise MemoryError("tf_config_new returned NULL")
        try:
            for setter, value in self._settings:
                _check(_lib.func(setter)(cfg, value))
            if self._log is not None:
                fn = _lib.LOG_FN(self._log_thunk(self._log))
                self._keep.append(fn)
                _check(_lib.func("tf_config_set_log")(cfg, fn, None))
            out = ctypes.c_void_p()
            _check(starter(cfg, ctypes.byref(out)))
        except BaseException:
            self._keep.clear()  # nothing runs: start failed before any loop thread existed
            raise
        finally:
            _lib.func("tf_config_free")(cfg)
        self._h = _Handle(out.value)
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        self._port = _lib.func("tf_server_port")(out.value)

    def _log_thunk(self, log):
        is_logger = isinstance(log, (logging.Logger, logging.LoggerAdapter))

        def c_log(_ud, level, msg):
            try:
                text = msg.decode("utf-8", "replace") if msg else ""
                if is_logger:
                    log.log(_LOGGING_LEVELS.get(level, logging.INFO), "%s", text)
                else:
                    log(_enum_or_int(LogLevel, level), text)
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
        return self._h is not None and not self._stopped and not self._h.gone

    @property
    def callback_errors(self) -> int:
        """How many exceptions escaped Python callbacks (on_connect, on_message,
        on_close, log) of this server so far."""
        return self._errors

    def _enter(self) -> int:
        if self._h is None:
            raise StoppedError(C.TF_ERR_STOPPED, "server was never started")
        return self._h.enter()

    def _call(self, name: str, *args) -> None:
        """Calls a TF_* returning function on this server's handle, raising the
        matching exception (with the library's message) on failure."""
        ptr = self._enter()
        try:
            rc = _lib.func(name)(ptr, *args)
            if rc:
                raise error_for(rc, _last_error())
        finally:
            self._h.exit()  # type: ignore[union-attr]

    # -- calls ---------------------------------------------------------------

    def send(self, conn: int, data: Union[bytes, bytearray, memoryview]) -> None:
        """Queue one frame for `conn` (the library adds the length prefix and copies
        `data`). Any thread, including inside callbacks. Raises NoConnError,
        TooLargeError, FullError (nothing was queued) or StoppedError."""
        if type(data) is not bytes:
            data = bytes(data)
        self._call("tf_send", conn, data, len(data))

    def close(self, conn: int) -> None:
        """Stop reading from `conn`, write what is queued for it, then close it
        (on_close / CLOSE event with CloseReason.LOCAL follows). Any thread.
        A peer that has not read it all within close_timeout_ms (default 10 s) is
        reset, still as LOCAL. Raises NoConnError for an unknown or closed id, or one
        already closing for another reason (too large, idle, I/O error, overload, peer
        gone: its on_close / CLOSE event carries that reason); StoppedError once stopping."""
        self._call("tf_conn_close", conn)

    def abort(self, conn: int) -> None:
        """Close `conn` now: what is queued for it is discarded and the socket is reset
        (the peer sees a connection reset); on_close / CLOSE event with
        CloseReason.LOCAL follows. Also allowed after close(), to give up on a peer
        that does not read. Any thread. Raises NoConnError for an unknown id, one whose
        on_close ran (or whose CLOSE event was produced), or one closing for a reason
        of its own; StoppedError once stopping."""
        self._call("tf_conn_abort", conn)

    def stats(self) -> Stats:
        out = _lib.TfStats()
        self._call("tf_server_stats", ctypes.byref(out))
        return Stats(**{name: getattr(out, name) for name in _lib.STATS_FIELDS})

    def stop(self, drain_ms: int = 1000) -> None:
        """Stop accepting, give queued output up to drain_ms to leave, close every
        connection, join the loop thread. Idempotent; a no-op once freed.
        From inside a callback it raises InvalidError (the library refuses to deadlock)."""
        drain_ms = _uint("drain_ms", drain_ms, _U32_MAX)
        if self._h is None or self._h.gone:
            return
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

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
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

    on_message(conn: int, data: bytes)        required; one call per inbound frame
    on_connect(conn: int, peer: str) -> bool  optional; a false value refuses the
                                              connection (None accepts, so a hook that only
                                              logs need not return anything)
    on_close(conn: int, reason: CloseReason)  optional; exactly once per accepted connection
    on_error(exc, callback_name, conn)        optional; receives exceptions raised by the
                                              callbacks above (default: sys.unraisablehook)

    Callbacks run one at a time on the loop thread, holding the GIL (ctypes takes it);
    while one runs, the server does no I/O. An exception escaping a callback is reported
    and the loop goes on; one escaping on_connect refuses that connection.

    Configuration: address "host:port" or (host, port) (port 0 picks one, see .port),
    max_connections, max_frame, idle_timeout_ms, max_queued_output, close_timeout_ms (how
    long close() waits for queued output before a reset), max_buffered (budget for partial
    inbound frames of all connections together; over it, the connection holding the most
    is closed with CloseReason.OVERLOAD) (None: library default), backend "auto" / "poll" /
    "epoll", log: a logging.Logger or callable(level, message).
    The server starts in the constructor; use it as a context manager or call stop()/free().
    """

    def __init__(
        self,
        address: Address = "127.0.0.1:0",
        *,
        on_message: Callable[[int, bytes], Any],
        on_connect: Optional[Callable[[int, str], Any]] = None,
        on_close: Optional[Callable[[int, int], Any]] = None,
        on_error: Optional[Callable[[BaseException, str, int], Any]] = None,
        max_connections: Optional[int] = None,
        max_frame: Optional[int] = None,
        idle_timeout_ms: Optional[int] = None,
        max_queued_output: Optional[int] = None,
        close_timeout_ms: Optional[int] = None,
        max_buffered: Optional[int] = None,
        backend: Union[None, str, int] = None,
        log: Union[None, logging.Logger, Callable[[int, str], Any]] = None,
    ):
        if not callable(on_message):
            raise InvalidError(C.TF_ERR_INVALID, "on_message must be callable")
        for name, cb in (("on_connect", on_connect), ("on_close", on_close), ("on_error", on_error)):
            if cb is not None and not callable(cb):
                raise InvalidError(C.TF_ERR_INVALID, f"{name} must be callable or None")
        super().__init__(address, max_connections=max_connections, max_frame=max_frame,
                         idle_timeout_ms=idle_timeout_ms, max_queued_output=max_queued_output,
                         close_timeout_ms=close_timeout_ms, max_buffered=max_buffered,
                         backend=backend, log=log, on_error=on_error)
        cbs = _lib.TfCallbacks()
        cbs.on_message = self._keep_fn(_lib.ON_MESSAGE(self._message_thunk(on_message)))
        if on_connect is not None:
            cbs.on_connect = self._keep_fn(_lib.ON_CONNECT(self._connect_thunk(on_connect)))
        if on_close is not None:
            cbs.on_close = self._keep_fn(_lib.ON_CLOSE(self._close_thunk(on_close)))
        # tf_server_start copies *cbs; the function objects stay in self._keep.
        self._start(lambda cfg, out: _lib.func("tf_server_start")(cfg, ctypes.byref(cbs), out))

    def _keep_fn(self, fn):
        self._keep.append(fn)
        return fn

    # Thunks run on the loop thread with the GIL held (ctypes takes it). They catch
    # everything: an exception must never reach the C caller.

    def _message_thunk(self, on_message):
        report, string_at = self._report, ctypes.string_at

        def c_on_message(_ud, conn, data, length):
            try:
                on_message(conn, string_at(data, length) if length else b"")
            except BaseException as exc:  # noqa: BLE001 - never let it reach C
                report("on_message", conn, exc)
        return c_on_message

    def _connect_thunk(self, on_connect):
        report = self._report

        def c_on_connect(_ud, conn, peer):
            try:
                verdict = on_connect(conn, peer.decode("utf-8", "replace") if peer else "")
            except BaseException as exc:  # noqa: BLE001
                report("on_connect", conn, exc)
                return 1  # an on_connect that fails refuses
            return 1 if (verdict is not None and not verdict) else 0
        return c_on_connect

    def _close_thunk(self, on_close):
        report = self._report

        def c_on_close(_ud, conn, reason):
            try:
                on_close(conn, _enum_or_int(CloseReason, reason))
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
    configuration keywords as Server; `log` is the only callback and may run on the
    library's thread.
    """

    def __init__(self, address: Address = "127.0.0.1:0", **config: Any):
        super().__init__(address, **config)
        self._poll_lock = threading.Lock()
        self._array: Optional[ctypes.Array] = None
        self._fd: Optional[int] = None
        self._waiters: "set[Tuple[asyncio.AbstractEventLoop, asyncio.Future]]" = set()
        self._waiters_lock = threading.Lock()
        self._start(lambda cfg, out: _lib.func("tf_server_start_pull")(cfg, out))

    @property
    def fd(self) -> int:
        """A descriptor readable while events wait (level-triggered). Owned by the
        library: never close it; it is invalid after free()."""
        if self._fd is None:
            ptr = self._enter()
            try:
                fd = _lib.func("tf_server_fd")(ptr)
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
        pointers die at the next poll). With timeout_ms=0 it never waits, not even for
        another thread's poll in progress: it then returns [] (like tf_server_poll).
        Raises StoppedError once stopped and drained."""
        max = _uint("max", max, 1 << 20, 1)  # noqa: A001
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or not -1 <= timeout_ms <= _I32_MAX:
            raise InvalidError(C.TF_ERR_INVALID, f"timeout_ms must be -1 or an int >= 0, not {timeout_ms!r}")
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
            arr = self._array
            count = ctypes.c_size_t(0)
            ptr = self._enter()
            try:
                rc = _lib.func("tf_server_poll")(ptr, arr, max, ctypes.byref(count), timeout_ms)
                if rc:
                    raise error_for(rc, _last_error())
                # Copy now: the library's data pointers die at the next tf_server_poll.
                return [self._copy(arr[i]) for i in range(min(count.value, max))]
            finally:
                self._h.exit()  # type: ignore[union-attr]
        finally:
            self._poll_lock.release()

    @staticmethod
    def _copy(ev: "_lib.TfEvent") -> Event:
        kind = _enum_or_int(EventKind, ev.kind)
        raw = ctypes.string_at(ev.data, ev.len) if ev.len and ev.data else b""
        if kind == EventKind.MESSAGE:
            return Event(kind, ev.conn, data=raw)
        if kind == EventKind.CONNECT:
            return Event(kind, ev.conn, peer=raw.decode("utf-8", "replace"))
        if kind == EventKind.CLOSE:
            return Event(kind, ev.conn, reason=_enum_or_int(CloseReason, ev.reason))
        return Event(kind, ev.conn, reason=ev.reason, data=raw)

    def events(self, timeout_ms: int = -1, max: int = 64) -> Iterator[Event]:  # noqa: A002
        """Yield events as they come. Ends when a wait of timeout_ms passes with no event
        (never, for -1), or once the server is stopped and its last events were yielded."""
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
                yield from batch
            elif stopped or timeout_ms >= 0:
                return

    def __iter__(self) -> Iterator[Event]:
        return self.events(-1)

    async def aevents(self, max: int = 64) -> AsyncIterator[Event]:  # noqa: A002
        """`async for ev in server.aevents()`: waits with loop.add_reader(server.fd) and
        never blocks the event loop. Ends once the server is stopped and drained.
        One consumer at a time (add_reader keeps one callback per fd)."""
        max = _uint("max", max, 1 << 20, 1)  # noqa: A001
        loop = asyncio.get_running_loop()
        fd = self.fd
        while True:
            stopped = self._stopped
            try:
                batch = self._poll_once(max, 0)
            except StoppedError:
                return
            if batch:
                for ev in batch:
                    yield ev
                continue
            if stopped:
                return
            fut = loop.create_future()

            def ready(fut=fut):
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
                loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))
            except RuntimeError:  # that loop is closed
                pass
