#!/usr/bin/env python3
"""amp.py RTHOST N K [RTHOST ARGS...]: memory held for partial inbound frames.

N peers each connect to `RTHOST -c 5000 [ARGS]` (127.0.0.1; the server
pinned to core 0, the client to core 1), announce an 8 MiB
frame and send K bytes of it, then hold the connection open. When the server
has read what it is going to read (bytes_in unchanged for 1 s, at most 40 s),
the server's VmRSS / VmHWM are read; then every peer closes, and the server's
closes by reason (including TF_CLOSE_OVERLOAD = 9) are collected. One line:

  AMP n=N k=K rss_mib=.. hwm_mib=.. read_mib=.. active=.. overload=.. peer=..
      other_closes=.. send_errors=.. read_s=.. rss_after_close_mib=.. status=ok|deadline

read_mib = bytes the server read in all (bytes_in), MiB; `active` = connections
still open before the peers closed; rss_after_close_mib: VmRSS 2 s after the
last connection closed. Adapted from the adversarial review's
repro/amp2.py (which stops at the first send error and counts closes only up
to reason 7). Every wait is bounded; only 127.0.0.1.
"""
import os
import socket
import struct
import subprocess
import sys
import time

if len(sys.argv) < 4:
    sys.exit("usage: amp.py RTHOST N K [RTHOST ARGS...]")
RTHOST, N, K, EXTRA = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]

# Server on core 0, this client on core 1 (as the rest of the benchmark).
PIN = (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")
srv = subprocess.Popen([RTHOST, "-c", "5000"] + EXTRA, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True,
                       preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if PIN else None)
if PIN:
    os.sched_setaffinity(0, {1})


def status_mib(key):
    with open(f"/proc/{srv.pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0
    return -1.0


def sstats():
    srv.stdin.write("s\n")
    srv.stdin.flush()
    line = srv.stdout.readline().strip()
    return dict(kv.split("=", 1) for kv in line.split())


status = "ok"
socks = []
send_errors = 0
try:
    port = int(srv.stdout.readline())
    chunk = struct.pack("<I", 8 << 20) + b"\xab" * K
    t0 = time.time()
    for i in range(N):
        if time.time() - t0 > 60:
            status = "deadline"
            break
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
            s.sendall(chunk)
        except OSError:
            send_errors += 1  # e.g. reset: the server closed it (overload)
    t1 = time.time()
    last, since = -1, time.time()
    while True:
        st = sstats()
        got = int(st["bytes_in"])
        if got != last:
            last, since = got, time.time()
        if time.time() - since >= 1.0:
            break
        if time.time() - t1 > 40:
            status = "deadline"
            break
        time.sleep(0.1)
    read_s = since - t0
    rss, hwm = status_mib("VmRSS:"), status_mib("VmHWM:")
    active = int(st["active"])
finally:
    for s in socks:
        s.close()
    t2 = time.time()
    rss_after = -1.0
    try:
        while time.time() - t2 < 30 and int(sstats()["active"]) != 0:
            time.sleep(0.1)
        time.sleep(2)  # the loop gives memory back after a quiet second
        rss_after = status_mib("VmRSS:")
    except (BrokenPipeError, ValueError, KeyError, OSError):
        pass
    try:
        srv.stdin.close()
    except BrokenPipeError:
        pass
    try:
        srv.wait(timeout=30)
    except subprocess.TimeoutExpired:
        srv.kill()
        srv.wait()
        status = "killed"

closes = {}
for line in srv.stdout.read().splitlines():
    if line.startswith("closes "):
        closes = dict(kv.split("=", 1) for kv in line.split()[1:])
other = sum(int(v) for k, v in closes.items() if k not in ("overload", "peer"))
print(f"AMP n={N} k={K} rss_mib={rss:.0f} hwm_mib={hwm:.0f} read_mib={last / 1048576:.0f} "
      f"active={active} overload={closes.get('overload', '?')} peer={closes.get('peer', '?')} "
      f"other_closes={other} send_errors={send_errors} read_s={read_s:.1f} rss_after_close_mib={rss_after:.0f} "
      f"status={status}")
