"""Builds the C examples and C tests against the real libtcpframe and drives them.

Everything talks to 127.0.0.1 / ::1 only, every wait is bounded, and every process
a test starts is ended by the PID it got. Build output goes to build/c/ (gitignored).

    python3 -m pytest tests/c -q                    # everything, about 30 s
    python3 -m pytest tests/c -q -m "not valgrind"  # without the valgrind runs
"""

import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# TCPFRAME_LIBDIR points the tests at another build (e.g. target/debug); then no cargo build.
REL = Path(os.environ.get("TCPFRAME_LIBDIR", ROOT / "target" / "release")).resolve()
INCLUDE = ROOT / "include"
EXAMPLES = ROOT / "examples-c"
BUILD = ROOT / "build" / "c"
STRICT = ["-Wall", "-Wextra", "-Wpedantic", "-Werror"]
CFLAGS = ["-std=c99", *STRICT, "-g", "-O1"]
VALGRIND = [
    "valgrind",
    "--leak-check=full",
    "--error-exitcode=1",
    # Only definite leaks count as errors: Rust's thread-local and static
    # allocations show as "still reachable" or "possibly lost", which is no leak.
    "--errors-for-leak-kinds=definite",
    "--show-leak-kinds=definite",
]
WAIT = 20  # seconds: for things that should happen; a passing run never waits this long
STATS_FIELDS = [
    "connections_active",
    "connections_accepted",
    "connections_rejected",
    "frames_received",
    "frames_sent",
    "bytes_received",
    "bytes_sent",
    "closed_too_large",
    "closed_idle",
]
API_FUNCTIONS = {
    "tf_config_new", "tf_config_free", "tf_config_set_address",
    "tf_config_set_max_connections", "tf_config_set_max_frame",
    "tf_config_set_idle_timeout_ms", "tf_config_set_max_queued_output",
    "tf_config_set_backend", "tf_config_set_log", "tf_server_start",
    "tf_server_start_pull", "tf_server_fd", "tf_server_poll", "tf_server_port",
    "tf_send", "tf_conn_close", "tf_server_stats", "tf_server_stop",
    "tf_server_free", "tf_last_error", "tf_version",
}  # fmt: skip


# ---------------------------------------------------------------- building


def run(cmd, timeout=300, check=True, **kw):
    """Runs cmd, captures text output, fails the test with it on a non-zero exit."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def lib():
    """The release library and its header, built by cargo (a no-op when up to date)."""
    if "TCPFRAME_LIBDIR" not in os.environ:
        run(["cargo", "build", "--release"], timeout=1800, cwd=ROOT)
    for f in (REL / "libtcpframe.so", REL / "libtcpframe.a", INCLUDE / "tcpframe.h"):
        assert f.exists(), f"{f} is missing after cargo build --release"
    # Programs linked with -ltcpframe record the soname, libtcpframe.so.0, and the
    # loader looks for that name in the rpath; cargo only makes libtcpframe.so.
    soname = REL / "libtcpframe.so.0"
    if not soname.exists():
        if soname.is_symlink():
            soname.unlink()
        soname.symlink_to("libtcpframe.so")
    BUILD.mkdir(parents=True, exist_ok=True)
    return REL


_built = {}


def build_c(lib, name, src, extra=()):
    """Compiles one C program against libtcpframe.so (rpath set), once per session,
    with the strict flags of every C program (-Werror) and `extra` (sanitizers)."""
    if name not in _built:
        BUILD.mkdir(parents=True, exist_ok=True)
        out = BUILD / name
        run(
            ["cc", *CFLAGS, *extra, f"-I{INCLUDE}", str(src), "-o", str(out),
             f"-L{lib}", "-ltcpframe", f"-Wl,-rpath,{lib}", "-pthread"],
        )  # fmt: skip
        _built[name] = out
    return _built[name]


# The C test programs (tests/c/test_*.c): a TEST(fn, secs, "flags") table each,
# `--list`, and "ok   NAME (" per passing test.
C_TEST_LINE = re.compile(r'^\s*TEST\((test_\w+),\s*(\d+),\s*"(\w*)"\),', re.M)
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def c_test_cases(source):
    """(test name, seconds, flags) from each TEST(...) line of a C test program."""
    found = C_TEST_LINE.findall(source.read_text())
    assert found, f"no TEST(...) entries in {source}"
    return [(name, int(secs), flags) for name, secs, flags in found]


def listed_c_tests(exe):
    """The test names a C test program runs (its --list)."""
    return {line.split()[0] for line in run([exe, "--list"]).stdout.splitlines()}


def run_c_tests(exe, names, secs, backend, scale=1, prefix=(), env_extra=None):
    """Runs the named tests of a C test program in one process; each must say ok."""
    env = {**os.environ, "TF_TEST_BACKEND": backend, "TF_TEST_SCALE": str(scale), **(env_extra or {})}
    p = run([*prefix, exe, *names], timeout=secs * scale + 60, check=False, env=env)
    text = f"{p.stdout}\n{p.stderr[-6000:]}"
    for name in names:
        assert re.search(rf"^ok   {name} \(", p.stdout, re.M), text
    assert p.returncode == 0, text
    return p


@pytest.fixture(scope="session")
def echo_server(lib):
    return build_c(lib, "echo_server", EXAMPLES / "echo_server.c")


@pytest.fixture(scope="session")
def client(lib):
    return build_c(lib, "client", EXAMPLES / "client.c")


@pytest.fixture(scope="session")
def chat_server(lib):
    return build_c(lib, "chat_server", EXAMPLES / "chat_server.c")


@pytest.fixture(scope="session")
def pipe(lib):
    return build_c(lib, "pipe", EXAMPLES / "pipe.c")


@pytest.fixture(scope="session")
def select_daemon(lib):
    return build_c(lib, "select_daemon", EXAMPLES / "select_daemon.c")


@pytest.fixture(scope="session")
def test_api(lib):
    return build_c(lib, "test_api", ROOT / "tests" / "c" / "test_api.c")


@pytest.fixture(scope="session")
def legacy_daemon(lib):
    out = BUILD / "legacy_daemon"
    run(["make", "-B", "-C", str(EXAMPLES / "legacy_daemon"), f"OUT={out}", f"LIBDIR={lib}"])
    return out


# ---------------------------------------------------------------- processes and sockets


class Proc:
    """A started program whose stdout lines are collected by a thread, so waiting
    for a line never blocks past its deadline. Always ended by its own PID."""

    def __init__(self, args, stdin=subprocess.DEVNULL, env=None):
        self.args = [str(a) for a in args]
        self.p = subprocess.Popen(
            self.args, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.lines = queue.Queue()
        self.out = []
        self.err = []
        self._t = [
            threading.Thread(target=self._pump, args=(self.p.stdout, self.out, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.p.stderr, self.err, False), daemon=True),
        ]
        for t in self._t:
            t.start()

    def _pump(self, stream, sink, to_queue):
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            sink.append(line)
            if to_queue:
                self.lines.put(line)
        stream.close()

    def wait_line(self, pattern, timeout=WAIT):
        """The first new stdout line matching pattern (a regex), as a match object."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.p.poll() is not None and self.lines.empty():
                    break
                continue
            m = rx.search(line)
            if m:
                return m
        pytest.fail(
            f"no line matching {pattern!r} from {self.args} (exit {self.p.poll()})\n"
            f"stdout: {self.out}\nstderr: {self.err}"
        )

    def signal(self, sig):
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def finish(self, timeout=WAIT):
        """Waits for the exit; returns (code, stdout text, stderr text)."""
        try:
            code = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.args} did not exit within {timeout}s\nstderr: {self.err}")
        for t in self._t:
            t.join(timeout=5)
        return code, "\n".join(self.out), "\n".join(self.err)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(timeout=10)
        for f in (self.p.stdin,):
            if f:
                try:
                    f.close()
                except OSError:
                    pass


