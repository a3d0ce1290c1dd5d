#!/usr/bin/env bash
# bench/robustness/run.sh — robustness figures: fairness, memory bounds, OOM.
#
#   bench/robustness/run.sh [--quick] [--reps N] [--secs S] [--only LIST]
#                           [--lib DIR | --after REV] [--before REV] [--no-wait]
#
# Sections (--only takes a comma list of them; default: fair,outmem,amp,oom,
# plus cpu when --before is given):
#   fair    ping-pong p50/p99 on one connection while another streams 1 B, 64 B
#           or 4 KiB frames (fair.c), against rthost.c (tcpframe echo) and
#           bench/epoll_echo.c (the hand-written floor), server on core 0, load
#           on core 1; also with no stream ("none"). S seconds each (default 2).
#   outmem  RSS growth for 20 never-reading peers, max queued output 16 MiB, a
#           host thread sending 1 B / 64 B / 4 KiB / 1 MiB frames until
#           TF_ERR_FULL (outmem.c); once unpinned, once pinned to one core.
#   amp     1,000 peers each holding a 3 MiB partial frame, default budget
#           (amp.py + rthost.c): RSS, closes with TF_CLOSE_OVERLOAD (9).
#   oom     examples-c/echo_server under ulimit -v 400000, 100 peers announcing
#           8 MiB (oom.sh): exit status, other connections still served.
#   cpu     (needs --before) server CPU per echoed frame, bench/loadgen s2,s3,s4,s5a,
#           tcpframe's echo_server at this tree and at REV, and epoll_c.
# ROB_FAIR_LOADS (default "none 1 64 4096") picks the fair section's loads.
# Every section runs REPS times (default 3; --quick: 1 rep, 1 s windows),
# servers interleaved within each rep; the table shows medians.
#
# --lib DIR      the libtcpframe.so to measure as "tcpframe" (default: a frozen
#                copy of $CARGO_TARGET_DIR/release/libtcpframe.so, built if missing)
# --after REV    measure the library at git revision REV instead (built in a
#                temporary git worktree, like --before): figures for a commit,
#                whatever the shared work tree holds meanwhile
# --before REV   also measure the library at git revision REV: a temporary git
#                worktree is built (cargo build --release) and removed right after
# --no-wait      do not wait for other compilers on the machine to finish
#
# Output: the table on stdout and in $ROB_OUT/report.md (default
# bench/build/robustness/), raw result lines in $ROB_OUT/raw.txt, logs in
# $ROB_OUT/logs/. Only 127.0.0.1; every program has its own deadline and the
# runner stops what it started by PID (SIGINT, then SIGKILL).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/bench/robustness
OUT=${ROB_OUT:-$ROOT/bench/build/robustness}
REPS=3
SECS=2
ONLY=""
LIBDIR=""
BEFORE=""
AFTER=""
WAIT=1
QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=1 ;;
    --reps) shift; REPS=$1 ;;
    --secs) shift; SECS=$1 ;;
    --only) shift; ONLY=$1 ;;
    --lib) shift; LIBDIR=$1 ;;
    --before) shift; BEFORE=$1 ;;
    --after) shift; AFTER=$1 ;;
    --no-wait) WAIT=0 ;;
    -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
    *) echo "robustness/run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then REPS=1; SECS=1; fi
if [ -z "$ONLY" ]; then
    ONLY=fair,outmem,amp,oom
    [ -n "$BEFORE" ] && ONLY=$ONLY,cpu
fi
want() { [[ ",$ONLY," == *",$1,"* ]]; }
if want cpu && [ -z "$BEFORE" ]; then echo "robustness/run.sh: the cpu section needs --before REV" >&2; exit 2; fi

CC=${CC:-cc}
MAIN_TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
B=$OUT/bin
rm -rf "$OUT/logs" "$OUT/cpu"
mkdir -p "$B" "$OUT/logs"
RAW=$OUT/raw.txt
: > "$RAW"
T0=$(date +%s)

