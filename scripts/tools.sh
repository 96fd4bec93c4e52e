#!/usr/bin/env bash
# Tools the tests use beyond the Rust toolchain, installed with apt-get as root when missing:
# rsvg-convert (librsvg2-bin) and a font, to render the benches' SVG plots to PNG as a person
# would see them (crates/bench/src/irq_bench/plot.rs tests); nroff (groff-base), to render
# the man pages (crates/faultline/tests/ux.rs).
set -euo pipefail
fail() { echo "scripts/tools.sh: $*" >&2; exit 1; }
need=()
command -v rsvg-convert >/dev/null 2>&1 || need+=(librsvg2-bin)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
command -v nroff >/dev/null 2>&1 || need+=(groff-base)
[ ${#need[@]} -eq 0 ] && exit 0
[ "$(id -u)" = 0 ] || fail "missing ${need[*]}: install it (apt-get install ${need[*]}) or run this as root"
command -v apt-get >/dev/null 2>&1 || fail "missing ${need[*]} and there is no apt-get to install it"
ls /var/lib/apt/lists/*Packages* >/dev/null 2>&1 || apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || fail "apt-get install ${need[*]} failed"
command -v rsvg-convert >/dev/null 2>&1 || fail "rsvg-convert is still missing after installing librsvg2-bin"
