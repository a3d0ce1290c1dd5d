#!/usr/bin/env bash
# bench/run.sh — build the benchmark's servers in release mode and compare them.
#
#   bench/run.sh [--quick] [--rounds N] [--only s1,s3,...] [--no-build]
#
# Servers (each scenario gets a fresh process, pinned with taskset -c 0; the
# load generator runs on core 1; servers interleaved A B C D, A B C D, ...):
#   tcpframe       examples-c/echo_server.c -b epoll, against target/release/libtcpframe.so
#   tcpframe-poll  the same with -b poll
#   epoll_c        bench/epoll_echo.c, the hand-written floor
#   tokio          bench/tokio-echo (tokio + LengthDelimitedCodec, current_thread)
# Scenario s7 (tf_send from a host thread) runs bench/push_host.c for the
# tcpframe servers only.
#
# Environment: BENCH_ROUNDS (default 3; --quick: 1), BENCH_WARMUP_MS, BENCH_MEASURE_MS,
# BENCH_OUT (default bench/build/results), BENCH_WAIT_IDLE (seconds to wait for
# other compilers on the machine to finish, default 120), BENCH_MAX_WAIT /
# BENCH_NOISE_PCT / BENCH_RETRIES (waiting for a quiet machine, see README),
# BENCH_ECHO_ARGS (extra echo_server options), CARGO_TARGET_DIR (where the main
# crate's release build lives, default ./target).
# Output: a table on stdout, BENCH_OUT/report.md, BENCH_OUT/results.tsv (raw
# rows), BENCH_OUT/logs/ (server output).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/bench
BUILD=$BENCH/build
OUT=${BENCH_OUT:-$BUILD/results}
QUICK=0
BUILD_FIRST=1
LOADGEN_ARGS=()
ORIG_ARGS="$*"
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=1; LOADGEN_ARGS+=(--quick) ;;
    --rounds) shift; LOADGEN_ARGS+=(--rounds "$1") ;;
    --only) shift; LOADGEN_ARGS+=(--only "$1") ;;
    --no-build) BUILD_FIRST=0 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ] && [ -z "${BENCH_ROUNDS:-}" ]; then
    export BENCH_ROUNDS=1
fi

mkdir -p "$BUILD/lib" "$OUT"
MAIN_TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
CC=${CC:-cc}

if [ "$BUILD_FIRST" = 1 ]; then
    echo "== building (release)" >&2
    # what is measured: the tree as it is now (recorded for the report footer)
    { git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none; } > "$BUILD/lib/BUILT_FROM"
    git -C "$ROOT" diff --quiet HEAD -- src examples-c 2>/dev/null || echo " + uncommitted changes in src/ or examples-c/" >> "$BUILD/lib/BUILT_FROM"
    (cd "$ROOT" && cargo build --release --quiet)
    # Freeze a copy of the library for this run (a rebuild during the run must
    # not change what is measured); the soname is libtcpframe.so.0.
    cp -f "$MAIN_TARGET/release/libtcpframe.so" "$BUILD/lib/libtcpframe.so.0"
    ln -sf libtcpframe.so.0 "$BUILD/lib/libtcpframe.so"
    "$CC" -O2 -Wall -I"$ROOT/include" "$ROOT/examples-c/echo_server.c" -o "$BUILD/echo_server" \
        -L"$BUILD/lib" -ltcpframe -lpthread -Wl,-rpath,"$BUILD/lib"
    "$CC" -O2 -Wall -I"$ROOT/include" "$BENCH/push_host.c" -o "$BUILD/push_host" \
        -L"$BUILD/lib" -ltcpframe -lpthread -Wl,-rpath,"$BUILD/lib"
    "$CC" -O2 -Wall "$BENCH/epoll_echo.c" -o "$BUILD/epoll_echo"
    CARGO_TARGET_DIR="$BUILD/target" cargo build --release --quiet --manifest-path "$BENCH/tokio-echo/Cargo.toml"
    CARGO_TARGET_DIR="$BUILD/target" cargo build --release --quiet --manifest-path "$BENCH/loadgen/Cargo.toml"
    # let the build's write-back settle: the first scenario measured noisy without it
    sync
    sleep 3