@pytest.fixture
def procs():
    """Collects started processes and kills (by PID) any still running at the end."""
    started = []

    def start(*args, **kw):
        p = Proc(*args, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


def connect(port, host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.connect((host, port))
    return s


def frame(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_frame(s) -> bytes:
    (n,) = struct.unpack("<I", recv_exact(s, 4))
    return recv_exact(s, n)


def silent(s, seconds=0.3):
    """True when nothing at all arrives on s for `seconds`."""
    s.settimeout(seconds)
    try:
        s.recv(1)  # data or EOF: either way, not silent
    except socket.timeout:
        return True
    finally:
        s.settimeout(WAIT)
    return False


def parse_stats(text):
    stats = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)=(\d+)", line.strip())
        if m and m.group(1) in STATS_FIELDS:
            stats[m.group(1)] = int(m.group(2))
    return stats


def start_listening(procs, args, **kw):
    p = procs(args, **kw)
    port = int(p.wait_line(r"^listening on port (\d+)$", timeout=90).group(1))
    assert 0 < port < 65536
    return p, port


# ---------------------------------------------------------------- the header and test_api


@pytest.mark.parametrize("std", ["c99", "c11", "c++11"])
def test_header_compiles_warning_free(lib, std):
    cpp = std.startswith("c++")
    src = ROOT / "tests" / "c" / ("test_header.cpp" if cpp else "test_header.c")
    exe = BUILD / f"test_header_{std}"
    run(
        ["c++" if cpp else "cc", f"-std={std}", *STRICT, f"-I{INCLUDE}", str(src),
         "-o", str(exe), f"-L{lib}", "-ltcpframe", f"-Wl,-rpath,{lib}"],
    )  # fmt: skip
    run([exe], timeout=30)  # links and loads: C linkage and the soname both work


def test_header_declares_only_tf_names(lib):
    """Everything the header puts in a C program's namespace is tf_* or TF_* (API.md)."""
    text = (INCLUDE / "tcpframe.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    names = set(re.findall(r"^\s*#\s*define\s+(\w+)", text, re.M))
    names |= set(re.findall(r"\b(?:struct|enum|union)\s+(\w+)", text))
    names |= set(re.findall(r"\btypedef\b[^;{]*?(\w+)\s*;", text))
    names |= set(re.findall(r"\btypedef\b[^;]*?\}\s*(\w+)\s*;", text, re.S))
    names |= set(re.findall(r"^[\w\s\*]*?\b(\w+)\s*\(", text, re.M))  # function declarations
    names -= {"TCPFRAME_H", "int", "void", "char", "const"}  # the guard; C words before "(*"
    bad = sorted(n for n in names if not n.startswith(("tf_", "TF_")))
    assert not bad, f"include/tcpframe.h declares names outside tf_/TF_: {bad}"
    assert API_FUNCTIONS <= names, sorted(API_FUNCTIONS - names)


def check_test_api_output(p):
    m = re.search(r"^(\d+) passed, (\d+) failed$", p.stdout, re.M)
    assert m, f"no summary line\n{p.stdout}\n{p.stderr[-5000:]}"
    assert int(m.group(2)) == 0, f"{p.stdout}\n{p.stderr[-5000:]}"
    assert int(m.group(1)) >= 35, p.stdout  # every test ran
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr[-5000:]}"


def test_api_program_passes(test_api):
    check_test_api_output(run([test_api], timeout=600, check=False))


def valgrind_clean(stderr):
    """Valgrind saw no memory error and nothing definitely lost (checked in its words)."""
    summaries = re.findall(r"ERROR SUMMARY: (\d+) errors", stderr)
    assert summaries, f"no valgrind summary:\n{stderr[-3000:]}"
    assert all(n == "0" for n in summaries), stderr[-8000:]
    lost = re.findall(r"definitely lost: ([\d,]+) bytes", stderr)
    assert all(n == "0" for n in lost), stderr[-8000:]


@pytest.mark.valgrind
def test_api_program_under_valgrind(test_api):
    # The fork test's child has the loop thread's memory but not the thread: valgrind
    # would call it lost. The child reports its checks through a pipe instead.
    p = run([*VALGRIND, "--child-silent-after-fork=yes", test_api], timeout=1500, check=False)
    check_test_api_output(p)
    valgrind_clean(p.stderr)


def test_api_program_under_asan_and_ubsan(lib):
    """The test program itself is memory-safe (the Rust side is checked by valgrind)."""
    exe = BUILD / "test_api_asan"
    run(
        ["cc", *CFLAGS, "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-omit-frame-pointer", f"-I{INCLUDE}", ROOT / "tests" / "c" / "test_api.c",
         "-o", exe, f"-L{lib}", "-ltcpframe", f"-Wl,-rpath,{lib}", "-pthread"],
    )  # fmt: skip
    check_test_api_output(run([exe], timeout=600, check=False))


# ---------------------------------------------------------------- echo_server + client


def echo_session(port):
    """Talks to an echo server with Python sockets; returns (frames, bytes) sent."""
    frames = 0
    nbytes = 0

    def sent(payload):
        nonlocal frames, nbytes
        frames += 1
        nbytes += 4 + len(payload)

    with connect(port) as s:
        for payload in [b"hello", b"", b"\x00\xff binary \r\n", bytes(range(256)) * 4]:
            s.sendall(frame(payload))
            sent(payload)
            assert recv_frame(s) == payload
        # many frames in one write, in order
        batch = [f"frame {i}".encode() for i in range(100)]
        s.sendall(b"".join(frame(b) for b in batch))
        for b in batch:
            sent(b)
        assert [recv_frame(s) for _ in batch] == batch
        # one frame dribbled a byte at a time
        data = frame(b"dribble")
        for i in range(len(data)):
            s.sendall(data[i : i + 1])
            time.sleep(0.002)
        sent(b"dribble")
        assert recv_frame(s) == b"dribble"
        # a 1 MiB frame
        big = os.urandom(1 << 20)
        s.sendall(frame(big))
        sent(big)
        assert recv_frame(s) == big
    return frames, nbytes


def test_echo_server_echoes_and_reports_stats_on_sigint(echo_server, client, procs):
    srv, port = start_listening(procs, [echo_server, "127.0.0.1:0"])
    lines = ["first line", "", "  spaces kept  ", "ünïcödé", "last"]
    c = run([client, f"127.0.0.1:{port}"], input="\n".join(lines) + "\n", timeout=60)
    assert c.stdout == "".join(line + "\n" for line in lines)
    conn1 = srv.wait_line(r"^connect (\d+) 127\.0\.0\.1:\d+$").group(1)
    assert srv.wait_line(r"^close (\d+) reason=(\d+)$").groups() == (conn1, "0")  # PEER

    frames, nbytes = echo_session(port)
    conn2 = srv.wait_line(r"^connect (\d+) 127\.0\.0\.1:\d+$").group(1)
    assert conn2 != conn1 and int(conn2) != 0
    srv.wait_line(rf"^close {conn2} reason=0$")

    srv.signal(signal.SIGINT)
    code, out, err = srv.finish()
    assert code == 0, err
    assert re.search(r"^signal 2: stopping$", out, re.M), out
    st = parse_stats(out)
    assert set(st) == set(STATS_FIELDS), out
    client_bytes = sum(4 + len(line.encode()) for line in lines)
    assert st["connections_accepted"] == 2
    assert st["connections_active"] == 0
    assert st["connections_rejected"] == 0
    assert st["frames_received"] == frames + len(lines)
    assert st["frames_sent"] == frames + len(lines)
    assert st["bytes_received"] == nbytes + client_bytes
    assert st["bytes_sent"] == nbytes + client_bytes
    assert st["closed_too_large"] == 0 and st["closed_idle"] == 0


def test_echo_server_sigterm_quiet_stops_open_connections(echo_server, procs):
    srv, port = start_listening(procs, [echo_server, "-q", "127.0.0.1:0"])
    with connect(port) as s:
        s.sendall(frame(b"ping"))
        assert recv_frame(s) == b"ping"
        srv.signal(signal.SIGTERM)
        code, out, err = srv.finish()
        assert code == 0, err
        assert s.recv(1) == b""  # the server closed our connection as it stopped
    assert not re.search(r"^(connect|close) ", out, re.M), out  # -q
    st = parse_stats(out)
    assert st["frames_received"] == 1 and st["connections_accepted"] == 1, out
    assert re.search(r"^signal 15: stopping$", out, re.M), out


@pytest.mark.parametrize("backend", ["poll", "epoll"])
def test_echo_server_backend_flag(echo_server, procs, backend):
    srv, port = start_listening(procs, [echo_server, "-q", "-b", backend, "127.0.0.1:0"])
    assert echo_session(port)[0] > 100
    srv.signal(signal.SIGINT)
    assert srv.finish()[0] == 0


def test_echo_server_and_client_over_ipv6(echo_server, client, procs):
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    srv, port = start_listening(procs, [echo_server, "[::1]:0"])
    c = run([client, f"[::1]:{port}"], input="over six\n", timeout=60)
    assert c.stdout == "over six\n"
    srv.wait_line(r"^connect \d+ \[::1\]:\d+$")
    srv.signal(signal.SIGINT)
    assert srv.finish()[0] == 0


def test_echo_server_refuses_bad_and_busy_addresses(echo_server, procs):
    bad = run([echo_server, "not-an-address"], check=False, timeout=30)
    assert bad.returncode != 0 and "not-an-address" in bad.stderr
    srv, port = start_listening(procs, [echo_server, "-q", "127.0.0.1:0"])
    busy = run([echo_server, f"127.0.0.1:{port}"], check=False, timeout=30)
    assert busy.returncode == 1
    assert "in use" in busy.stderr.lower(), busy.stderr
    srv.signal(signal.SIGINT)
    assert srv.finish()[0] == 0


def test_client_fails_cleanly_without_server(client):
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = run([client, f"127.0.0.1:{port}"], input="x\n", check=False, timeout=30)
    assert c.returncode == 1 and "connect" in c.stderr


@pytest.mark.valgrind
def test_echo_server_and_client_under_valgrind(echo_server, client, procs):
    srv, port = start_listening(procs, [*VALGRIND, echo_server, "127.0.0.1:0"])
    lines = [f"line {i}" for i in range(50)]
    c = run(
        [*VALGRIND, client, "-t", "60000", f"127.0.0.1:{port}"],
        input="\n".join(lines) + "\n",
        timeout=300,
        check=False,
    )
    assert c.returncode == 0, c.stderr
    assert c.stdout.splitlines() == lines
    valgrind_clean(c.stderr)
    srv.wait_line(r"^close \d+ reason=0$", timeout=60)
    srv.signal(signal.SIGINT)
    code, out, err = srv.finish(timeout=120)
    assert code == 0, err
    assert parse_stats(out)["frames_received"] == 50
    valgrind_clean(err)


# ---------------------------------------------------------------- chat_server


def test_chat_server_broadcasts_to_everyone_else(chat_server, procs):
    srv, port = start_listening(procs, [chat_server, "127.0.0.1:0"])
    a, b, c = connect(port), connect(port), connect(port)
    try:
        ids = [srv.wait_line(r"^connect (\d+) ").group(1) for _ in range(3)]
        assert len(set(ids)) == 3
        a.sendall(frame(b"hi from a"))
        assert recv_frame(b) == b"hi from a"
        assert recv_frame(c) == b"hi from a"
        assert silent(a)  # never to the sender
        b.sendall(frame(b"one") + frame(b"two") + frame(b""))
        for s in (a, c):
            assert [recv_frame(s) for _ in range(3)] == [b"one", b"two", b""]
        assert silent(b)
        c.close()
        srv.wait_line(r"^close \d+ reason=0$")
        a.sendall(frame(b"after c left"))
        assert recv_frame(b) == b"after c left"
        assert silent(a)
    finally:
        for s in (a, b, c):
            s.close()
    srv.signal(signal.SIGTERM)
    code, out, err = srv.finish()
    assert code == 0, err


def test_chat_server_drops_a_member_that_does_not_read(chat_server, procs):
    """Broadcasts go out with tf_send_many; a member whose queue (16 MiB) cannot
    take a frame is dropped, the others get everything."""
    srv, port = start_listening(procs, [chat_server, "127.0.0.1:0"])
    sender, reader = connect(port), connect(port)
    sleeper = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sleeper.settimeout(WAIT)
    sleeper.connect(("127.0.0.1", port))
    try:
        ids = [srv.wait_line(r"^connect (\d+) ").group(1) for _ in range(3)]
        sleeper_id = ids[2]  # accepted in the order they connected
        payload = b"x" * 65536
        n = 512  # 32 MiB: past the sleeper's 16 MiB queue and its kernel buffers
        got = []

        def read_all():
            got.extend(recv_frame(reader) for _ in range(n))

        t = threading.Thread(target=read_all, daemon=True)
        t.start()
        for i in range(n):
            sender.sendall(frame(payload[:-4] + struct.pack("<I", i)))
        t.join(timeout=WAIT * 3)
        assert len(got) == n and all(g[-4:] == struct.pack("<I", i) for i, g in enumerate(got))
        srv.wait_line(rf"^close {sleeper_id} reason=1$")  # TF_CLOSE_LOCAL: dropped by the server
    finally:
        for s in (sender, reader, sleeper):
            s.close()
    srv.signal(signal.SIGTERM)
    code, out, err = srv.finish()
    assert code == 0, err
    assert f"{sleeper_id} is not reading; dropping it" in err, err


def test_client_times_out_when_replies_do_not_come(chat_server, client, procs):
    srv, port = start_listening(procs, [chat_server, "-q", "127.0.0.1:0"])
    t0 = time.monotonic()
    c = run([client, "-t", "300", f"127.0.0.1:{port}"], input="alone\n", check=False, timeout=30)
    assert c.returncode == 1 and "timed out: 0 of 1 replies" in c.stderr, c.stderr
    assert 0.25 < time.monotonic() - t0 < 10
    srv.signal(signal.SIGINT)
    assert srv.finish()[0] == 0


# ---------------------------------------------------------------- pipe


def connect_small_rcvbuf(port, size=4096):
    """A client whose receive buffer is set before the handshake: it holds little."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    s.settimeout(WAIT)
    s.connect(("127.0.0.1", port))
    return s


def pipe_frames(n, size):
    return [struct.pack("<I", i) + bytes([i % 251]) * (size - 4) for i in range(n)]


def pipe_session(procs, args, n, size, wait=WAIT, wait_pause=True):
    """One slow consumer (not reading at first), one fast consumer, one producer
    sending n frames of size bytes; with wait_pause, returns once the slow
    consumer has paused the producers. Returns what the test checks."""
    srv, port = start_listening(procs, args)
    slow = connect_small_rcvbuf(port)
    slow.sendall(frame(b"consumer"))
    slow_id = srv.wait_line(r"^consumer (\d+)$", timeout=wait).group(1)
    srv.wait_line(rf"^resume {slow_id}$", timeout=wait)  # a consumer: producers may go
    fast = connect(port)
    fast.sendall(frame(b"consumer"))
    srv.wait_line(r"^consumer \d+$", timeout=wait)
    prod = connect(port)
    prod.sendall(frame(b"producer"))
    srv.wait_line(r"^producer \d+$", timeout=wait)
    frames = pipe_frames(n, size)
    result = {"fast": [], "writer_done": False}

    def write():
        prod.sendall(b"".join(frame(f) for f in frames))
        result["writer_done"] = True

    def read_fast():
        fast.settimeout(wait)
        result["fast"] = [recv_frame(fast) for _ in range(n)]

    writer = threading.Thread(target=write, daemon=True)
    reader = threading.Thread(target=read_fast, daemon=True)
    writer.start()
    reader.start()
    if wait_pause:
        # The slow consumer fills up: the producers stay paused (the last line
        # is a pause, and nothing more happens). The pause may name the fast
        # consumer too, when both were full at the same frame.
        end = time.monotonic() + wait
        seen = -1
        while True:
            assert time.monotonic() < end, f"the pipe never stayed paused: {srv.out[-6:]}"
            if len(srv.out) == seen and re.match(r"^pause \d+$", srv.out[-1]):
                break
            seen = len(srv.out)
            time.sleep(1.0)
    return srv, slow, fast, prod, frames, result, writer, reader, slow_id


def test_pipe_pauses_producers_while_a_consumer_is_full(pipe, procs):
    n, size = 20000, 1024  # 20 MiB: more than every buffer between producer and pipe
    srv, slow, fast, prod, frames, result, writer, reader, slow_id = pipe_session(
        procs, [pipe, "-m", "65536", "127.0.0.1:0"], n, size
    )
    try:
        time.sleep(1.0)
        # Paused: the producer is held back by TCP, and nothing moves for anyone.
        assert not result["writer_done"], "the producer wrote 20 MiB while the pipe was paused"
        # The slow consumer now reads: every frame, in order, and the pipe resumes.
        slow.settimeout(WAIT)
        got = [recv_frame(slow) for _ in range(n)]
        assert got == frames
        writer.join(timeout=WAIT)
        reader.join(timeout=WAIT)
        assert result["writer_done"] and result["fast"] == frames
        flow = [line for line in srv.out if re.match(r"^(pause|resume) \d+$", line)]
        assert flow[-1].startswith("resume"), flow[-4:]  # flowing again at the end
    finally:
        for s in (slow, fast, prod):
            s.close()
    srv.signal(signal.SIGINT)
    code, out, err = srv.finish()
    assert code == 0, err
    m = re.search(r"^forwarded=(\d+) pauses=(\d+)$", out, re.M)
    assert m and int(m.group(1)) == n and int(m.group(2)) >= 1, out


def test_pipe_refuses_unknown_clients_and_waits_for_a_consumer(pipe, procs):
    srv, port = start_listening(procs, [pipe, "127.0.0.1:0"])
    with connect(port) as stranger:
        stranger.sendall(frame(b"hello?"))
        assert stranger.recv(1) == b""  # closed: neither producer nor consumer
    with connect(port) as prod:
        prod.sendall(frame(b"producer") + frame(b"early"))
        srv.wait_line(r"^producer \d+$")
        time.sleep(0.3)  # no consumer: "early" waits in the paused producer
        with connect(port) as cons:
            cons.sendall(frame(b"consumer"))
            assert recv_frame(cons) == b"early"
            prod.sendall(frame(b"later"))
            assert recv_frame(cons) == b"later"
    srv.signal(signal.SIGTERM)
    code, out, err = srv.finish()
    assert code == 0, err
    assert re.search(r"^forwarded=2 ", out, re.M), out


@pytest.mark.valgrind
def test_pipe_under_valgrind(pipe, procs):
    n, size = 400, 1024  # the kernel holds all of it for the slow consumer: the fast one fills
    srv, slow, fast, prod, frames, result, writer, reader, slow_id = pipe_session(
        procs, [*VALGRIND, pipe, "-m", "16384", "127.0.0.1:0"], n, size, wait=120, wait_pause=False
    )
    try:
        slow.settimeout(120)
        assert [recv_frame(slow) for _ in range(n)] == frames
        writer.join(timeout=120)
        reader.join(timeout=120)
        assert result["fast"] == frames
    finally:
        for s in (slow, fast, prod):
            s.close()
    srv.signal(signal.SIGINT)
    code, out, err = srv.finish(timeout=120)
    assert code == 0, err
    m = re.search(r"^forwarded=(\d+) pauses=(\d+)$", out, re.M)
    assert m and int(m.group(1)) == n and int(m.group(2)) >= 1, out
    valgrind_clean(err)


# ---------------------------------------------------------------- select_daemon


def test_select_daemon_echoes_and_obeys_stdin(select_daemon, procs):
    d, port = start_listening(procs, [select_daemon, "127.0.0.1:0"], stdin=subprocess.PIPE)
    with connect(port) as s:
        conn = d.wait_line(r"^connect (\d+) 127\.0\.0\.1:\d+$").group(1)
        for payload in [b"pull", b"", b"mode" * 1000]:
            s.sendall(frame(payload))
            assert recv_frame(s) == payload
        d.p.stdin.write(b"stats\n")
        d.p.stdin.flush()
        d.wait_line(r"^closed_idle=0$")
        st = parse_stats("\n".join(d.out))
        assert st["frames_received"] == 3 and st["connections_active"] == 1, d.out
        d.p.stdin.write(b"quit\n")
        d.p.stdin.flush()
        code, out, err = d.finish()
        assert code == 0, err
        assert s.recv(1) == b""
    assert "stopping" in out.splitlines()
    assert f"connect {conn} " in out


def test_select_daemon_stops_at_end_of_input(select_daemon, procs):
    d, port = start_listening(procs, [select_daemon, "127.0.0.1:0"], stdin=subprocess.PIPE)
    with connect(port) as s:
        s.sendall(frame(b"x"))
        assert recv_frame(s) == b"x"
        d.p.stdin.write(b"bogus\n")
        d.p.stdin.close()  # EOF
        code, out, err = d.finish()
    assert code == 0, err
    assert "unknown command 'bogus'" in err
    assert "stopping" in out.splitlines()


@pytest.mark.valgrind
def test_select_daemon_under_valgrind(select_daemon, procs):
    d, port = start_listening(
        procs, [*VALGRIND, select_daemon, "127.0.0.1:0"], stdin=subprocess.PIPE
    )
    with connect(port) as s:
        for i in range(20):
            s.sendall(frame(b"v" * i))
            assert recv_frame(s) == b"v" * i
    d.wait_line(r"^close \d+ reason=0$", timeout=60)
    d.p.stdin.write(b"stats\nquit\n")
    d.p.stdin.flush()
    code, out, err = d.finish(timeout=120)
    assert code == 0, err
    assert parse_stats(out)["frames_received"] == 20
    valgrind_clean(err)


# ---------------------------------------------------------------- legacy_daemon


def test_legacy_daemon_is_statically_linked(legacy_daemon):
    ldd = run(["ldd", legacy_daemon])
    assert "libtcpframe" not in ldd.stdout, ldd.stdout
    needed = run(["readelf", "-d", legacy_daemon]).stdout
    assert "libtcpframe" not in needed
    syms = run(["nm", legacy_daemon]).stdout
    defined = set(re.findall(r"^[0-9a-f]+ T (tf_\w+)$", syms, re.M))
    assert {"tf_server_start", "tf_send", "tf_config_set_log"} <= defined
    assert not re.search(r"^\s+U tf_", syms, re.M)  # nothing left for a .so to provide


def pid_state(pid):
    """The process state letter from /proc, or None when the PID is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def wait_gone(pid, timeout=WAIT):
    """True when pid exits (or is a zombie waiting for a reaper that is not us)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pid_state(pid) in (None, "Z"):
            return True
        time.sleep(0.05)
    return False


SYSLOG_LINE = re.compile(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d legacy_daemon\[(\d+)\]: (\w+): (.*)$")


def test_legacy_daemon_foreground(legacy_daemon, procs, tmp_path):
    pidfile, log = tmp_path / "ld.pid", tmp_path / "ld.log"
    d, port = start_listening(
        procs, [legacy_daemon, "-f", "-a", "127.0.0.1:0", "-p", pidfile, "-l", log]
    )
    assert int(pidfile.read_text()) == d.p.pid
    with connect(port) as s:
        s.sendall(frame(b"legacy") + frame(b""))
        assert recv_frame(s) == b"legacy" and recv_frame(s) == b""
        s.sendall(struct.pack("<I", 0xFFFFFFFF))  # over max frame: the library drops us
        assert s.recv(1) == b""
    os.rename(log, tmp_path / "ld.log.1")  # logrotate-style: SIGHUP reopens the path
    d.signal(signal.SIGHUP)
    end = time.monotonic() + WAIT
    while not (log.exists() and "log reopened" in log.read_text()) and time.monotonic() < end:
        time.sleep(0.05)
    d.signal(signal.SIGTERM)
    code, out, err = d.finish()
    assert code == 0, err
    assert not pidfile.exists()
    old, new = (tmp_path / "ld.log.1").read_text(), log.read_text()
    for line in (old + new).splitlines():
        m = SYSLOG_LINE.match(line)
        assert m, f"not a syslog-style line: {line!r}"
        assert int(m.group(1)) == d.p.pid
    both = old + new  # a line written around the SIGHUP may be in either file
    assert re.search(r"notice: tcpframe \S+ listening on 127\.0\.0\.1:0 \(port \d+\)", old)
    assert re.search(r"info: connect \d+ from 127\.0\.0\.1:\d+", both)
    assert re.search(r"info: close \d+ reason=4$", both, re.M), both  # TF_CLOSE_TOO_LARGE
    # the library's own diagnostics arrive through tf_config_set_log, in the same format
    assert re.search(r"^.*\]: (err|warning|info|debug): tcpframe: ", both, re.M), both
    assert "log reopened" in new
    assert re.search(r"signal 15: stopping", new) and "exiting" in new


def test_legacy_daemon_daemonizes_with_pidfile(legacy_daemon, tmp_path):
    pidfile, log = tmp_path / "ld.pid", tmp_path / "ld.log"
    start = run(
        [legacy_daemon, "-d", "-a", "127.0.0.1:0", "-p", "ld.pid", "-l", "ld.log"],
        cwd=tmp_path,  # relative paths must survive the daemon's chdir("/")
        timeout=30,
    )
    port = int(re.fullmatch(r"listening on port (\d+)\n", start.stdout).group(1))
    pid = int(pidfile.read_text())
    try:
        assert pid != os.getpid() and pid_state(pid) in ("S", "R")
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ppid, session = int(fields[1]), int(fields[3])
        assert ppid != os.getpid()  # reparented: the starter and middle child are gone
        assert session != os.getsid(0)  # its own session (setsid)
        assert session != pid  # and not its leader (second fork): no terminal ever again
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
        with connect(port) as s:
            s.sendall(frame(b"daemon echo"))
            assert recv_frame(s) == b"daemon echo"
        os.kill(pid, signal.SIGTERM)  # by the PID from its pid file
        assert wait_gone(pid), "the daemon did not exit on SIGTERM"
    finally:
        if pid_state(pid) not in (None, "Z"):
            os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + WAIT
    while pidfile.exists() and time.monotonic() < end:
        time.sleep(0.05)
    assert not pidfile.exists()
    text = log.read_text()
    assert "listening on 127.0.0.1:0" in text and "exiting" in text, text
    assert all(SYSLOG_LINE.match(line) for line in text.splitlines()), text


def test_legacy_daemon_refuses_a_pidfile_naming_a_live_process(legacy_daemon, tmp_path):
    pidfile = tmp_path / "ld.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # we are alive
    p = run([legacy_daemon, "-a", "127.0.0.1:0", "-p", pidfile], check=False, timeout=30)
    assert p.returncode == 1
    assert f"names running process {os.getpid()}" in p.stderr, p.stderr
    assert pidfile.read_text() == f"{os.getpid()}\n"  # left alone


def test_legacy_daemon_reports_start_failure_to_starter(legacy_daemon, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = run(
            [legacy_daemon, "-d", "-a", f"127.0.0.1:{port}", "-p", tmp_path / "ld.pid"],
            check=False,
            timeout=30,
        )
    assert p.returncode == 1
    assert "daemon failed" in p.stderr and "in use" in p.stderr.lower(), p.stderr
    end = time.monotonic() + WAIT
    while (tmp_path / "ld.pid").exists() and time.monotonic() < end:
        time.sleep(0.05)
    assert not (tmp_path / "ld.pid").exists()


# ---------------------------------------------------------------- the shared library itself


def test_shared_library_exports_only_tf_functions(lib):
    out = run(["nm", "-D", "--defined-only", lib / "libtcpframe.so"]).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms[parts[2].split("@")[0]] = parts[1]
    assert syms, out
    assert all(name.startswith("tf_") for name in syms), sorted(
        n for n in syms if not n.startswith("tf_")
    )
    assert all(kind == "T" for kind in syms.values()), syms
    assert API_FUNCTIONS <= set(syms), sorted(API_FUNCTIONS - set(syms))


def test_shared_library_soname(lib):
    out = run(["readelf", "-d", lib / "libtcpframe.so"]).stdout
    assert re.search(r"\(SONAME\)\s+Library soname: \[libtcpframe\.so\.0\]", out), out


def test_install_and_build_with_pkg_config(lib, tmp_path, procs):
    if not shutil.which("pkg-config"):
        pytest.skip("pkg-config is not installed")
    prefix = tmp_path / "prefix"
    run(["bash", ROOT / "scripts" / "install.sh", prefix], timeout=1800)
    libdir = prefix / "lib"
    version = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
    assert (prefix / "include" / "tcpframe.h").read_bytes() == (INCLUDE / "tcpframe.h").read_bytes()
    assert (libdir / f"libtcpframe.so.{version}").is_file()
    assert os.readlink(libdir / "libtcpframe.so.0") == f"libtcpframe.so.{version}"
    assert os.readlink(libdir / "libtcpframe.so") == "libtcpframe.so.0"
    assert (libdir / "libtcpframe.a").is_file()

    env = {**os.environ, "PKG_CONFIG_PATH": str(libdir / "pkgconfig")}
    flags = run(["pkg-config", "--cflags", "--libs", "tcpframe"], env=env).stdout.split()
    assert f"-I{prefix}/include" in flags and f"-L{libdir}" in flags and "-ltcpframe" in flags
    assert run(["pkg-config", "--modversion", "tcpframe"], env=env).stdout.strip() == version
    static = run(["pkg-config", "--static", "--libs", "tcpframe"], env=env).stdout.split()
    assert "-lpthread" in static and "-ldl" in static

    exe = tmp_path / "echo_server"
    run(["cc", *CFLAGS, EXAMPLES / "echo_server.c", "-o", exe, *flags], env=env)
    run_env = {**os.environ, "LD_LIBRARY_PATH": str(libdir)}
    ldd = run(["ldd", exe], env=run_env).stdout
    assert re.search(
        rf"libtcpframe\.so\.0 => {re.escape(str(libdir))}/libtcpframe\.so\.0", ldd
    ), ldd
    srv, port = start_listening(procs, [exe, "-q", "127.0.0.1:0"], env=run_env)
    with connect(port) as s:
        s.sendall(frame(b"installed"))
        assert recv_frame(s) == b"installed"
    srv.signal(signal.SIGINT)
    assert srv.finish()[0] == 0

    # and the static library links with exactly what the .pc file says
    sexe = tmp_path / "legacy_daemon"
    lflags = run(["pkg-config", "--static", "--libs-only-l", "tcpframe"], env=env).stdout.split()
    lflags.remove("-ltcpframe")
    run(["cc", *CFLAGS, f"-I{prefix}/include", EXAMPLES / "legacy_daemon" / "legacy_daemon.c",
         "-o", sexe, libdir / "libtcpframe.a", *lflags])  # fmt: skip
    assert "libtcpframe" not in run(["ldd", sexe]).stdout


def test_the_sanitizer_build_is_really_active(tmp_path):
    """Proves the ASan flags used above catch a real bug: a one-byte heap overflow."""
    src = tmp_path / "overflow.c"
    src.write_text(
        "#include <stdlib.h>\n#include <string.h>\n"
        "int main(void) { char *p = malloc(8); memset(p, 0, 9); free(p); return 0; }\n"
    )
    exe = tmp_path / "overflow"
    run(["cc", "-std=c99", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", src, "-o", exe])
    p = run([exe], timeout=60, check=False)
    assert p.returncode != 0 and "heap-buffer-overflow" in p.stderr, p.stderr[-2000:]


# ---------------------------------------------------------------- reach: relay, unix_uid, activated


@pytest.fixture(scope="session")
def relay(lib):
    return build_c(lib, "relay", EXAMPLES / "relay.c")


@pytest.fixture(scope="session")
def unix_uid(lib):
    return build_c(lib, "unix_uid", EXAMPLES / "unix_uid.c")


@pytest.fixture(scope="session")
def activated(lib):
    return build_c(lib, "activated", EXAMPLES / "activated.c")


@pytest.fixture(scope="session")
def launcher(lib):
    return build_c(lib, "launcher", EXAMPLES / "launcher.c")


def unix_connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.connect(str(path))
    return s


def test_client_reaches_unix_sockets_and_host_names(echo_server, client, procs, tmp_path):
    srv, port = start_listening(procs, [echo_server, "-q", "127.0.0.1:0"])
    c = run([client, f"localhost:{port}"], input="by name\n", timeout=60)  # resolved by the client
    assert c.stdout == "by name\n"
    srv.signal(signal.SIGINT)
    assert srv.finish()[0] == 0
    path = tmp_path / "echo.sock"
    srv = procs([echo_server, "-q", f"unix:{path}"])
    srv.wait_line(r"^listening on port 0$")
    c = run([client, f"unix:{path}"], input="over unix\n\nlast", timeout=60)
    assert c.stdout == "over unix\n\nlast\n"
    c = run([client, f"unix:{tmp_path / 'missing.sock'}"], input="x\n", check=False, timeout=30)
    assert c.returncode == 1 and "connect" in c.stderr and "No such file" in c.stderr, c.stderr
    srv.signal(signal.SIGINT)
    assert srv.finish()[0] == 0


def test_relay_forwards_frames_both_ways(echo_server, relay, client, procs):
    target, tport = start_listening(procs, [echo_server, "127.0.0.1:0"])
    r, rport = start_listening(procs, [relay, "127.0.0.1:0", f"127.0.0.1:{tport}"])
    c = run([client, f"127.0.0.1:{rport}"], input="one\n\nthree\n", timeout=60)
    assert c.stdout == "one\n\nthree\n"
    inbound, outbound = r.wait_line(r"^pair (\d+) (\d+)$").groups()
    assert r.wait_line(rf"^connected {outbound} 127\.0\.0\.1:{tport}$")
    frames, _ = echo_session(rport)  # big, batched and dribbled frames, through both hops
    assert frames > 100
    target.wait_line(r"^connect \d+ 127\.0\.0\.1:\d+$")
    r.signal(signal.SIGTERM)
    code, out, err = r.finish()
    assert code == 0, err
    assert re.search(r"^close \d+ reason=0$", out, re.M), out  # a client left
    assert re.search(r"^connections_accepted=2$", out, re.M), out  # outbound ones are not counted
    target.signal(signal.SIGINT)
    assert target.finish()[0] == 0


def test_relay_closes_the_client_when_the_target_cannot_be_reached(relay, procs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    r, rport = start_listening(procs, [relay, "127.0.0.1:0", f"127.0.0.1:{dead}"])
    with connect(rport) as s:
        s.sendall(frame(b"lost"))
        assert s.recv(1) == b""  # closed once the outbound connect failed
    _, outbound = r.wait_line(r"^pair (\d+) (\d+)$").groups()
    r.wait_line(rf"^close {outbound} reason=7$")  # TF_CLOSE_CONNECT_FAILED
    r.signal(signal.SIGINT)
    assert r.finish()[0] == 0


def test_relay_pauses_the_sender_while_the_target_is_full(relay, procs):
    """A target that does not read: the relay's outbound queue fills, it pauses
    the client (TCP then holds the client back), and resumes once the target
    reads; every frame arrives, in order."""
    n, size = 6000, 4096  # 24 MiB: more than the kernel buffers between client and relay hold
    with socket.socket() as lst:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the accepted one
        lst.bind(("127.0.0.1", 0))
        lst.listen(4)
        lst.settimeout(WAIT)
        r, rport = start_listening(
            procs, [relay, "-q", "-Q", "65536", "127.0.0.1:0", f"127.0.0.1:{lst.getsockname()[1]}"]
        )
        cli = connect(rport)
        tgt, _ = lst.accept()
    frames = [struct.pack("<I", i) * (size // 4) for i in range(n)]
    done = {"writer": False}

    def write():
        cli.sendall(b"".join(frame(f) for f in frames))
        done["writer"] = True

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        paused = r.wait_line(r"^pause (\d+)$").group(1)
        time.sleep(0.5)
        assert not done["writer"], "the client wrote 24 MiB while its relay was paused"
        tgt.settimeout(WAIT)
        got = [recv_frame(tgt) for _ in range(n)]
        assert got == frames
        r.wait_line(rf"^resume {paused}$")
        writer.join(timeout=WAIT)
        assert done["writer"]
    finally:
        cli.close()
        tgt.close()
    r.signal(signal.SIGINT)
    code, out, err = r.finish()
    assert code == 0, err


@pytest.mark.valgrind
def test_relay_and_client_under_valgrind(echo_server, relay, client, procs):
    target, tport = start_listening(procs, [echo_server, "-q", "127.0.0.1:0"])
    r, rport = start_listening(procs, [*VALGRIND, relay, "127.0.0.1:0", f"127.0.0.1:{tport}"])
    lines = [f"relayed {i}" for i in range(30)]
    c = run([*VALGRIND, client, "-t", "60000", f"127.0.0.1:{rport}"], input="\n".join(lines) + "\n",
            timeout=300, check=False)  # fmt: skip
    assert c.returncode == 0, c.stderr
    assert c.stdout.splitlines() == lines
    valgrind_clean(c.stderr)
    r.wait_line(r"^close \d+ reason=0$", timeout=60)
    with socket.socket() as s:  # and a target that refuses
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    r2, r2port = start_listening(procs, [*VALGRIND, relay, "-q", "127.0.0.1:0", f"127.0.0.1:{dead}"])
    with connect(r2port) as s:
        assert s.recv(1) == b""
    for p in (r, r2):
        p.signal(signal.SIGTERM)
        code, out, err = p.finish(timeout=120)
        assert code == 0, err
        valgrind_clean(err)
    target.signal(signal.SIGINT)
    assert target.finish()[0] == 0


def as_nobody(program):
    """The command prefix that runs `program` as uid/gid 65534, or a pytest skip."""
    if os.geteuid() != 0:
        pytest.skip("not root: cannot run a client as another uid")
    if shutil.which("setpriv"):
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    elif shutil.which("runuser"):
        prefix = ["runuser", "-u", "nobody", "--"]
    else:
        pytest.skip("neither setpriv nor runuser is installed")
    probe = run([*prefix, program, "-h"], check=False, timeout=30)
    if probe.returncode != 0:  # e.g. a checkout under /root: uid 65534 cannot reach the program
        pytest.skip(f"{program} cannot run as uid 65534 here: {probe.stderr.strip()}")
    return prefix


@pytest.fixture
def shared_dir():
    """A directory every user can reach (pytest's tmp_path is under a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="tf-uid-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_unix_uid_serves_its_users_and_refuses_others(unix_uid, client, procs, shared_dir):
    nobody = as_nobody(client)
    path = shared_dir / "uid.sock"
    srv = procs([unix_uid, "-m", "0666", f"unix:{path}"])
    srv.wait_line(rf"^listening on unix:{re.escape(str(path))}$")
    assert path.is_socket() and (path.stat().st_mode & 0o777) == 0o666
    c = run([client, f"unix:{path}"], input="root may\n", timeout=60)
    assert c.stdout == "root may\n"
    srv.wait_line(r"^accept \d+ uid=0 pid=\d+$")
    c = run([*nobody, client, f"unix:{path}"], input="nobody may not\n", check=False, timeout=60)
    assert c.returncode == 1 and c.stdout == "" and "closed the connection" in c.stderr, c.stderr
    srv.wait_line(r"^refuse uid=65534 pid=\d+$")
    srv.signal(signal.SIGTERM)
    code, out, err = srv.finish()
    assert code == 0, err
    assert "connections_accepted=1" in out and "connections_rejected=1" in out, out
    assert not path.exists(), "the socket file is removed at stop"

    # Allowed by -u; and a stale file left by a killed server is replaced.
    srv = procs([unix_uid, "-m", "0666", "-u", "0,65534", f"unix:{path}"])
    srv.wait_line(r"^listening on ")
    srv.kill()  # SIGKILL: the file stays behind
    assert path.is_socket()
    srv = procs([unix_uid, "-m", "0666", "-u", "0,65534", f"unix:{path}"])
    srv.wait_line(r"^listening on ")
    c = run([*nobody, client, f"unix:{path}"], input="nobody may\n", timeout=60)
    assert c.stdout == "nobody may\n"
    srv.wait_line(r"^accept \d+ uid=65534 pid=\d+$")
    # A regular file where the socket would go is never deleted.
    srv.signal(signal.SIGTERM)
    assert srv.finish()[0] == 0
    path.write_text("precious")
    p = run([unix_uid, f"unix:{path}"], check=False, timeout=30)
    assert p.returncode == 1 and "start on" in p.stderr, p.stderr
    assert path.read_text() == "precious"


@pytest.mark.valgrind
def test_unix_uid_under_valgrind(unix_uid, client, procs, tmp_path):
    path = tmp_path / "uidv.sock"
    srv = procs([*VALGRIND, unix_uid, "-u", "12345", f"unix:{path}"])
    srv.wait_line(r"^listening on ", timeout=90)
    c = run([client, f"unix:{path}"], input="refused\n", check=False, timeout=60)
    assert c.returncode == 1
    srv.wait_line(r"^refuse uid=0 pid=\d+$", timeout=60)
    srv.signal(signal.SIGTERM)
    code, out, err = srv.finish(timeout=120)
    assert code == 0, err
    valgrind_clean(err)


def test_activated_serves_the_socket_its_launcher_passes(activated, launcher, procs, tmp_path):
    srv = procs([launcher, "127.0.0.1:0", activated])
    port = int(srv.wait_line(r"^launcher: listening on port (\d+)$").group(1))
    srv.wait_line(rf"^listening on fd 3 \(port {port}\)$")
    with connect(port) as s:
        s.sendall(frame(b"activated"))
        assert recv_frame(s) == b"activated"
    srv.wait_line(r"^connect \d+ 127\.0\.0\.1:\d+$")
    srv.signal(signal.SIGTERM)
    code, out, err = srv.finish()
    assert code == 0, err
    assert port_closed(port)
    # A Unix socket passed the same way: port 0, peer credentials.
    path = tmp_path / "act.sock"
    srv = procs([launcher, f"unix:{path}", activated])
    srv.wait_line(r"^listening on fd 3 \(port 0\)$")
    with unix_connect(path) as s:
        s.sendall(frame(b"over unix"))
        assert recv_frame(s) == b"over unix"
    srv.wait_line(rf"^connect \d+ unix:pid={os.getpid()},uid={os.getuid()},gid={os.getgid()}$")
    srv.signal(signal.SIGINT)
    assert srv.finish()[0] == 0


def port_closed(port, within=WAIT):
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        except ConnectionRefusedError:
            return True
        time.sleep(0.05)
    return False


def test_activated_under_systemd_socket_activate(activated, procs, tmp_path):
    tool = shutil.which("systemd-socket-activate")
    if not tool:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    path = tmp_path / "sd.sock"
    srv = procs([tool, "-l", str(path), activated])
    end = time.monotonic() + WAIT
    while not path.exists() and time.monotonic() < end:
        time.sleep(0.02)
    with unix_connect(path) as s:  # the first connection starts the program
        s.sendall(frame(b"socket activated"))
        assert recv_frame(s) == b"socket activated"
    srv.wait_line(r"^listening on fd 3 \(port 0\)$")
    srv.signal(signal.SIGTERM)
    code, out, err = srv.finish()
    assert code == 0, err
    assert "signal 15: stopping" in out


def test_activated_without_a_passed_socket_says_so(activated, launcher):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    p = run([activated], check=False, timeout=30, env=env)
    assert p.returncode == 2 and "no socket was passed" in p.stderr
    p = run([activated], check=False, timeout=30, env={**env, "LISTEN_FDS": "1", "LISTEN_PID": "1"})
    assert p.returncode == 2, "LISTEN_PID names another process: not ours"
    # fd 3 passed but not a listening socket: the library says TF_ERR_INVALID
    p = run(["sh", "-c", f'LISTEN_FDS=1 LISTEN_PID=$$ exec "{activated}" 3</dev/null'], check=False, timeout=30)
    assert p.returncode == 1 and "fd:3" in p.stderr, p.stderr
