#!/usr/bin/env bash
# Installs what the test suite needs and a fresh machine may lack: pytest,
# mypy and the PyPA `build` front end (pip; the Python package's wheel test
# builds with it, fetching setuptools-rust into its isolated build
# environment), valgrind, pkg-config, a C++ compiler, and HAProxy and openssl
# for the deployment test, dig (apt, as root), dnspython (pip), clippy and
# rustfmt (rustup). Quiet when everything is already there.
set -euo pipefail
need_apt=()
for tool in gcc g++ make valgrind pkg-config haproxy openssl; do
  # (haproxy is in /usr/sbin, which a user's PATH may lack)
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || need_apt+=("$tool")
done
# dig (Debian's dnsutils): a DNS-over-TCP client this repository did not write,
# for the interop test of the prefix formats (tests/c/test_c_reach.py)
command -v dig >/dev/null 2>&1 || need_apt+=(dnsutils)
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
python3 -c "import mypy, build" 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check mypy build
python3 -c "import dns.query" 2>/dev/null ||  # dnspython: the same interop test
  python3 -m pip install --quiet --disable-pip-version-check dnspython
command -v cargo-clippy >/dev/null 2>&1 || rustup component add clippy
command -v rustfmt >/dev/null 2>&1 || rustup component add rustfmt
