#!/usr/bin/env bash
# bench/python/run.sh — Python hosts side by side on the benchmark's load generator:
# tcpframe's callback, batch-callback, pull and asyncio modes against a plain asyncio
# Protocol echo and the same Protocol on uvloop, each in two forms: one
# transport.write per data_received ("proto") and the textbook one write per reply
# ("naive") (bench/python/servers.py).
#
#   bench/python/run.sh [--quick] [--rounds N] [--only s1,s2,s3] [--no-build] [--lib DIR]
#
# Scenarios (bench/README.md): s1 1 conn request/response (p50/p99 latency),
# s2 1 conn x 64 in flight, s3 50 conns x 16 in flight, all 64 B frames.
# Each server runs in a fresh process per scenario, pinned to core 0 (taskset), the
# load generator on core 1; servers interleaved round by round; medians of the rounds.
#
# uvloop is installed (pip) into a virtual environment of the benchmark only,
# bench/build/pyvenv; it is not a dependency of the package. Without it the uvloop row
# is left out. The library is a frozen copy of target/release/libtcpframe.so (or the
# one in --lib DIR, as bench/run.sh passes its own frozen copy).
#
# Environment: BENCH_PY_ROUNDS (default 2; --rounds wins), BENCH_PY_OUT (default
# bench/build/python-results), BENCH_WARMUP_MS / BENCH_MEASURE_MS / BENCH_MAX_WAIT /
# BENCH_NOISE_PCT / BENCH_RETRIES as for bench/run.sh, PYTHON (default python3).
# Output: a table on stdout, OUT/report.md, OUT/results.tsv, OUT/logs/.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BENCH=$ROOT/bench
BUILD=$BENCH/build
OUT=${BENCH_PY_OUT:-$BUILD/python-results}
ROUNDS=${BENCH_PY_ROUNDS:-2}
SCEN=s1,s2,s3
QUICK=()
BUILD_FIRST=1
LIBDIR=""
PYTHON=${PYTHON:-python3}
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=(--quick) ;;
    --rounds) shift; ROUNDS=$1 ;;
    --only) shift; SCEN=$1 ;;
    --no-build) BUILD_FIRST=0 ;;
    --lib) shift; LIBDIR=$1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "bench/python/run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

mkdir -p "$BUILD/python/lib" "$OUT"
LIB=$BUILD/python/lib/libtcpframe.so
if [ -n "$LIBDIR" ]; then
    src_lib=""
    for f in "$LIBDIR"/libtcpframe.so.0 "$LIBDIR"/libtcpframe.so; do
        if [ -e "$f" ]; then src_lib=$f; break; fi
    done
    [ -n "$src_lib" ] || { echo "bench/python/run.sh: no libtcpframe.so(.0) in $LIBDIR" >&2; exit 1; }
    cp -f "$src_lib" "$LIB"
    LIB_FROM="a copy of $src_lib (built $(date -u -r "$src_lib" '+%Y-%m-%d %H:%M UTC')$(if [ -f "$LIBDIR/BUILT_FROM" ]; then echo ", from $(tr -d '\n' < "$LIBDIR/BUILT_FROM")"; fi))"
elif [ "$BUILD_FIRST" = 1 ]; then
    echo "== building the library and the load generator (release)" >&2
    (cd "$ROOT" && cargo build --release --quiet)
    # Frozen for the run: a rebuild meanwhile must not change what is measured.
    cp -f "${CARGO_TARGET_DIR:-$ROOT/target}/release/libtcpframe.so" "$LIB"
    LIB_FROM="built from $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted changes in src/') at $(date -u '+%H:%M UTC')"
else
    LIB_FROM="the copy left by an earlier run (built $(date -u -r "$LIB" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || echo '?'))"
fi
if [ "$BUILD_FIRST" = 1 ]; then
    CARGO_TARGET_DIR="$BUILD/target" cargo build --release --quiet --manifest-path "$BENCH/loadgen/Cargo.toml"
fi
LOADGEN=$BUILD/target/release/loadgen
for f in "$LIB" "$LOADGEN"; do
    [ -e "$f" ] || { echo "bench/python/run.sh: $f is missing (run without --no-build)" >&2; exit 1; }
done

# The benchmark's own Python: a venv with uvloop (never a dependency of the package).
VENV=$BUILD/pyvenv
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
HAVE_UVLOOP=1
"$VENV/bin/python" -c "import uvloop" 2>/dev/null ||
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check uvloop ||
    { echo "bench/python/run.sh: WARNING: could not install uvloop; its row is left out" >&2; HAVE_UVLOOP=0; }
PY=$VENV/bin/python
SERVERS=$BENCH/python/servers.py

hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -gt 65536 ]; then hard=65536; fi
ulimit -n "$hard" || true

PIN_LOADGEN=(taskset -c 1)
SERVER_CPU=0
if ! command -v taskset >/dev/null || [ "$(nproc)" -lt 2 ]; then
    echo "bench/python/run.sh: WARNING: no taskset or fewer than 2 cores: not pinning" >&2
    PIN_LOADGEN=()
    SERVER_CPU=none
fi

MODES=(callbacks callbacks-batch pull asyncio asyncio-naive asyncio-proto)
[ "$HAVE_UVLOOP" = 1 ] && MODES+=(uvloop-naive uvloop-proto)
ARGS=()
for m in "${MODES[@]}"; do
    ARGS+=(--server "$m=$PY $SERVERS $m")
done

echo "== Python benchmark: ${MODES[*]}; $SCEN; $ROUNDS round(s); load avg $(cut -d' ' -f1-3 /proc/loadavg)" >&2
export TCPFRAME_LIB=$LIB PYTHONPATH=$ROOT/python
"${PIN_LOADGEN[@]}" "$LOADGEN" bench --out "$OUT" --server-cpu "$SERVER_CPU" --rounds "$ROUNDS" \
    --only "$SCEN" "${ARGS[@]}" ${QUICK[@]+"${QUICK[@]}"} > "$OUT/loadgen-report.md"

{
    "$PY" "$BENCH/python/summary.py" "$OUT/results.tsv"
    echo
    echo "Produced by: bench/python/run.sh ${QUICK[*]} (rounds $ROUNDS) on $(date -u '+%Y-%m-%d %H:%M UTC'); Python $("$PY" -c 'import platform; print(platform.python_version())')$([ "$HAVE_UVLOOP" = 1 ] && "$PY" -c 'import uvloop; print(", uvloop", uvloop.__version__)' | tr -d '\n')"
    echo "library: $LIB_FROM"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
} | tee "$OUT/report.md"
