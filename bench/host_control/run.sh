#!/usr/bin/env bash
# bench/host_control/run.sh — figures for per-connection control (issue 13's goals).
# Figures, not pass/fail.
#
#   bench/host_control/run.sh [--quick] [--only fanout,memory,userdata] [--lib DIR] [--rounds N]
#
# Sections:
#   fanout    one 64-byte frame to 1,000 connections: one tf_send_many vs 1,000
#             tf_send calls; CPU of the calling thread (CLOCK_THREAD_CPUTIME_ID)
#             from a host thread and from inside on_message, rounds interleaved,
#             each round written out before the next (fanout.c cpu). Goal: <= 0.25x.
#             Also 1 KiB and 4 KiB payloads (held once and shared from 512 B on).
#   memory    one 1 MiB frame to 1,000 peers that never read (max queued output
#             2 MiB + 64 KiB): VmRSS growth with tf_send_many (goal: about 1 MiB,
#             not 1 GiB) and, for scale, with 1,000 tf_send calls (fanout.c mem).
#   userdata  server CPU per echoed frame (bench/loadgen s2, s3, s5a; servers
#             interleaved, pinned to core 0, load on core 1): ud_echo.c reading
#             tf_conn_user_data and updating the state it points to on every frame,
#             vs the same host keeping that state in a global. Goal: no measurable
#             difference.
#   userdata-ir  the same two hosts under callgrind (needs valgrind): user-space
#             instructions per echoed frame, one frame in flight (one read, one
#             write per frame, so the count does not depend on timing): (Ir at
#             30,000 frames - Ir at 10,000) / 20,000, exact, unlike CPU time on a
#             shared machine; and tf_conn_user_data's own share.
#
# --lib DIR   the libtcpframe.so to measure (default: $CARGO_TARGET_DIR/release,
#             built when missing); bench/run.sh passes its frozen copy.
# --rounds N  loadgen rounds (default BENCH_ROUNDS or 3; --quick: 1). Fan-out:
#             HC_FANOUT_ROUNDS rounds of each variant (default 1000; --quick: 300).
# Output: stdout, $HC_OUT/report.md (default bench/build/host_control/), raw
# outputs in $HC_OUT/raw/. Only 127.0.0.1; every process started is ended by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/bench/host_control
OUT=${HC_OUT:-$ROOT/bench/build/host_control}
QUICK=0
ONLY=fanout,memory,userdata,userdata-ir
LIBDIR=""
ROUNDS=""
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=1 ;;
    --only) shift; ONLY=$1 ;;
    --lib) shift; LIBDIR=$1 ;;
    --rounds) shift; ROUNDS=$1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "host_control/run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }
CC=${CC:-cc}
if [ -z "$LIBDIR" ]; then
    LIBDIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
    [ -f "$LIBDIR/libtcpframe.so" ] || (cd "$ROOT" && cargo build --release --quiet)
fi
[ -e "$LIBDIR/libtcpframe.so.0" ] || ln -sf libtcpframe.so "$LIBDIR/libtcpframe.so.0"
B=$OUT/bin
mkdir -p "$B" "$OUT/raw"
for p in fanout ud_echo; do
    "$CC" -O2 -Wall -I"$ROOT/include" "$HERE/$p.c" -o "$B/$p" -L"$LIBDIR" -ltcpframe -lpthread \
        -Wl,-rpath,"$LIBDIR"
