#!/usr/bin/env bash
# Installs what the test suite needs and a fresh machine may lack: pytest
# (pip), valgrind, pkg-config and a C++ compiler (apt, as root), clippy and
# rustfmt (rustup). Quiet when everything is already there.
set -euo pipefail
need_apt=()
for tool in gcc g++ make valgrind pkg-config; do
  command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${need_apt[*]} (install them, e.g. with apt-get as root)"; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
python3 -c "import pytest, pytest_timeout" 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check pytest pytest-timeout
command -v cargo-clippy >/dev/null 2>&1 || rustup component add clippy
command -v rustfmt >/dev/null 2>&1 || rustup component add rustfmt
