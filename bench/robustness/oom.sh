#!/usr/bin/env bash
# oom.sh ECHO_SERVER: the adversarial review's repro/oom_repro.sh, bounded and
# with a check that the other connections are still served.
#
# Runs a copy of ECHO_SERVER (examples-c/echo_server.c) from a temporary folder
# under `ulimit -v 400000` (400 MB of address space) on 127.0.0.1 (a free port,
# not the original's fixed 5999). A bystander connection echoes one frame; then
# 100 peers each announce an 8 MiB frame (the default max frame) and send 4 MiB
# of it; then the bystander and a new connection must each echo a frame.
# The original script waits for the server to exit, which never happens when it
# survives; here the server gets SIGINT once the peers are done (and SIGKILL
# 10 s later if it is still there). One line:
#
#   OOM alive_after=yes|no bystander_before=ok bystander=ok|FAIL new_conn=ok|FAIL
#       attackers_sent=N/100 exit=STATUS (0: stopped by SIGINT; 134: aborted,
#       SIGABRT) closed_overload=N (on_close reason 9, from echo_server's
#       "close ID reason=R" lines: it runs without -q) stderr="its first line"
set -u
ECHO=$(readlink -f "$1")
dir=$(mktemp -d /tmp/tf-oom.XXXXXX)
trap 'rm -rf "$dir"' EXIT
cp "$ECHO" "$dir/echo_server"
cd "$dir" || exit 1
(ulimit -v 400000; exec ./echo_server 127.0.0.1:0) >out 2>oom_stderr &
pid=$!
port=
for _ in $(seq 50); do
    port=$(sed -n 's/^listening on port \([0-9]*\).*/\1/p' out)
    [ -n "$port" ] && break
    sleep 0.1
done
if [ -z "$port" ]; then
    echo "OOM status=no-start stderr=\"$(head -1 oom_stderr)\""
    kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    exit 1
fi
res=$(timeout 60 python3 - "$port" <<'PY'
import socket, struct, sys
port = int(sys.argv[1])
def echo(s):
    try:
        s.sendall(struct.pack("<I", 5) + b"hello")
        got = b""
        while len(got) < 9:
            d = s.recv(9 - len(got))
            if not d: return "FAIL"
            got += d
        return "ok" if got[4:] == b"hello" else "FAIL"
    except OSError:
        return "FAIL"
by = socket.create_connection(("127.0.0.1", port), timeout=5)
before = echo(by)
socks, sent = [], 0
for i in range(100):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5); socks.append(s)
        s.sendall(struct.pack("<I", 8 << 20) + b"a" * (4 << 20)); sent += 1
    except OSError:
        pass
after = echo(by)
try:
    new = echo(socket.create_connection(("127.0.0.1", port), timeout=5))
except OSError:
    new = "FAIL"
print(f"bystander_before={before} bystander={after} new_conn={new} attackers_sent={sent}/100")
PY
)
sleep 0.5
if kill -0 "$pid" 2>/dev/null; then alive=yes; kill -INT "$pid"; else alive=no; fi
for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -KILL "$pid" 2>/dev/null
wait "$pid"
rc=$?
echo "OOM alive_after=$alive ${res:-client=FAIL} exit=$rc closed_overload=$(grep -c 'reason=9$' out) stderr=\"$(head -1 oom_stderr | cut -c1-100)\""
