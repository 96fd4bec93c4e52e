#!/usr/bin/env bash
# Build the vendored libvfio-user (third_party/libvfio-user) out of tree, for the interop tests.
#   scripts/libvfio-user.sh [OUTDIR]      (default: .cache/libvfio-user)
# Produces OUTDIR/lib/libvfio-user.so* and OUTDIR/samples/{server,client,gpio-pci-idio-16}.
# Idempotent: OUTDIR/.stamp holds a hash of the sources and the flags; a match skips the build.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
src=$top/third_party/libvfio-user
out=${1:-$top/.cache/libvfio-user}
export DEBIAN_FRONTEND=noninteractive

fail() { echo "libvfio-user.sh: $*" >&2; exit 1; }
trap 'echo "libvfio-user.sh: FAILED (line $LINENO): $BASH_COMMAND" >&2' ERR

[ -f "$src/lib/libvfio-user.c" ] || fail "vendored sources not found in $src"

need() { # command package
  command -v "$1" >/dev/null 2>&1 && return
  [ -f /var/lib/apt/lists/lock ] && ls /var/lib/apt/lists/*Packages >/dev/null 2>&1 || apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}
need gcc gcc
need pkg-config pkg-config
if ! pkg-config --exists json-c; then
  [ -f /var/lib/apt/lists/lock ] && ls /var/lib/apt/lists/*Packages >/dev/null 2>&1 || apt-get update -qq
  apt-get install -y -qq --no-install-recommends libjson-c-dev >/dev/null
fi
command -v gcc >/dev/null 2>&1 || fail "gcc is missing and could not be installed"
pkg-config --exists json-c || fail "json-c (libjson-c-dev) is missing and could not be installed"

mkdir -p "$out"
# Two test binaries may build at once: serialise them.
if command -v flock >/dev/null 2>&1; then exec 9>"$out/.lock"; flock 9; fi

CC=${CC:-gcc}
# -DDEBUG: the samples log (and assert) with it, as upstream's debug build does.
CFLAGS="-g -O1 -std=gnu99 -D_GNU_SOURCE -DDEBUG -Wall -Wextra -Wno-missing-field-initializers -Wno-unused-parameter"
JSON_CFLAGS=$(pkg-config --cflags json-c)
JSON_LIBS=$(pkg-config --libs json-c)

hash=$( { cd "$src" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
          echo "$CC $CFLAGS $JSON_CFLAGS $JSON_LIBS"; sha256sum "$top/scripts/libvfio-user.sh"; } \
        | sha256sum | cut -d' ' -f1)
bins=("$out/lib/libvfio-user.so.0.0.1" "$out/samples/server" "$out/samples/client" "$out/samples/gpio-pci-idio-16")
up_to_date() {
  [ "$(cat "$out/.stamp" 2>/dev/null)" = "$hash" ] || return 1
  for b in "${bins[@]}"; do [ -x "$b" ] || return 1; done
}

if up_to_date; then
  echo "libvfio-user: up to date in $out"
else
  echo "libvfio-user: building in $out"
  rm -rf "$out/obj" "$out/lib" "$out/samples" "$out/.stamp"
  mkdir -p "$out/obj" "$out/lib" "$out/samples"
  inc=(-I"$src/include" -I"$src/lib")
  objs=()
  for f in dma irq libvfio-user migration pci pci_caps tran tran_sock; do
    # shellcheck disable=SC2086 # CFLAGS and JSON_* are word lists
    $CC $CFLAGS -fPIC -fvisibility=hidden "${inc[@]}" $JSON_CFLAGS -c "$src/lib/$f.c" -o "$out/obj/$f.o" \
      || fail "compiling lib/$f.c failed"
    objs+=("$out/obj/$f.o")
  done
  # shellcheck disable=SC2086
  $CC -shared -Wl,-soname,libvfio-user.so.0 -o "$out/lib/libvfio-user.so.0.0.1" "${objs[@]}" $JSON_LIBS \
    || fail "linking libvfio-user.so failed"
  ln -sf libvfio-user.so.0.0.1 "$out/lib/libvfio-user.so.0"
  ln -sf libvfio-user.so.0 "$out/lib/libvfio-user.so"
  # The client links the private transport/migration code directly (as upstream's meson does).
  # shellcheck disable=SC2086
  $CC $CFLAGS "${inc[@]}" $JSON_CFLAGS "$src/samples/client.c" "$src/lib/migration.c" \
    "$src/lib/tran.c" "$src/lib/tran_sock.c" -o "$out/samples/client" $JSON_LIBS -lpthread \
    || fail "building samples/client failed"
  for s in server gpio-pci-idio-16; do
    # shellcheck disable=SC2086
    $CC $CFLAGS "${inc[@]}" "$src/samples/$s.c" -o "$out/samples/$s" -L"$out/lib" -lvfio-user \
      -Wl,-rpath,'$ORIGIN/../lib' || fail "building samples/$s failed"
  done
  rm -rf "$out/obj"
  for b in "${bins[@]}"; do [ -x "$b" ] || fail "$b was not produced"; done
  echo "$hash" > "$out/.stamp"
fi
echo "libvfio-user: library $out/lib/libvfio-user.so"
echo "libvfio-user: samples $out/samples/server $out/samples/client $out/samples/gpio-pci-idio-16"
