#!/usr/bin/env bash
# The whole test suite, as `make test` and CI run it. Stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==== %s\n' "$*"; }

step "dependencies (installed only when missing)"
scripts/deps.sh

step "format and lint"
cargo fmt --all -- --check
cargo clippy --all-targets --features fault-injection -- -D warnings

step "header: include/tcpframe.h matches a fresh cbindgen run"
TCPFRAME_VERIFY_HEADER=1 cargo build --release

step "Rust unit and integration tests, default backend (epoll)"
cargo test --quiet
step "Rust integration tests again, poll(2) backend"
TCPFRAME_TEST_BACKEND=poll cargo test --quiet --tests
step "Rust integration tests again with 2 loop threads (tf_config_set_threads), both backends (~45 s each)"
TCPFRAME_TEST_THREADS=2 cargo test --quiet --tests
TCPFRAME_TEST_THREADS=2 TCPFRAME_TEST_BACKEND=poll cargo test --quiet --tests

step "panic injection (built with --features fault-injection)"
cargo test --quiet --features fault-injection --test faults

step "soak: ${SOAK_SECS:=45} s of mixed load, exact echoes, bounded RSS"
SOAK_SECS=$SOAK_SECS cargo run --quiet --release --example soak

step "fuzz: the decoder and the output queue, ${FUZZ_SECS:=25} s each"
scripts/fuzz.sh "$FUZZ_SECS"

step "Python package: mypy --strict (annotations on every public name)"
python3 -m mypy --strict python/tcpframe
# ... and a user's program: every public name exported (not only defined).
MYPYPATH=python python3 -m mypy --strict tests/python/typed_user.py

step "C tests, C examples (valgrind) and the Python package (its wheel in a fresh venv included)"
python3 -m pytest -q tests/c tests/python
