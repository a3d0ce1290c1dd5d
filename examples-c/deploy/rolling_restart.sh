#!/usr/bin/env bash
# rolling_restart.sh: restarts tcpframe instances behind HAProxy one at a time,
# without a client noticing.
#
#   rolling_restart.sh start   NAME=ADDRESS...   start each instance not running
#   rolling_restart.sh restart NAME=ADDRESS...   the rolling restart, in the order given
#   rolling_restart.sh stop    NAME=ADDRESS...   SIGTERM each one, wait for it to exit
#
# NAME is the instance's server name in HAProxy's backend, ADDRESS its address
# ("s1=127.0.0.1:7001"). For each instance, in turn, `restart`:
#   1. tells HAProxy to send it no new connections (`set server BACKEND/NAME
#      state drain` on the admin socket) and lets connections being opened land;
#   2. sends it SIGUSR1: tf_server_drain closes its listener (HAProxy's health
#      check now fails, a connect would be refused and redispatched) and it
#      serves its open connections on;
#   3. waits until it has exited by itself, which it does when its last
#      connection has closed (at most DRAIN_TIMEOUT seconds, then SIGTERM);
#   4. starts the new instance on the same address and waits until it listens;
#   5. waits until HAProxy's health check has reached it (the instance logs the
#      check's connection and HAProxy reports it up), then `state ready`;
#   6. goes on with the next one. Any step that fails stops the script (exit 1)
#      with that instance out of the pool and the others untouched.
# Without HAPROXY_ADMIN, steps 1 and 5's `ready` are skipped: HAProxy then learns
# of the drain from the refused connects (retried on another server: `retries`,
# `option redispatch 1`) and its next health check, and of the new instance from
# its health check alone.
#
# Environment:
#   INSTANCE       the instance program (default: build/c/instance in the repository)
#   INSTANCE_ARGS  more arguments for it, e.g. "-c 100" (max connections per IP)
#   RUN_DIR        NAME.pid, NAME.log and NAME.out live here (default: build/deploy)
#   HAPROXY_ADMIN  HAProxy's admin socket, as in its `stats socket` line:
#                  ipv4@HOST:PORT or HOST:PORT (bash's /dev/tcp), or a Unix path
#                  (needs socat)
#   BACKEND        the HAProxy backend (default: tcpframe)
#   DRAIN_TIMEOUT  seconds a drained instance may take to empty (default 60)
#   UP_TIMEOUT     seconds for a new instance to listen and be seen up (default 15)
#   SETTLE         seconds between taking an instance out of HAProxy's pool and
#                  draining it (default 0.5)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
INSTANCE="${INSTANCE:-$here/../../build/c/instance}"
INSTANCE_ARGS="${INSTANCE_ARGS:-}"
RUN_DIR="${RUN_DIR:-$here/../../build/deploy}"
HAPROXY_ADMIN="${HAPROXY_ADMIN:-}"
BACKEND="${BACKEND:-tcpframe}"
DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-60}"
UP_TIMEOUT="${UP_TIMEOUT:-15}"
SETTLE="${SETTLE:-0.5}"

say() { printf 'rolling_restart: %s\n' "$*"; }
die() { say "error: $*" >&2; exit 1; }

