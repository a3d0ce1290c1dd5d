"""Runs the C reach tests (test_reach.c: prefixes, Unix sockets, fd:N, tf_connect):
one process per C test on both backends, then every case flagged "v" under valgrind
(one valgrind run). Also interop with software this repository did not write: a
tcpframe DNS-over-TCP responder (test_reach --dns-server: 2-byte big-endian prefix)
queried by `dig +tcp` (Debian's dnsutils) and by dnspython; and the README's
one-line build of its 20-line C host, which must run after `cargo build --release`.

    python3 -m pytest -q tests/c/test_c_reach.py
    python3 -m pytest -q tests/c/test_c_reach.py -m "not valgrind"
"""

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time

import pytest

from test_c_examples import (  # noqa: F401  (lib and procs are fixtures)
    INCLUDE,
    ROOT,
    VALGRIND,
    WAIT,
    build_c,
    c_test_cases,
    connect,
    frame,
    lib,
    listed_c_tests,
    procs,
    recv_frame,
    run,
    run_c_tests,
    start_listening,
    valgrind_clean,
)

SOURCE = ROOT / "tests" / "c" / "test_reach.c"
CASES = c_test_cases(SOURCE)


@pytest.fixture(scope="session")
def test_reach(lib):
    return build_c(lib, "test_reach", SOURCE)


def run_cases(exe, names, secs, backend, scale=1, prefix=()):
    p = run_c_tests(exe, names, secs, backend, scale, prefix)
    for line in p.stdout.splitlines():  # SKIPPED reasons, shown with -rA / -s
        if line.startswith("    "):
            print(line)
    return p


def test_every_c_test_is_listed(test_reach):
    assert listed_c_tests(test_reach) == {c[0] for c in CASES}


@pytest.mark.parametrize("backend", ["poll", "epoll"])
@pytest.mark.parametrize("name,secs,flags", CASES, ids=[c[0] for c in CASES])
def test_c(test_reach, name, secs, flags, backend):
    run_cases(test_reach, [name], secs, backend)


VALGRIND_CASES = [c for c in CASES if "v" in c[2]]


@pytest.mark.valgrind
def test_c_under_valgrind(test_reach):
    # The children (fd:N, another uid) are this program exec'd: valgrind does not
    # follow them (no --trace-children); the forks before the exec stay silent.
    names = [c[0] for c in VALGRIND_CASES]
    secs = sum(c[1] for c in VALGRIND_CASES)
    p = run_cases(
        test_reach, names, secs, "epoll", scale=8, prefix=[*VALGRIND, "--child-silent-after-fork=yes"]
    )
    valgrind_clean(p.stderr)


# ---------------------------------------------------------------- DNS over TCP


def dns_server(procs, test_reach, backend="epoll", prefix=()):
    env = {**os.environ, "TF_TEST_BACKEND": backend}
    return start_listening(
        procs, [*prefix, test_reach, "--dns-server", "127.0.0.1:0"], stdin=subprocess.PIPE, env=env
    )


def stop_dns(srv, timeout=WAIT):
    srv.p.stdin.close()  # end of input: the server stops
    code, out, err = srv.finish(timeout=timeout)
    assert code == 0, err
    return out, err


def dig(port, *args):
    if not shutil.which("dig"):
        pytest.skip("dig is not installed (Debian package dnsutils; scripts/deps.sh installs it)")
    p = run(["dig", "+tcp", "+tries=1", "+time=5", "@127.0.0.1", "-p", str(port), *args], timeout=60)
    return p.stdout


ANSWER = re.compile(r"^example\.test\.\s+60\s+IN\s+A\s+192\.0\.2\.1$", re.M)


@pytest.mark.parametrize("backend", ["poll", "epoll"])
def test_dig_queries_a_tcpframe_dns_server(test_reach, procs, backend):
    srv, port = dns_server(procs, test_reach, backend)
    out = dig(port, "example.test", "A")
    assert "status: NOERROR" in out and ANSWER.search(out), out
    assert "ANSWER: 1" in out, out
    out = dig(port, "nope.test", "A")
    assert "status: NXDOMAIN" in out and "ANSWER: 0" in out, out
    # Several queries on one TCP connection (+keepopen): framed back to back.
    out = dig(port, "+keepopen", "example.test", "A", "example.test", "ANY", "other.test", "A")
    assert len(ANSWER.findall(out)) == 2 and out.count("status: NXDOMAIN") == 1, out
    log, _ = stop_dns(srv)
    connects = re.findall(r"^connect \d+ 127\.0\.0\.1:\d+$", log, re.M)
    assert len(connects) == 3, log  # one per dig run: +keepopen reused its connection
    assert re.search(r"^frames_received=5 frames_sent=5$", log, re.M), log


@pytest.mark.valgrind
def test_dig_against_the_dns_server_under_valgrind(test_reach, procs):
    srv, port = dns_server(procs, test_reach, prefix=VALGRIND)
    out = dig(port, "+keepopen", "example.test", "A", "nope.test", "A")
    assert ANSWER.search(out) and "status: NXDOMAIN" in out, out
    log, err = stop_dns(srv, timeout=120)
    valgrind_clean(err)


