#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECS seconds each (default 30), after
# installing cargo-fuzz if it is missing. libFuzzer needs the unstable
# sanitizer flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-30}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
export RUSTC_BOOTSTRAP=1
for target in decoder conn_output proxy; do
  mkdir -p "corpus/$target"
  # A target that no longer builds is a failure, not a skipped run.
  if ! cargo fuzz build -O "$target" >"/tmp/tcpframe-fuzz-build-$target.log" 2>&1; then
    grep -v "^ *Compiling" "/tmp/tcpframe-fuzz-build-$target.log" | tail -30
    echo "fuzz target $target does not build"; exit 1
  fi
  echo "== fuzz $target for ${secs} s"
  cargo fuzz run -O "$target" "corpus/$target" -- -max_total_time="$secs" -print_final_stats=1 2>&1 |
    grep -E "^#[0-9]+ +DONE|^stat::number_of_executed_units|^stat::peak_rss|ERROR|panicked|SUMMARY" || true
  # cargo fuzz exits non-zero on a crash; re-check that no artifact was left.
  if ls "artifacts/$target"/crash-* >/dev/null 2>&1; then
    echo "fuzz $target found a crash: fuzz/artifacts/$target/"; exit 1
  fi
done