done
REPORT=$OUT/report.md
: > "$REPORT"
say() { echo "$*" | tee -a "$REPORT"; }
field() { sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p" "$2" | head -1; }

if [ "$QUICK" = 1 ]; then FAN_ROUNDS=300; else FAN_ROUNDS=${HC_FANOUT_ROUNDS:-1000}; fi

say "# Per-connection control: figures"
say ""
say "library: $LIBDIR/libtcpframe.so ($(date -u -r "$LIBDIR/libtcpframe.so" '+%Y-%m-%d %H:%M UTC')); machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"

if want fanout; then
    say ""
    say "## Fan-out: one frame to 1,000 connections ($FAN_ROUNDS rounds of each, interleaved)"
    say ""
    say "CPU of the calling thread per round, in microseconds (goal: tf_send_many <= 0.25x):"
    say ""
    say "| payload | backend | where | 1,000 x tf_send | 1 x tf_send_many | ratio |"
    say "|---:|---|---|---:|---:|---:|"
    for size in 64 1024 4096; do
        for backend in epoll poll; do
            [ "$size" != 64 ] && [ "$backend" = poll ] && continue
            f=$OUT/raw/fanout-$size-$backend.txt
            "$B/fanout" cpu -n 1000 -r "$FAN_ROUNDS" -s "$size" -b "$backend" > "$f"
            say "| $size B | $backend | host thread | $(field host_send_us_per_round "$f") | $(field host_many_us_per_round "$f") | **$(field host_ratio "$f")** |"
            say "| $size B | $backend | in on_message | $(field cb_send_us_per_round "$f") | $(field cb_many_us_per_round "$f") | **$(field cb_ratio "$f")** |"
        done
    done
fi

if want memory; then
    say ""
    say "## Memory: one 1 MiB frame to 1,000 peers that never read"
    say ""
    say "| how | VmRSS growth | call time | MemAvailable drop (kernel socket buffers included) | written to the kernel |"
    say "|---|---:|---:|---:|---:|"
    for mode in many each; do
        f=$OUT/raw/memory-$mode.txt
        "$B/fanout" mem -n 1000 -s 1048576 -m "$mode" > "$f"
        label=$([ "$mode" = many ] && echo "1 x tf_send_many" || echo "1,000 x tf_send")
        say "| $label | **$(field rss_growth_mib "$f") MiB** | $(field call_ms "$f") ms | $(field memavailable_drop_mib "$f") MiB | $(field bytes_written_to_kernel_mib "$f") MiB |"
    done
    say ""
    say "VmRSS is this process's memory: with tf_send_many the payload is held once. The"
    say "kernel still copies into each socket's send buffer what the peer's window and"
    say "tcp_wmem ($(cat /proc/sys/net/ipv4/tcp_wmem | tr '\t' ' ')) let it take; that is the MemAvailable column."
fi

if want userdata; then
    say ""
    say "## User data inside on_message: server CPU per echoed frame (bench/loadgen)"
    LOADGEN=$ROOT/bench/build/target/release/loadgen
    if [ ! -x "$LOADGEN" ]; then
        CARGO_TARGET_DIR="$ROOT/bench/build/target" cargo build --release --quiet \
            --manifest-path "$ROOT/bench/loadgen/Cargo.toml"
    fi
    PIN=(taskset -c 1)
    CPU=0
    if ! command -v taskset > /dev/null || [ "$(nproc)" -lt 2 ]; then PIN=(); CPU=none; fi
    LG_ARGS=(--only s2,s3,s5a)
    [ "$QUICK" = 1 ] && LG_ARGS+=(--quick)
    [ -n "$ROUNDS" ] && LG_ARGS+=(--rounds "$ROUNDS")
    [ "$QUICK" = 1 ] && [ -z "$ROUNDS" ] && LG_ARGS+=(--rounds 1)
    rm -rf "$OUT/userdata"
    "${PIN[@]}" "$LOADGEN" bench --out "$OUT/userdata" --server-cpu "$CPU" \
        --server "plain=$B/ud_echo -b epoll" \
        --server "userdata=$B/ud_echo -u -b epoll" \
        "${LG_ARGS[@]}" > "$OUT/raw/userdata.txt" 2>&1 || { cat "$OUT/raw/userdata.txt" >&2; exit 1; }
    say ""
    say "| scenario | plain us-CPU/frame | userdata us-CPU/frame | userdata / plain | rounds | other CPU % (median) |"
    say "|---|---:|---:|---:|---:|---:|"
    python3 - "$OUT/userdata/results.tsv" <<'PY' | tee -a "$REPORT"
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
by, other = {}, {}
for r in rows:
    if len(r) > 13 and r[4] == "1":
        by.setdefault((r[2], r[3]), {}).setdefault(r[1], []).append(float(r[9]))
        other.setdefault((r[2], r[3]), []).append(float(r[13]))
for (key, label), v in by.items():
    if "plain" in v and "userdata" in v:
        p, u = statistics.median(v["plain"]), statistics.median(v["userdata"])
        o = statistics.median(other[(key, label)])
        print(f"| {label} | {p:.3f} | {u:.3f} | **{u / p:.3f}** | {len(v['plain'])} | {o:.1f} |")
PY
    say ""
    say "Medians over rounds; the servers' own CPU (utime+stime of the process) over each"
    say "measured window. Differences within a few percent are this machine's noise (bench/README.md)."
fi
if want userdata-ir && command -v valgrind > /dev/null; then
    say ""
    say "## User data inside on_message: instructions per echoed frame (callgrind)"
    say ""
    say "| host | Ir per frame | of which tf_conn_user_data |"
    say "|---|---:|---:|"
    # One connection, 64-byte frames, one in flight; each server run to the end.
    drive() { # drive PORT FRAMES
        python3 - "$1" "$2" <<'PY'
import socket, struct, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port), timeout=120)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = struct.pack("<I", 64) + bytes(64)
sent = got = 0
buf = b""
while got < n:
    while sent < n and sent - got < 1:
        s.sendall(f); sent += 1
    buf += s.recv(65536)
    k = len(buf) // 68
    got += k
    buf = buf[k * 68:]
s.close()
PY
    }
    for mode in plain userdata; do
        flag=$([ "$mode" = userdata ] && echo "-u" || true)
        declare -A IR=() UD=()
        for frames in 10000 30000; do
            cg=$OUT/raw/callgrind-$mode-$frames.out
            log=$OUT/raw/callgrind-$mode-$frames.log
            valgrind --tool=callgrind --callgrind-out-file="$cg" "$B/ud_echo" $flag -b epoll 127.0.0.1:0 > "$log" 2>&1 &
            pid=$!
            for _ in $(seq 600); do grep -q "listening on port" "$log" 2>/dev/null && break; sleep 0.1; done
            port=$(sed -n 's/^listening on port \([0-9]*\)$/\1/p' "$log")
            drive "$port" "$frames"
            kill -INT "$pid"
            wait "$pid" || true
            IR[$frames]=$(sed -n 's/^summary: \([0-9]*\).*/\1/p' "$cg")
            UD[$frames]=$({ callgrind_annotate --inclusive=yes "$cg" 2>/dev/null || true; } |
                awk '/tf_conn_user_data/ {gsub(",", "", $1); print $1; exit}')
        done
        per=$(python3 -c "print(f'{(${IR[30000]} - ${IR[10000]}) / 20000:.0f}')")
        ud=$(python3 -c "a='${UD[30000]:-0}'; b='${UD[10000]:-0}'; print(f'{(int(a or 0) - int(b or 0)) / 20000:.0f}')")
        say "| $mode | $per | $ud |"
    done
fi
echo >&2
echo "report: $REPORT" >&2
