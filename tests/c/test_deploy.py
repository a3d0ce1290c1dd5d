"""The deployment of examples-c/deploy/, run for real: HAProxy (Debian's package,
installed by scripts/deps.sh) terminates TLS with a certificate made here, and
balances with PROXY v2 and health checks over three instances
(examples-c/deploy/instance.c); rolling_restart.sh restarts each instance once
while TLS clients send frames without pause, over long-lived connections (each
reconnects after a while, so that a drained instance empties) and short ones.

Checked: every frame sent came back, unchanged; no client saw an error; the
instances logged each client's real address (127.0.0.1 and the client's own
source port, from the PROXY header: not HAProxy's address) with the number of
frames it sent; each instance was restarted exactly once, drained by itself
(no SIGTERM needed), and each of the six instance processes served clients.

Everything listens on 127.0.0.1 only, runs as the current user from a temporary
directory, and is ended by PID. About 20 s.

    python3 -m pytest -q tests/c/test_deploy.py -s     # -s: the figures
"""

import collections
import os
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

from test_c_examples import EXAMPLES, ROOT, VALGRIND, build_c, lib, run, valgrind_clean  # noqa: F401

DEPLOY = EXAMPLES / "deploy"
SCRIPT = DEPLOY / "rolling_restart.sh"
NAMES = ["s1", "s2", "s3"]
LONG_CLIENTS = 8  # connections of 100-200 frames, 3 ms apart, then a new one
SHORT_CLIENTS = 3  # connections of 1-3 frames
WARM_UP = 3.0  # seconds of traffic before the restart, and after it
SETTLE = "0.3"  # seconds between HAProxy's `state drain` and SIGUSR1
# Debian puts haproxy in /usr/sbin, which a user's PATH may lack.
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/local/sbin:/usr/sbin")


def free_ports(n):
    """n distinct free ports on 127.0.0.1 (held together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def haproxy_cli(admin_port, command):
    """One command on HAProxy's admin socket (it answers and closes)."""
    with socket.create_connection(("127.0.0.1", admin_port), timeout=5) as s:
        s.sendall(command.encode() + b"\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.decode()


def server_stats(admin_port):
    """{server name: its `show stat` row as a dict} for the tcpframe backend."""
    lines = haproxy_cli(admin_port, "show stat").splitlines()
    cols = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(cols, line.split(","))) for line in lines[1:] if line]
    return {r["svname"]: r for r in rows if r.get("pxname") == "tcpframe" and r["svname"] in NAMES}


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def log_pids(run_dir):
    pids = []
    for name in NAMES:
        log = run_dir / f"{name}.log"
        if log.exists():
            pids += [int(p) for p in re.findall(r"^listening .* pid=(\d+)$", log.read_text(), re.M)]
    return pids


def end_instances(run_dir):
    """SIGTERM, then SIGKILL, every instance process the logs name (started here)."""
    pids = [p for p in log_pids(run_dir) if alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.05)
        pids = [p for p in pids if alive(p)]