# One command on HAProxy's admin socket; prints the answer.
hactl() {
  local target="${HAPROXY_ADMIN#ipv4@}"
  if [[ $target == /* ]]; then
    printf '%s\n' "$1" | socat -t 5 - "UNIX-CONNECT:$target"
  else
    # HAProxy answers one command and closes the connection.
    exec 9<>"/dev/tcp/${target%:*}/${target##*:}" || return 1
    printf '%s\n' "$1" >&9
    timeout 5 cat <&9 || true
    exec 9<&- 9>&-
  fi
}

# The `show stat` column COLUMN (status, scur, check_status...) for server NAME.
hastat() {
  hactl "show stat" | awk -F, -v be="$BACKEND" -v sv="$1" -v col="$2" '
    NR == 1 { sub(/^# /, ""); for (i = 1; i <= NF; i++) if ($i == col) c = i; next }
    $1 == be && $2 == sv { print $c }'
}

# 0 while pid runs (a zombie, exited but not yet reaped by its parent, does not).
alive() {
  local state
  kill -0 "$1" 2>/dev/null || return 1
  state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" || return 1
  [[ $state != Z ]]
}

# Polls `cond` (a command) every 50 ms for at most $1 seconds.
wait_until() {
  local secs="$1"; shift
  local tries=$(( ${secs%.*} * 20 + 1 ))
  while (( tries-- > 0 )); do
    "$@" && return 0
    sleep 0.05
  done
  return 1
}

pid_of() { [[ -s "$RUN_DIR/$1.pid" ]] && cat "$RUN_DIR/$1.pid"; }
running() { local pid; pid="$(pid_of "$1")" && alive "$pid"; }
gone() { local pid="$1"; ! alive "$pid"; }
connections_logged() { local n; n="$(grep -c '^connect ' "$1" 2>/dev/null)" || true; echo "${n:-0}"; }
status_is() { [[ "$(hastat "$1" status)" == "$2" ]]; }

# An admin command that answers nothing when it worked.
hactl_ok() {
  local out
  out="$(hactl "$1")" || die "HAProxy admin socket $HAPROXY_ADMIN: no answer to: $1"
  [[ -z ${out//[[:space:]]/} ]] || die "HAProxy refused '$1': $out"
}

start_one() {
  local name="$1" addr="$2" log="$RUN_DIR/$1.log"
  [[ -x $INSTANCE ]] || die "no instance program at $INSTANCE (make deploy)"
  rm -f "$RUN_DIR/$name.pid"
  # Its own session: the script's end (or a terminal's) does not signal it.
  # shellcheck disable=SC2086 # INSTANCE_ARGS is a list of words
  setsid "$INSTANCE" -l "$log" -p "$RUN_DIR/$name.pid" $INSTANCE_ARGS "$addr" \
    </dev/null >>"$RUN_DIR/$name.out" 2>&1 &
  local child=$!
  listening_or_dead() { [[ -s "$RUN_DIR/$name.pid" ]] || ! alive "$child"; }
  wait_until "$UP_TIMEOUT" listening_or_dead && [[ -s "$RUN_DIR/$name.pid" ]] ||
    die "$name: not listening on $addr: $(tail -n 3 "$RUN_DIR/$name.out")"
  say "$name: listening on $addr (pid $(pid_of "$name"))"
}

# HAProxy has checked the new instance and reports it up (DRAIN: up, but still
# held out of the pool by us).
seen_up() {
  local name="$1" before="$2" status
  (( $(connections_logged "$RUN_DIR/$name.log") > before )) || return 1
  [[ -z $HAPROXY_ADMIN ]] && return 0
  status="$(hastat "$name" status)"
  [[ $status == UP || $status == DRAIN ]]
}

restart_one() {
  local name="$1" addr="$2" pid t0
  pid="$(pid_of "$name")" || die "$name: no pid file in $RUN_DIR"
  alive "$pid" || die "$name: pid $pid is not running"
  t0=$SECONDS
  if [[ -n $HAPROXY_ADMIN ]]; then
    hactl_ok "set server $BACKEND/$name state drain"
    sleep "$SETTLE"
  fi
  say "$name: draining pid $pid"
  kill -USR1 "$pid"
  if ! wait_until "$DRAIN_TIMEOUT" gone "$pid"; then
    say "$name: still has connections after ${DRAIN_TIMEOUT}s: SIGTERM"
    kill -TERM "$pid" 2>/dev/null || true
    wait_until 5 gone "$pid" || { kill -KILL "$pid" 2>/dev/null || true; }
  fi
  say "$name: stopped ($(grep '^drained ' "$RUN_DIR/$name.log" | tail -n 1 || true))"
  local before
  before="$(connections_logged "$RUN_DIR/$name.log")"
  start_one "$name" "$addr"
  wait_until "$UP_TIMEOUT" seen_up "$name" "$before" ||
    die "$name: HAProxy does not see it up after ${UP_TIMEOUT}s"
  if [[ -n $HAPROXY_ADMIN ]]; then
    hactl_ok "set server $BACKEND/$name state ready"
    wait_until "$UP_TIMEOUT" status_is "$name" UP ||
      die "$name: not UP in HAProxy after state ready"
  fi
  say "$name: back in the pool after $((SECONDS - t0))s"
}

stop_one() {
  local name="$1" pid
  pid="$(pid_of "$name")" || { say "$name: not running"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  wait_until 10 gone "$pid" || die "$name: pid $pid still running 10s after SIGTERM"
  say "$name: stopped"
}

[[ $# -ge 2 ]] || { sed -n '2,8p' "$0" >&2; exit 2; }
cmd="$1"; shift
mkdir -p "$RUN_DIR"
for spec in "$@"; do
  [[ $spec == *=* ]] || die "not NAME=ADDRESS: $spec"
  name="${spec%%=*}" addr="${spec#*=}"
  case "$cmd" in
    start) running "$name" && say "$name: already running" || start_one "$name" "$addr" ;;
    restart) restart_one "$name" "$addr" ;;
    stop) stop_one "$name" ;;
    *) die "unknown command $cmd (start, restart or stop)" ;;
  esac
done
