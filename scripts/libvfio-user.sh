#!/usr/bin/env bash
# Build the genuine upstream libvfio-user out of tree, for the interop tests and the bench.
#   scripts/libvfio-user.sh [OUTDIR]      (default: .cache/libvfio-user)
# Sources: $FAULTLINE_LIBVFIO_USER_SRC, default ../shared/peers/libvfio-user next to the
# repository (read-only there: nothing is written into it). Built with upstream's own meson
# files (debug build, as upstream's CI) in OUTDIR/build.
# Produces OUTDIR/lib/libvfio-user.so* and OUTDIR/samples/{server,client,gpio-pci-idio-16}.
# Idempotent: OUTDIR/.stamp holds a hash of the sources, the options and the tools; a match
# skips the build. Two callers at once are serialised with flock on OUTDIR/.lock.
# Missing tools (gcc, pkg-config, meson, ninja-build, libjson-c-dev and, because upstream's
# meson.build asks for it unconditionally, libcmocka-dev) are installed with apt-get as root.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
src=${FAULTLINE_LIBVFIO_USER_SRC:-$top/../shared/peers/libvfio-user}
out=${1:-$top/.cache/libvfio-user}
export DEBIAN_FRONTEND=noninteractive

fail() { echo "libvfio-user.sh: $*" >&2; exit 1; }
trap 'echo "libvfio-user.sh: FAILED (line $LINENO): $BASH_COMMAND" >&2' ERR

[ -f "$src/meson.build" ] && [ -f "$src/lib/libvfio-user.c" ] \
  || fail "libvfio-user sources not found in $src: check out upstream libvfio-user \
(https://github.com/nutanix/libvfio-user) there, or set FAULTLINE_LIBVFIO_USER_SRC to its directory"
src=$(cd "$src" && pwd)