@pytest.fixture
def deployment(lib, tmp_path):
    for tool in ("haproxy", "openssl", "setsid"):
        path = HAPROXY if tool == "haproxy" else shutil.which(tool)
        assert path, f"{tool} is missing: run scripts/deps.sh (as root it installs it)"
    instance = build_c(lib, "instance", DEPLOY / "instance.c")
    # A self-signed certificate for 127.0.0.1 / localhost, made for this run.
    cert, key, pem = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "site.pem"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], timeout=60)  # fmt: skip
    pem.write_text(cert.read_text() + key.read_text())
    front, admin, *sports = free_ports(2 + len(NAMES))
    addrs = {n: f"127.0.0.1:{p}" for n, p in zip(NAMES, sports)}
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "FRONT": f"127.0.0.1:{front}",
        "CERT": str(pem),
        "HAPROXY_ADMIN": f"ipv4@127.0.0.1:{admin}",
        **{n.upper(): a for n, a in addrs.items()},
        "INSTANCE": str(instance),
        "INSTANCE_ARGS": "-c 64",  # max connections per (PROXY) client IP
        "RUN_DIR": str(run_dir),
        "SETTLE": SETTLE,
        "DRAIN_TIMEOUT": "20",
        "UP_TIMEOUT": "10",
    }
    specs = [f"{n}={a}" for n, a in addrs.items()]
    cfg = DEPLOY / "haproxy.cfg"
    run([HAPROXY, "-c", "-q", "-f", cfg], env=env, timeout=30)
    hap = None
    hap_log = tmp_path / "haproxy.out"
    try:
        run([SCRIPT, "start", *specs], env=env, timeout=60)
        with open(hap_log, "w") as out:
            hap = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], env=env, stdout=out, stderr=out)
        end = time.monotonic() + 20
        while True:
            try:
                st = server_stats(admin)
                if len(st) == 3 and all(r["status"] == "UP" for r in st.values()):
                    break
            except OSError:
                pass
            if hap.poll() is not None or time.monotonic() > end:
                pytest.fail(f"HAProxy never saw three instances up:\n{hap_log.read_text()}")
            time.sleep(0.05)
        yield {"front": front, "admin": admin, "env": env, "specs": specs, "run_dir": run_dir,
               "cert": cert, "addrs": addrs, "haproxy": hap, "haproxy_log": hap_log}  # fmt: skip
    finally:
        if hap is not None and hap.poll() is None:
            hap.terminate()
            try:
                hap.wait(timeout=10)
            except subprocess.TimeoutExpired:
                hap.kill()
                hap.wait(timeout=10)
        end_instances(run_dir)