def test_dnspython_queries_a_tcpframe_dns_server(test_reach, procs):
    dns = pytest.importorskip("dns", reason="dnspython is not installed (pip install dnspython)")
    import dns.message
    import dns.query
    import dns.rcode
    import dns.rdatatype

    srv, port = dns_server(procs, test_reach)
    q = dns.message.make_query("example.test", "A")
    r = dns.query.tcp(q, "127.0.0.1", port=port, timeout=5)
    assert r.id == q.id and r.rcode() == dns.rcode.NOERROR
    (rrset,) = r.answer
    assert rrset.rdtype == dns.rdatatype.A and [a.address for a in rrset] == ["192.0.2.1"]
    assert rrset.ttl == 60

    # Pipelined: three queries in one write on one connection, each answered in order.
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        qs = [dns.message.make_query(n, "A") for n in ("example.test", "nope.test", "EXAMPLE.TEST")]
        wires = [m.to_wire() for m in qs]
        s.sendall(b"".join(struct.pack(">H", len(w)) + w for w in wires))
        for m in qs:
            r, _ = dns.query.receive_tcp(s, expiration=time.time() + 5)
            assert r.id == m.id
        # and one query dribbled a byte at a time
        w = dns.message.make_query("example.test", "A").to_wire()
        data = struct.pack(">H", len(w)) + w
        for i in range(len(data)):
            s.sendall(data[i : i + 1])
            time.sleep(0.001)
        r, _ = dns.query.receive_tcp(s, expiration=time.time() + 5)
        assert [a.address for a in r.answer[0]] == ["192.0.2.1"]
    # dnspython reusing its own connection for two queries
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        for name, code in (("example.test", dns.rcode.NOERROR), ("x.test", dns.rcode.NXDOMAIN)):
            r = dns.query.tcp(dns.message.make_query(name, "A"), "127.0.0.1", sock=s, timeout=5)
            assert r.rcode() == code
    log, _ = stop_dns(srv)
    assert "query example.test type 1" in log and "query nope.test type 1" in log, log


# ---------------------------------------------------------------- the README's C host


def readme_host():
    """The README's 20-line C host and its one-line build command."""
    text = (ROOT / "README.md").read_text()
    sec = text[text.index("## A C host in 20 lines") :]
    code = re.search(r"```c\n(.*?)```", sec, re.S).group(1)
    build = re.search(r"Build: `([^`]*)`", sec).group(1)
    return code, build


def build_and_run_readme_host(root, tmp_path):
    """Compiles the host with the README's exact line from `root` and runs it: it
    loads (the soname resolves through the rpath) and serves, or reports the
    fixed port 5882 busy; it never fails to start for want of libtcpframe.so.0."""
    code, build = readme_host()
    assert build.startswith("cc ") and "host.c" in build, build
    (tmp_path / "host.c").write_text(code)
    cmd = build.replace("$PWD", str(root)).replace("host.c", str(tmp_path / "host.c"))
    run(["sh", "-c", f"{cmd} -o {tmp_path / 'host'}"], cwd=root)
    p = subprocess.Popen([tmp_path / "host"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 1.0
        while p.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        if p.poll() is None:  # serving on 127.0.0.1:5882
            with connect(5882) as s:
                s.sendall(frame(b"readme"))
                assert recv_frame(s) == b"readme"
        else:
            err = p.stderr.read().decode(errors="replace")
            assert "cannot open shared object" not in err, err
            assert p.returncode == 1 and "in use" in err.lower(), (p.returncode, err)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)
        p.stdout.close()
        p.stderr.close()


def test_readme_one_line_build_runs(lib, tmp_path):
    """After cargo build --release, build.rs has put libtcpframe.so.0 next to the
    library: the README's build line gives a program that runs."""
    link = ROOT / "target" / "release" / "libtcpframe.so.0"
    assert link.is_symlink() and os.readlink(link) == "libtcpframe.so", link
    build_and_run_readme_host(ROOT, tmp_path)


@pytest.mark.skipif(
    os.environ.get("TCPFRAME_TEST_FRESH_BUILD") != "1",
    reason="a fresh release build takes about a minute: set TCPFRAME_TEST_FRESH_BUILD=1",
)
def test_readme_one_line_build_runs_after_a_fresh_cargo_build(tmp_path):
    """The papercut of issue 10: `cargo build --release` alone, in a fresh target
    directory (no make, no test fixture), then the README's line."""
    target = tmp_path / "target"
    run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, timeout=1800,
        env={**os.environ, "CARGO_TARGET_DIR": str(target)})  # fmt: skip
    assert (target / "release" / "libtcpframe.so.0").is_symlink()
    root = tmp_path / "root"
    root.mkdir()
    (root / "include").symlink_to(INCLUDE)
    (root / "target").symlink_to(target)
    build_and_run_readme_host(root, tmp_path)
