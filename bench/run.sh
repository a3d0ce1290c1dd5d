#!/usr/bin/env bash
# bench/run.sh — build the benchmark's servers in release mode and compare them.
#
#   bench/run.sh [--quick] [--rounds N] [--only s1,s3,...,t1,rob,py] [--no-build] [--no-threads] [--no-robustness] [--no-python]
#
# Servers (each scenario gets a fresh process, pinned with taskset -c 0; the
# load generator runs on core 1; servers interleaved A B C D, A B C D, ...):
#   tcpframe       examples-c/echo_server.c -b epoll, against target/release/libtcpframe.so
#   tcpframe-poll  the same with -b poll
#   epoll_c        bench/epoll_echo.c, the hand-written floor
#   tokio          bench/tokio-echo (tokio + LengthDelimitedCodec, current_thread)
# Scenario s7 (tf_send from a host thread) runs bench/push_host.c for the
# tcpframe servers only.
# Then the threads section (scenario t1, ~1 minute): bench/threads/burn_echo.c,
# whose on_message burns ~20 us of CPU per frame, with 1 and with 2 loop
# threads, server and load generator not pinned; prints the scaling ratio.
# --only runs it only when the list names "t1"; --no-threads skips it.
# Then the robustness section (bench/robustness/run.sh against the same frozen
# library: fairness under a 1 B / 64 B / 4 KiB stream, queued-output and
# partial-frame memory, allocation failure; ~3-4 minutes, --quick ~1). --only
# runs it only when the list names "rob" (e.g. --only rob: just that section);
# --no-robustness skips it.
# Then the Python section (bench/python/run.sh against the same frozen library:
# tcpframe's Python modes vs asyncio and uvloop, s1-s3, BENCH_PY_ROUNDS=2 rounds,
# ~2 minutes; optional: skipped with a warning if it cannot run, e.g. no pip).
# --only runs it only when the list names "py"; --no-python skips it.
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
THREADS_ARGS=()
ORIG_ARGS="$*"
ONLY_LIST=""
ROBUSTNESS=1
PYTHON_SECTION=1
THREADS_SECTION=1
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=1; LOADGEN_ARGS+=(--quick); THREADS_ARGS+=(--quick) ;;
    --rounds) shift; LOADGEN_ARGS+=(--rounds "$1"); THREADS_ARGS+=(--rounds "$1") ;;
    --only) shift; ONLY_LIST=$1 ;;
    --no-build) BUILD_FIRST=0 ;;
    --no-robustness) ROBUSTNESS=0 ;;
    --no-python) PYTHON_SECTION=0 ;;
    --no-threads) THREADS_SECTION=0 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
# --only: "rob" selects the robustness section, the rest go to the load generator.
RUN_LOADGEN=1
if [ -n "$ONLY_LIST" ]; then
    scen=$(tr ',' '\n' <<< "$ONLY_LIST" | grep -v -x -E 'rob|robustness|py|python|t1|threads' | paste -sd, - || true)
    grep -q -x -E 'rob|robustness' <(tr ',' '\n' <<< "$ONLY_LIST") || ROBUSTNESS=0
    grep -q -x -E 't1|threads' <(tr ',' '\n' <<< "$ONLY_LIST") || THREADS_SECTION=0
    grep -q -x -E 'py|python' <(tr ',' '\n' <<< "$ONLY_LIST") || PYTHON_SECTION=0
    if [ -n "$scen" ]; then LOADGEN_ARGS+=(--only "$scen"); else RUN_LOADGEN=0; fi
fi
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
    "$CC" -O2 -Wall -I"$ROOT/include" "$BENCH/threads/burn_echo.c" -o "$BUILD/burn_echo" \
        -L"$BUILD/lib" -ltcpframe -lpthread -Wl,-rpath,"$BUILD/lib"
    CARGO_TARGET_DIR="$BUILD/target" cargo build --release --quiet --manifest-path "$BENCH/tokio-echo/Cargo.toml"
    CARGO_TARGET_DIR="$BUILD/target" cargo build --release --quiet --manifest-path "$BENCH/loadgen/Cargo.toml"
    # let the build's write-back settle: the first scenario measured noisy without it
    sync
    sleep 3
fi
for b in echo_server push_host epoll_echo burn_echo target/release/tokio-echo target/release/loadgen; do
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

if [ "$RUN_LOADGEN" = 1 ]; then
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
fi

if [ "$THREADS_SECTION" = 1 ]; then
    # Scaling with loop threads: a CPU-bound host, 1 vs 2 threads. Nothing is
    # pinned (two loop threads need both cores; the load generator takes
    # little CPU at these rates). Same frozen library.
    echo >&2
    echo "== threads section (scenario t1: burn_echo -u 20, 1 vs 2 loop threads)" >&2
    "$BUILD/target/release/loadgen" bench --out "$OUT/threads" --server-cpu none \
        --server "tcpframe-1t=$BUILD/burn_echo -t 1 -u 20 -b epoll" \
        --server "tcpframe-2t=$BUILD/burn_echo -t 2 -u 20 -b epoll" \
        --only t1 ${THREADS_ARGS[@]+"${THREADS_ARGS[@]}"} | tee -a "$OUT/report.md"
fi

if [ "$ROBUSTNESS" = 1 ]; then
    # Same frozen library; bounded waits for a quiet machine so the section
    # stays within a few minutes (bench/README.md, "Robustness").
    echo >&2
    echo "== robustness section (bench/robustness/run.sh)" >&2
    ROB_ARGS=(--lib "$BUILD/lib")
    [ "$QUICK" = 1 ] && ROB_ARGS+=(--quick)
    ROB_MAX_WAIT=${ROB_MAX_WAIT:-30} ROB_RETRY_BUDGET=${ROB_RETRY_BUDGET:-30} \
        "$BENCH/robustness/run.sh" "${ROB_ARGS[@]}"
fi

if [ "$PYTHON_SECTION" = 1 ]; then
    # Same frozen library. Optional: a failure here is reported, not fatal.
    echo >&2
    echo "== Python section (bench/python/run.sh)" >&2
    PY_ARGS=(--lib "$BUILD/lib")
    [ "$QUICK" = 1 ] && PY_ARGS+=(--quick)
    [ "$BUILD_FIRST" = 1 ] || PY_ARGS+=(--no-build)
    "$BENCH/python/run.sh" "${PY_ARGS[@]}" ||
        echo "run.sh: WARNING: the Python section failed (see above); the other results stand" >&2
fi

# Optional section: per-connection control figures (bench/host_control/run.sh:
# tf_send_many vs tf_send CPU, 1 MiB fan-out memory, user data per echoed frame;
# ~4 minutes, --quick ~1), against the same frozen library. Runs only with
# BENCH_HOST_CONTROL=1; a failure is reported, not fatal.
if [ "${BENCH_HOST_CONTROL:-0}" = 1 ]; then
    echo >&2
    echo "== host control section (bench/host_control/run.sh)" >&2
    HC_ARGS=(--lib "$BUILD/lib")
    [ "$QUICK" = 1 ] && HC_ARGS+=(--quick)
    "$BENCH/host_control/run.sh" "${HC_ARGS[@]}" ||
        echo "run.sh: WARNING: the host control section failed (see above); the other results stand" >&2
fi