# ------------------------------------------------------------------ building
WT=""
PIDS=()
cleanup() {
    for p in ${PIDS[@]+"${PIDS[@]}"}; do kill -KILL "$p" 2>/dev/null || true; done
    if [ -n "$WT" ] && [ -d "$WT" ]; then
        git -C "$ROOT" worktree remove --force "$WT" >/dev/null 2>&1 || rm -rf "$WT"
        git -C "$ROOT" worktree prune >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

echo "== robustness: building into $B" >&2
# build_rev VARIANT REV: the library, header and echo_server source of git
# revision REV, from a temporary worktree that is removed right after.
build_rev() {
    local v=$1 rev=$2
    WT=$(mktemp -d /tmp/tf-rev.XXXXXX)
    rmdir "$WT"
    git -C "$ROOT" worktree add --detach "$WT" "$rev" >/dev/null 2>&1 || { echo "robustness: cannot check out $rev" >&2; exit 1; }
    (cd "$WT" && CARGO_TARGET_DIR="$WT/target" cargo build --release --quiet)
    rm -rf "$B/$v"
    mkdir -p "$B/$v/lib" "$B/$v/include"
    cp -f "$WT/target/release/libtcpframe.so" "$B/$v/lib/libtcpframe.so.0"
    ln -sf libtcpframe.so.0 "$B/$v/lib/libtcpframe.so"
    cp -f "$WT/include/tcpframe.h" "$B/$v/include/"
    cp -f "$WT/examples-c/echo_server.c" "$B/$v/echo_server.c"
    git -C "$ROOT" worktree remove --force "$WT" >/dev/null 2>&1 || rm -rf "$WT"
    git -C "$ROOT" worktree prune >/dev/null 2>&1 || true
    WT=""
    INC[$v]=$B/$v/include
    ECHO_SRC[$v]=$B/$v/echo_server.c
}
declare -A INC ECHO_SRC LABEL
rm -rf "$B/head" "$B/before"
VARIANTS=(head)
LABEL[head]=tcpframe
if [ -n "$AFTER" ]; then
    # variant "head" = the library at revision AFTER, built apart from the work tree
    build_rev head "$AFTER"
    HEAD_DESC="commit $(git -C "$ROOT" rev-parse --short "$AFTER") (clean build)"
else
    # variant "head": this tree's header, the library given or a frozen copy of the release build
    rm -rf "$B/head"
    mkdir -p "$B/head/lib"
    if [ -z "$LIBDIR" ]; then
        [ -f "$MAIN_TARGET/release/libtcpframe.so" ] || (cd "$ROOT" && cargo build --release --quiet)
        LIBDIR=$MAIN_TARGET/release
    fi
    LIBSO=$LIBDIR/libtcpframe.so.0
    [ -f "$LIBSO" ] || LIBSO=$LIBDIR/libtcpframe.so
    cp -fL "$LIBSO" "$B/head/lib/libtcpframe.so.0"
    ln -sf libtcpframe.so.0 "$B/head/lib/libtcpframe.so"
    HEAD_DESC="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    git -C "$ROOT" diff --quiet HEAD -- src include 2>/dev/null || HEAD_DESC="$HEAD_DESC + uncommitted changes"
    HEAD_DESC="the work tree at $HEAD_DESC ($LIBSO, built $(date -u -r "$LIBSO" '+%H:%M UTC'))"
    INC[head]=$ROOT/include
    ECHO_SRC[head]=$ROOT/examples-c/echo_server.c
fi
if [ -n "$BEFORE" ]; then
    build_rev before "$BEFORE"
    VARIANTS+=(before)
    LABEL[before]="tcpframe@$(git -C "$ROOT" rev-parse --short "$BEFORE")"
fi

for v in "${VARIANTS[@]}"; do
    for p in rthost outmem; do
        "$CC" -std=gnu11 -O2 -Wall -I"${INC[$v]}" "$HERE/$p.c" -o "$B/$v/$p" \
            -L"$B/$v/lib" -ltcpframe -lpthread -Wl,-rpath,"$B/$v/lib"
    done
    "$CC" -std=gnu99 -O2 -Wall -I"${INC[$v]}" "${ECHO_SRC[$v]}" -o "$B/$v/echo_server" \
        -L"$B/$v/lib" -ltcpframe -lpthread -Wl,-rpath,"$B/$v/lib"
done
"$CC" -std=gnu11 -O2 -Wall "$HERE/fair.c" -o "$B/fair" -lpthread
"$CC" -O2 -Wall "$ROOT/bench/epoll_echo.c" -o "$B/epoll_echo"
LOADGEN=$ROOT/bench/build/target/release/loadgen
if want cpu && [ ! -x "$LOADGEN" ]; then
    CARGO_TARGET_DIR="$ROOT/bench/build/target" cargo build --release --quiet --manifest-path "$ROOT/bench/loadgen/Cargo.toml"
fi
for v in "${VARIANTS[@]}"; do echo "${LABEL[$v]}" > "$B/$v/LABEL"; done
echo "$HEAD_DESC" > "$B/head/BUILT_FROM"

# Other engineers share this machine: wait (bounded) for their compilers.
if [ "$WAIT" = 1 ]; then
    for ((i = 0; i < 60; i++)); do
        busy=0
        for n in rustc cc1 cc1plus ld collect2; do pgrep -x "$n" >/dev/null 2>&1 && busy=1; done
        [ "$busy" = 0 ] && break
        [ "$i" = 0 ] && echo "== waiting (up to 60 s) for other compilers to finish" >&2
        sleep 1
    done
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true
PIN0=(taskset -c 0)
PIN1=(taskset -c 1)
if ! command -v taskset >/dev/null || [ "$(nproc)" -lt 2 ]; then
    echo "robustness/run.sh: WARNING: no taskset or fewer than 2 cores: not pinning" >&2
    PIN0=(); PIN1=()
fi

record() { # variant rep test line...
    local v=$1 r=$2 t=$3
    shift 3
    echo "variant=$v label=${LABEL[$v]:-epoll_c} rep=$r test=$t load=$(cut -d' ' -f1 /proc/loadavg) $*" >> "$RAW"
}

# stop PID: SIGINT, then SIGKILL after 5 s
stop_pid() {
    local p=$1
    kill -INT "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}

# ------------------------------------------------------------------ fair
# one fairness run: server (epoll_c|head|before), rep, payload (none|N); sets
# RES (fair's result line) and OTHER (CPU % of a core other processes used meanwhile)
fair_try() {
    local srv=$1 rep=$2 pl=$3 log=$OUT/logs/fair-$1-$3-r$2.log port="" pid
    local fifo=$OUT/logs/ctl.$$
    if [ "$srv" = epoll_c ]; then
        "${PIN0[@]}" "$B/epoll_echo" 127.0.0.1:0 > "$log" 2>&1 &
        pid=$!
    else
        rm -f "$fifo"; mkfifo "$fifo"
        "${PIN0[@]}" "$B/$srv/rthost" -c 100 < "$fifo" > "$log" 2>&1 &
        pid=$!
        exec 7> "$fifo"
    fi
    PIDS+=("$pid")
    for _ in $(seq 100); do
        if [ "$srv" = epoll_c ]; then port=$(sed -n 's/^listening on port \([0-9]*\).*/\1/p' "$log")
        else port=$(head -1 "$log" | grep -E '^[0-9]+$' || true); fi
        [ -n "$port" ] && break
        sleep 0.05
    done
    local mode=blast
    [ "$pl" = none ] && mode=none
    RES=""
    OTHER="other_pct=? busiest=?"
    if [ -z "$port" ]; then
        RES="FAIR status=no-server"
    else
        python3 "$HERE/others.py" snap "$OUT/logs/others.json" 2>/dev/null || true
        RES=$(timeout 60 "${PIN1[@]}" "$B/fair" "$port" "$mode" "$SECS" "${pl/none/1}" 2>>"$OUT/logs/fair.err" | grep '^FAIR' || true)
        OTHER=$(python3 "$HERE/others.py" diff "$OUT/logs/others.json" 2>/dev/null || echo "other_pct=? busiest=?")
        [ -n "$RES" ] || RES="FAIR status=fail"
    fi
    if [ "$srv" = epoll_c ]; then
        stop_pid "$pid"
    else
        exec 7>&-   # rthost stops when its stdin closes
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        stop_pid "$pid"
        rm -f "$fifo"
    fi
}

# Shared machine: before each run, wait (at most 10 s; ROB_MAX_WAIT seconds in
# all, default 120) until other processes use at most ROB_NOISE_PCT (default 15)
# % of a core; a run during which they used more is run again (up to 2 more
# times, within ROB_RETRY_BUDGET seconds for the section, default 90); the
# quietest attempt is kept, and the table says how busy the others were.
RETRY_LEFT=${ROB_RETRY_BUDGET:-90}
WAIT_LEFT=${ROB_MAX_WAIT:-120}
NOISE=${ROB_NOISE_PCT:-15}
fair_one() {
    local best="" bestother="" bestpct=100000 n=0 t pct w
    for attempt in 1 2 3; do
        if [ "$WAIT_LEFT" -gt 0 ]; then
            w=$(python3 "$HERE/others.py" wait "$((WAIT_LEFT < 10 ? WAIT_LEFT : 10))" "$NOISE" 2>/dev/null || echo 0)
            WAIT_LEFT=$((WAIT_LEFT - w))
        fi
        t=$(date +%s)
        fair_try "$@"
        n=$attempt
        pct=${OTHER#other_pct=}; pct=${pct%% *}
        [[ "$pct" =~ ^[0-9]+$ ]] || pct=0
        if [ "$pct" -lt "$bestpct" ]; then best=$RES; bestother=$OTHER; bestpct=$pct; fi
        RETRY_LEFT=$((RETRY_LEFT - ($(date +%s) - t)))
        if [ "$pct" -le "$NOISE" ] || [ "$RETRY_LEFT" -le 0 ]; then break; fi
        [ "$attempt" -lt 3 ] && echo "   (fair $1 $3 rep $2: others used ${pct}% of a core; again)" >&2
    done
    record "$1" "$2" fair "attempts=$n $bestother $best"
}

if want fair; then
    echo "== robustness: fair ($REPS reps x 4 loads x $((${#VARIANTS[@]} + 1)) servers x ${SECS}s)" >&2
    for ((r = 1; r <= REPS; r++)); do
        for pl in ${ROB_FAIR_LOADS:-none 1 64 4096}; do
            for s in epoll_c "${VARIANTS[@]}"; do fair_one "$s" "$r" "$pl"; done
        done
    done
fi

# ------------------------------------------------------------------ outmem
if want outmem; then
    echo "== robustness: outmem ($REPS reps x 4 frame sizes x ${#VARIANTS[@]} libraries x unpinned/1 core)" >&2
    for ((r = 1; r <= REPS; r++)); do
        for f in 1 64 4096 1048576; do
            for v in "${VARIANTS[@]}"; do
                res=$(timeout 90 "$B/$v/outmem" never 20 "$f" 16777216 30 2>>"$OUT/logs/outmem.log" | grep '^OUTMEM' || true)
                [ -n "$res" ] || res="OUTMEM status=fail frame=$f"
                record "$v" "$r" outmem "pin=none $res"
                res=$(timeout 90 "${PIN0[@]}" "$B/$v/outmem" never 20 "$f" 16777216 30 2>>"$OUT/logs/outmem.log" | grep '^OUTMEM' || true)
                [ -n "$res" ] || res="OUTMEM status=fail frame=$f"
                record "$v" "$r" outmem "pin=core0 $res"
            done
        done
    done
fi

# ------------------------------------------------------------------ amp
if want amp; then
    echo "== robustness: amp ($REPS reps x ${#VARIANTS[@]} libraries, 1000 x 3 MiB partial frames)" >&2
    for ((r = 1; r <= REPS; r++)); do
        for v in "${VARIANTS[@]}"; do
            res=$(timeout 180 python3 "$HERE/amp.py" "$B/$v/rthost" 1000 3145728 2>>"$OUT/logs/amp.log" | grep '^AMP' || true)
            [ -n "$res" ] || res="AMP status=fail"
            record "$v" "$r" amp "$res"
        done
    done
fi

# ------------------------------------------------------------------ oom
if want oom; then
    echo "== robustness: oom ($REPS reps x ${#VARIANTS[@]} libraries)" >&2
    for ((r = 1; r <= REPS; r++)); do
        for v in "${VARIANTS[@]}"; do
            res=$(timeout 120 "$HERE/oom.sh" "$B/$v/echo_server" 2>>"$OUT/logs/oom.log" | grep '^OOM' || true)
            [ -n "$res" ] || res="OOM status=fail"
            record "$v" "$r" oom "$res"
        done
    done
fi

# ------------------------------------------------------------------ cpu
if want cpu; then
    echo "== robustness: cpu (bench/loadgen s2,s3,s4,s5a, $REPS rounds, tcpframe vs ${LABEL[before]} vs epoll_c)" >&2
    LGQ=()
    [ "$QUICK" = 1 ] && LGQ=(--quick)
    "${PIN1[@]}" "$LOADGEN" bench --out "$OUT/cpu" --server-cpu 0 --rounds "$REPS" --only s2,s3,s4,s5a ${LGQ[@]+"${LGQ[@]}"} \
        --server "tcpframe=$B/head/echo_server -q -b epoll" \
        --server "${LABEL[before]}=$B/before/echo_server -q -b epoll" \
        --server "epoll_c=$B/epoll_echo" > "$OUT/logs/cpu.log" 2>&1 || echo "robustness: loadgen failed (see $OUT/logs/cpu.log)" >&2
fi

python3 "$HERE/report.py" "$OUT" "$REPS" "$SECS" "$(( $(date +%s) - T0 ))" | tee "$OUT/report.md"
