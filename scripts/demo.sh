#!/usr/bin/env bash
# The demo: the C echo server (examples-c/echo_server.c, linked to
# libtcpframe.so) on a free port, a few lines through the C client, then
# SIGINT, which makes the server print its counters and stop cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp)
build/echo_server 127.0.0.1:0 >"$out" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$out"' EXIT
for _ in $(seq 1 100); do
  grep -q "listening on port" "$out" && break
  sleep 0.05
done
port=$(sed -n 's/.*listening on port \([0-9]*\).*/\1/p' "$out")
[ -n "$port" ] || { echo "the echo server did not start:"; cat "$out"; exit 1; }
echo "== echo_server listening on 127.0.0.1:$port; sending three frames with examples-c/client.c"
printf 'hello, tcpframe\nframes are length-prefixed\nbye\n' | timeout 10 build/client "127.0.0.1:$port"
sleep 0.2
kill -INT "$server"
wait "$server"
echo "== echo_server's own output (connects, closes, stats at SIGINT):"
cat "$out"
