#!/usr/bin/env bash
# install.sh PREFIX: installs the C library built by `cargo build --release`
# (built here first if it is missing) under PREFIX:
#   PREFIX/include/tcpframe.h
#   PREFIX/lib/libtcpframe.so.X.Y.Z, libtcpframe.so.X -> it, libtcpframe.so -> .so.X
#   PREFIX/lib/libtcpframe.a
#   PREFIX/lib/pkgconfig/tcpframe.pc      (Libs.private: the static link's system libs)
# Environment: TF_NATIVE_STATIC_LIBS overrides the system libraries written to
# Libs.private (default: what rustc prints for this crate on Linux, see below).
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 PREFIX" >&2
    exit 2
fi
top=$(cd "$(dirname "$0")/.." && pwd)
prefix=$1
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)

version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$top/Cargo.toml" | head -n 1)
if [ -z "$version" ]; then
    echo "install.sh: no version in $top/Cargo.toml" >&2
    exit 1
fi
major=${version%%.*}
rel=$top/target/release

if [ ! -f "$rel/libtcpframe.so" ] || [ ! -f "$rel/libtcpframe.a" ] || [ ! -f "$top/include/tcpframe.h" ]; then
    echo "install.sh: building the release library first" >&2
    (cd "$top" && cargo build --release)
fi

# `cargo rustc --release --lib --crate-type staticlib -- --print native-static-libs`
# prints these on Linux; they are what a static link against libtcpframe.a needs.
libs_private=${TF_NATIVE_STATIC_LIBS:--lgcc_s -lutil -lrt -lpthread -lm -ldl -lc}

install -d "$prefix/include" "$prefix/lib/pkgconfig"
install -m 0644 "$top/include/tcpframe.h" "$prefix/include/tcpframe.h"
install -m 0755 "$rel/libtcpframe.so" "$prefix/lib/libtcpframe.so.$version"
ln -sf "libtcpframe.so.$version" "$prefix/lib/libtcpframe.so.$major"
ln -sf "libtcpframe.so.$major" "$prefix/lib/libtcpframe.so"
install -m 0644 "$rel/libtcpframe.a" "$prefix/lib/libtcpframe.a"

# '|' cannot occur in the values below (a path with '|' is refused).
case "$prefix$libs_private" in *'|'*) echo "install.sh: '|' in $prefix" >&2; exit 1 ;; esac
sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" -e "s|@LIBS_PRIVATE@|$libs_private|g" \
    "$top/tcpframe.pc.in" > "$prefix/lib/pkgconfig/tcpframe.pc"
chmod 0644 "$prefix/lib/pkgconfig/tcpframe.pc"

echo "installed tcpframe $version into $prefix"