class Traffic:
    """TLS clients through HAProxy; every frame is checked against its echo."""

    def __init__(self, front, cafile):
        self.front = front
        self.ctx = ssl.create_default_context(cafile=str(cafile))  # verifies, host name included
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = self.replied = 0
        self.errors = []
        self.conns = []  # (client's source port, frames, kind)
        self.threads = [
            threading.Thread(target=self.client, args=(i, i < LONG_CLIENTS), daemon=True)
            for i in range(LONG_CLIENTS + SHORT_CLIENTS)
        ]

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in self.threads), "a client thread hangs"

    @staticmethod
    def recv_exact(s, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def client(self, idx, long_lived):
        rnd = random.Random(idx)
        conn_no = 0
        while not self.stop.is_set():
            conn_no += 1
            frames = rnd.randint(100, 200) if long_lived else rnd.randint(1, 3)
            done, port = 0, None
            try:
                raw = socket.create_connection(("127.0.0.1", self.front), timeout=10)
                port = raw.getsockname()[1]
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self.ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    for i in range(frames):
                        payload = f"{idx}/{conn_no}/{i}/".encode() + rnd.randbytes(rnd.randint(0, 300))
                        s.sendall(struct.pack("<I", len(payload)) + payload)
                        with self.lock:
                            self.sent += 1
                        (n,) = struct.unpack("<I", self.recv_exact(s, 4))
                        reply = self.recv_exact(s, n)
                        if reply != payload:
                            raise AssertionError(f"echo differs: sent {payload[:40]!r}, got {reply[:40]!r}")
                        with self.lock:
                            self.replied += 1
                        done += 1
                        if long_lived:
                            time.sleep(0.003)
            except Exception as e:  # noqa: BLE001 - every failure is the finding
                with self.lock:
                    self.errors.append(f"client {idx} connection {conn_no} (port {port}) frame {done}: {e!r}")
            with self.lock:
                self.conns.append((port, done, "long" if long_lived else "short"))


def parse_log(text):
    """[(pid, [close lines as (port, frames)], drained, draining_active)] per process, in order."""
    gens = []
    for line in text.splitlines():
        if m := re.match(r"listening address=\S+ pid=(\d+)$", line):
            gens.append({"pid": int(m.group(1)), "closes": [], "drained": None, "active": None})
        elif m := re.match(r"close id=\d+ peer=(\S+) frames=(\d+) reason=-?\d+$", line):
            gens[-1]["closes"].append((m.group(1), int(m.group(2))))
        elif m := re.match(r"draining active=(\d+)$", line):
            gens[-1]["active"] = int(m.group(1))
        elif m := re.match(r"drained ms=(\d+)$", line):
            gens[-1]["drained"] = int(m.group(1))
    return gens


@pytest.mark.timeout(180)
def test_rolling_restart_behind_haproxy_with_tls_loses_nothing(deployment):
    d = deployment
    t0 = time.monotonic()
    traffic = Traffic(d["front"], d["cert"])
    traffic.start()
    try:
        time.sleep(WARM_UP)
        r = subprocess.run(
            [str(SCRIPT), "restart", *d["specs"]], env=d["env"], capture_output=True, text=True, timeout=120
        )
        restart_s = time.monotonic() - t0 - WARM_UP
        time.sleep(WARM_UP)
    finally:
        traffic.finish()
    print(f"\n{r.stdout}", end="")
    assert r.returncode == 0, f"rolling_restart.sh exited {r.returncode}\n{r.stdout}\n{r.stderr}"

    # Every frame came back unchanged, and no client saw an error.
    assert traffic.errors == [], "\n".join(traffic.errors[:20])
    assert traffic.sent == traffic.replied
    longs = [c for c in traffic.conns if c[2] == "long"]
    shorts = [c for c in traffic.conns if c[2] == "short"]
    assert traffic.sent > 1000 and len(longs) >= 20 and len(shorts) >= 50, (traffic.sent, len(traffic.conns))

    # The instances saw each client as itself: 127.0.0.1 and the client's own port
    # (the PROXY header's address), with the frames that client sent.
    run_dir = d["run_dir"]
    want = collections.Counter((f"127.0.0.1:{port}", n) for port, n, _ in traffic.conns)
    end = time.monotonic() + 10
    while True:  # the last closes are logged a moment after the clients leave
        logs = {n: parse_log((run_dir / f"{n}.log").read_text()) for n in NAMES}
        seen = collections.Counter(c for gens in logs.values() for g in gens for c in g["closes"] if c[1] > 0)
        if not want - seen or time.monotonic() > end:
            break
        time.sleep(0.1)
    missing = want - seen
    assert not missing, f"client connections no instance logged by their address: {list(missing)[:10]}"
    client_peers = set(want)
    strangers = [c for c in seen if c not in client_peers]
    assert not strangers, f"frames from addresses no client had (HAProxy's?): {strangers[:10]}"

    # Each instance was restarted once, drained by itself, and both its processes served clients.
    for name, gens in logs.items():
        assert len(gens) == 2, f"{name}: {len(gens)} processes, want 2 (one restart)"
        old, new = gens
        assert old["pid"] != new["pid"]
        drained = old["active"] is not None and old["drained"] is not None
        assert drained, f"{name}: did not drain by itself: {old}"
        assert new["drained"] is None
        for g in gens:
            assert sum(1 for c in g["closes"] if c[1] > 0) > 0, f"{name} pid {g['pid']} served no client"
    # At least one instance still had clients when it was drained: they were served on.
    assert sum(g[0]["active"] for g in logs.values()) > 0, logs

    # HAProxy: all three up again, and it never had to retry or redispatch a connection.
    st = server_stats(d["admin"])
    assert all(r["status"] == "UP" for r in st.values()), {n: r["status"] for n, r in st.items()}
    retries = {n: (r["wretr"], r["wredis"]) for n, r in st.items()}
    total = time.monotonic() - t0
    print(
        f"frames {traffic.sent} over {len(longs)} long and {len(shorts)} short TLS connections; "
        f"restart of 3 instances {restart_s:.1f} s; drained: "
        + ", ".join(f"{n} {g[0]['active']} open, {g[0]['drained']} ms" for n, g in logs.items())
        + f"; HAProxy retries/redispatches {retries}; traffic {total:.1f} s"
    )


def test_readme_haproxy_snippet_is_the_tested_configuration():
    """The README's HAProxy lines are lines of examples-c/deploy/haproxy.cfg."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploying past one machine", 1)
    assert len(section) == 2, "README has no 'Deploying past one machine' section"
    snippet = re.search(r"```haproxy\n(.*?)```", section[1], re.S)
    assert snippet, "no ```haproxy block in the section"
    cfg = {line.strip() for line in (DEPLOY / "haproxy.cfg").read_text().splitlines()}
    lines = [line.strip() for line in snippet.group(1).splitlines() if line.strip() and line.strip() != "..."]
    stray = [line for line in lines if line not in cfg]
    assert not stray, f"README lines not in examples-c/deploy/haproxy.cfg: {stray}"


# ---------------------------------------------------------------- the instance alone


def proxy_v2_tcp4(src, sport, dport):
    """A PROXY v2 header, as HAProxy's send-proxy-v2 writes it for a TCP/IPv4 client."""
    body = socket.inet_aton(src) + socket.inet_aton("127.0.0.1") + struct.pack(">HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack(">H", len(body)) + body


def frame(payload):
    return struct.pack("<I", len(payload)) + payload


def echo(s, payload):
    s.sendall(frame(payload))
    (n,) = struct.unpack("<I", Traffic.recv_exact(s, 4))
    assert Traffic.recv_exact(s, n) == payload


def start_instance(lib, tmp_path, prefix=()):
    """(process, port, log path, pid file) of an instance that listens."""
    instance = build_c(lib, "instance", DEPLOY / "instance.c")
    (port,) = free_ports(1)
    log, pidf = tmp_path / "i.log", tmp_path / "i.pid"
    p = subprocess.Popen([*prefix, str(instance), "-l", str(log), "-p", str(pidf), f"127.0.0.1:{port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    end = time.monotonic() + 60
    while not pidf.exists():
        assert p.poll() is None and time.monotonic() < end, f"instance not listening: {p.communicate()[1]}"
        time.sleep(0.05)
    assert int(pidf.read_text()) == p.pid
    return p, port, log, pidf


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return False
    except ConnectionRefusedError:
        return True


@pytest.mark.valgrind
def test_instance_drains_on_sigusr1_under_valgrind(lib, tmp_path):
    """SIGUSR1: listener closed at once, the open connection served on, exit 0 when
    it closes, pid file removed; the client logged by its PROXY address; no leak."""
    p, port, log, pidf = start_instance(lib, tmp_path, prefix=VALGRIND)
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=30)
        c.sendall(proxy_v2_tcp4("203.0.113.7", 41000, port) + frame(b"first"))
        (n,) = struct.unpack("<I", Traffic.recv_exact(c, 4))
        assert Traffic.recv_exact(c, n) == b"first"
        p.send_signal(signal.SIGUSR1)
        end = time.monotonic() + 30
        while not refused(port):
            assert time.monotonic() < end, "still listening after SIGUSR1"
            time.sleep(0.05)
        echo(c, b"served on while draining")
        time.sleep(0.5)
        assert p.poll() is None, "exited with a connection still open"
        assert pidf.exists()
        c.close()
        assert p.wait(timeout=60) == 0
        valgrind_clean(p.communicate(timeout=10)[1])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    text = log.read_text()
    assert re.search(r"^connect id=\d+ peer=203\.0\.113\.7:41000$", text, re.M), text
    assert re.search(r"^close id=\d+ peer=203\.0\.113\.7:41000 frames=2 reason=0$", text, re.M), text
    assert re.search(r"^draining active=1$", text, re.M) and re.search(r"^drained ms=\d+$", text, re.M), text
    # (rejected: the probes of the port that came before the drain, without a header)
    stopped = r"^stopped pid=\d+ accepted=1 rejected=\d+ frames_received=2 frames_sent=2$"
    assert re.search(stopped, text, re.M), text
    assert not pidf.exists()


def test_instance_stops_on_sigterm_and_refuses_a_missing_header(lib, tmp_path):
    """SIGTERM with a client connected: exit 0, that client closed (TF_CLOSE_SHUTDOWN);
    a connection that is not from the balancer (no PROXY header) is refused."""
    p, port, log, pidf = start_instance(lib, tmp_path)
    try:
        bad = socket.create_connection(("127.0.0.1", port), timeout=10)
        bad.sendall(frame(b"no header"))
        try:
            assert bad.recv(100) == b"", "a connection without a PROXY header was answered"
        except ConnectionResetError:
            pass  # closed with our bytes unread: a reset, also a refusal
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.sendall(proxy_v2_tcp4("198.51.100.9", 5000, port))
        echo(c, b"hello")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0
        assert c.recv(100) == b""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    text = log.read_text()
    assert re.search(r"^close id=\d+ peer=198\.51\.100\.9:5000 frames=1 reason=2$", text, re.M), text
    assert re.search(r"^stopped pid=\d+ accepted=1 rejected=1 ", text, re.M), text
    assert not pidf.exists()