# apt-get install PACKAGE... (root only; lists fetched once when there are none).
apt_install() {
  [ "$(id -u)" = 0 ] || fail "missing $*: install it (apt-get install $*) or run this as root"
  command -v apt-get >/dev/null 2>&1 || fail "missing $* and there is no apt-get to install it"
  ls /var/lib/apt/lists/*Packages* >/dev/null 2>&1 || apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || fail "apt-get install $* failed"
}
missing=()
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v meson >/dev/null 2>&1 || missing+=(meson)
command -v ninja >/dev/null 2>&1 || missing+=(ninja-build)
pc() { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists "$1"; }
pc json-c || missing+=(libjson-c-dev)
# Upstream's top-level meson.build requires cmocka (for its unit tests, not built here).
if grep -q "dependency('cmocka'" "$src/meson.build" && ! pc cmocka; then
  missing+=(libcmocka-dev)
fi
[ ${#missing[@]} = 0 ] || apt_install "${missing[@]}"
for t in gcc pkg-config meson ninja; do
  command -v $t >/dev/null 2>&1 || fail "$t is missing and could not be installed"
done
pc json-c || fail "json-c (libjson-c-dev) is missing and could not be installed"

mkdir -p "$out"
# Two test binaries may build at once: serialise them.
command -v flock >/dev/null 2>&1 || fail "flock (util-linux) is missing"
exec 9>"$out/.lock"
flock 9

# Upstream's defaults (buildtype=debug: -Werror and -DDEBUG, whose logs and asserts the
# samples use); the pipe transport off, as by default.
MESON_OPTS=(--buildtype=debug -Dtran-pipe=false)
targets=(lib/libvfio-user.so.0.0.1 samples/server samples/client samples/gpio-pci-idio-16)

hash=$( { cd "$src" && find . -path ./.git -prune -o -type f -print0 | LC_ALL=C sort -z \
            | xargs -0 sha256sum
          echo "${MESON_OPTS[*]} ${CC:-cc} ${CFLAGS:-}"
          gcc --version | head -1; meson --version; pkg-config --modversion json-c
          sha256sum "$top/scripts/libvfio-user.sh" | cut -d' ' -f1; } \
        | sha256sum | cut -d' ' -f1)
bins=("$out/lib/libvfio-user.so.0.0.1" "$out/samples/server" "$out/samples/client"
      "$out/samples/gpio-pci-idio-16")
up_to_date() {
  [ "$(cat "$out/.stamp" 2>/dev/null)" = "$hash" ] || return 1
  for b in "${bins[@]}"; do [ -x "$b" ] || return 1; done
}

# Upstream bug nutanix/libvfio-user#871: once the library rejects BAR sizes that are not a
# power of two (#832), samples/server cannot start ("BAR region size 12288 must be a power of
# 2"): its BAR1 is 0x3000 bytes. Upstream fixed the sample in #872 by making BAR1 0x4000
# bytes. Sources from between the two get exactly that one-line fix, in a copy of server.c
# compiled here with the flags of upstream's debug build; the library, the client and the
# other samples are built from the sources as they are.
server_needs_fix() {
  grep -q 'const size_t bar1_size = 0x3000;' "$src/samples/server.c" \
    && grep -q 'must be a power of 2' "$src/lib/libvfio-user.c"
}
fix_sample_server() {
  server_needs_fix || return 0
  echo "libvfio-user: samples/server: applying upstream's fix for #871 (BAR1 0x3000 -> 0x4000, as #872)"
  mkdir -p "$out/fix"
  sed 's/const size_t bar1_size = 0x3000;/const size_t bar1_size = 0x4000;/' \
    "$src/samples/server.c" > "$out/fix/server.c"
  [ "$(diff "$src/samples/server.c" "$out/fix/server.c" | grep -c '^[<>]')" = 2 ] \
    || fail "patching samples/server.c for #871 did not change exactly one line"
  gcc -std=gnu99 -g -gdwarf-4 -Wall -Wextra -Werror -Wno-missing-field-initializers \
    -Wmissing-declarations -Wwrite-strings -D_GNU_SOURCE -DDEBUG \
    -I"$src/samples" -I"$src/lib" -I"$src/include" "$out/fix/server.c" \
    -o "$out/samples/server" -L"$out/lib" -lvfio-user -Wl,-rpath,'$ORIGIN/../lib' \
    || fail "building samples/server with the fix for #871 failed"
  echo "upstream's fix for nutanix/libvfio-user#871 (BAR1 0x3000 -> 0x4000, #872) applied to this build" \
    > "$out/samples/server.fixed"
}

if up_to_date; then
  echo "libvfio-user: up to date in $out (sources $src)"
else
  echo "libvfio-user: building $src in $out"
  rm -rf "$out/build" "$out/lib" "$out/samples" "$out/.stamp"
  meson setup "${MESON_OPTS[@]}" "$out/build" "$src" >"$out/meson-setup.log" 2>&1 \
    || { cat "$out/meson-setup.log" >&2; fail "meson setup failed (log above)"; }
  # Only what the tests and the bench use (not upstream's unit tests).
  ninja -C "$out/build" "${targets[@]}" >"$out/ninja.log" 2>&1 \
    || { tail -n 60 "$out/ninja.log" >&2; fail "ninja failed (log above, whole in $out/ninja.log)"; }
  # Copied out of the build tree with its layout: the samples find the library through
  # their build rpath, $ORIGIN/../lib.
  mkdir -p "$out/lib" "$out/samples"
  for l in libvfio-user.so libvfio-user.so.0 libvfio-user.so.0.0.1; do cp -a "$out/build/lib/$l" "$out/lib/"; done
  for s in server client gpio-pci-idio-16; do cp -a "$out/build/samples/$s" "$out/samples/"; done
  fix_sample_server
  for b in "${bins[@]}"; do [ -x "$b" ] || fail "$b was not produced"; done
  readelf -d "$out/samples/server" | grep -q 'ORIGIN/../lib' \
    || fail "samples/server has no \$ORIGIN/../lib rpath (meson changed its build rpath?)"
  echo "$hash" > "$out/.stamp"
fi
echo "libvfio-user: library $out/lib/libvfio-user.so"
echo "libvfio-user: samples $out/samples/server $out/samples/client $out/samples/gpio-pci-idio-16"