fi
for b in echo_server push_host epoll_echo target/release/tokio-echo target/release/loadgen; do
    [ -x "$BUILD/$b" ] || { echo "run.sh: $BUILD/$b is missing (run without --no-build)" >&2; exit 1; }
done

# Other engineers share this machine: a concurrent compile makes the numbers noise.
COMPILERS="rustc cargo cc1 cc1plus ld ld.lld ld.gold collect2 clang"
busy_pids() { for n in $COMPILERS; do pgrep -x "$n" 2>/dev/null || true; done; }
busy_procs() { busy_pids | wc -l; }
wait_idle=${BENCH_WAIT_IDLE:-120}
for ((i = 0; i < wait_idle; i++)); do
    [ "$(busy_procs)" -eq 0 ] && break
    if [ "$i" -eq 0 ]; then
        echo "== waiting (up to ${wait_idle}s) for other compilers to finish:" >&2
        ps -o pid,etime,comm -p "$(busy_pids | paste -sd, -)" >&2 || true
    fi
    sleep 1
done
if [ "$(busy_procs)" -ne 0 ]; then
    echo "run.sh: WARNING: compilers still running; results will be noisy (see 'other CPU %')" >&2
fi

# 10,000 idle connections need that many descriptors in the server and in the loadgen.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -gt 65536 ]; then hard=65536; fi
ulimit -n "$hard" || true
if [ "$(ulimit -n)" -lt 10100 ]; then
    echo "run.sh: WARNING: RLIMIT_NOFILE is $(ulimit -n); s5/s8 will hold fewer idle connections" >&2
fi

PIN_LOADGEN=(taskset -c 1)
SERVER_CPU=0
if ! command -v taskset >/dev/null || [ "$(nproc)" -lt 2 ]; then
    echo "run.sh: WARNING: no taskset or fewer than 2 cores: not pinning" >&2
    PIN_LOADGEN=()
    SERVER_CPU=none
fi

# tcpframe's default max_connections is 4096: s5b (5,000 idle) and s8 (10,000)
# need more. echo_server takes -c MAX_CONNECTIONS; BENCH_ECHO_ARGS overrides.
ECHO_ARGS=${BENCH_ECHO_ARGS-}
if [ -z "${BENCH_ECHO_ARGS+x}" ] && "$BUILD/echo_server" -h 2>&1 | grep -q -- '-c MAX_CONNECTIONS'; then
    ECHO_ARGS="-c 20000"
fi
if [ -z "$ECHO_ARGS" ] && [ -z "${BENCH_ECHO_ARGS+x}" ]; then
    echo "run.sh: note: echo_server has no -c MAX_CONNECTIONS option: tcpframe may hold only 4096 connections in s5b/s8 (the rest are refused and reported)" >&2
fi

echo "== load avg: $(cut -d' ' -f1-3 /proc/loadavg); running" >&2
"${PIN_LOADGEN[@]}" "$BUILD/target/release/loadgen" bench --out "$OUT" --server-cpu "$SERVER_CPU" \
    --server "tcpframe=$BUILD/echo_server -q -b epoll $ECHO_ARGS" \
    --server "tcpframe-poll=$BUILD/echo_server -q -b poll $ECHO_ARGS" \
    --server "epoll_c=$BUILD/epoll_echo" \
    --server "tokio=$BUILD/target/release/tokio-echo" \
    --push "tcpframe=$BUILD/push_host -b epoll" \
    --push "tcpframe-poll=$BUILD/push_host -b poll" \
    ${LOADGEN_ARGS[@]+"${LOADGEN_ARGS[@]}"}

{
    echo
    echo "Produced by: bench/run.sh $ORIG_ARGS (BENCH_ROUNDS=${BENCH_ROUNDS:-3}) on $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "library and echo_server built from: $(tr -d '\n' < "$BUILD/lib/BUILT_FROM" 2>/dev/null || echo unknown) at $(date -u -r "$BUILD/lib/libtcpframe.so.0" '+%H:%M UTC' 2>/dev/null || echo '?')"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
} | tee -a "$OUT/report.md"
