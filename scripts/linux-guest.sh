#!/usr/bin/env bash
# Fetch Debian's cloud kernel (cached) and build a busybox initramfs for `faultline run --kernel`.
#   scripts/linux-guest.sh [DIR]      (default: .cache/linux)
# Produces DIR/vmlinuz (bzImage), DIR/vmlinux (ELF, extracted: the PVH entry avoids slow
# decompression under emulation) and DIR/initramfs.cpio.gz (busybox shell on the console).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$top/.cache/linux}
mkdir -p "$out"
export DEBIAN_FRONTEND=noninteractive

need() { # command package
  command -v "$1" >/dev/null 2>&1 && return
  [ -f /var/lib/apt/lists/lock ] && ls /var/lib/apt/lists/*Packages >/dev/null 2>&1 || apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}
need lz4 lz4
need cpio cpio
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need busybox busybox-static

if [ ! -s "$out/vmlinuz" ]; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  [ -n "$pkg" ] || { apt-get update -qq; pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}'); }
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1 && dpkg-deb -x "$pkg"_*.deb x)
  cp "$tmp"/x/boot/vmlinuz-* "$out/vmlinuz"
  rm -rf "$tmp"
fi

if [ ! -s "$out/vmlinux" ]; then
  # The bzImage payload: find the first compressed stream that decompresses to an ELF.
  python3 - "$out/vmlinuz" "$out/vmlinux" <<'PY'
import subprocess, sys
src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
tools = [(b"\x02\x21\x4c\x18", ["lz4", "-dc"]), (b"\xfd7zXZ\x00", ["xz", "-dc"]),
         (b"\x28\xb5\x2f\xfd", ["zstd", "-dcq"]), (b"\x1f\x8b\x08", ["gzip", "-dc"])]
for magic, cmd in tools:
    at = data.find(magic)
    while at >= 0:
        p = subprocess.run(cmd, input=data[at:], capture_output=True)
        if p.stdout[:4] == b"\x7fELF":
            open(dst, "wb").write(p.stdout)
            sys.exit(0)
        at = data.find(magic, at + 1)
sys.exit("no ELF payload found in " + src)
PY
fi

if [ ! -s "$out/initramfs.cpio.gz" ]; then
  bb=$(command -v busybox)
  root=$(mktemp -d)
  mkdir -p "$root"/{bin,proc,sys,dev}
  cp "$bb" "$root/bin/busybox"
  for a in sh mount cat echo uname; do ln -s busybox "$root/bin/$a"; done
  cat > "$root/init" <<'INIT'
#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "FAULTLINE_INITRAMFS_SHELL $(/bin/busybox uname -r)"
exec /bin/sh
INIT
  chmod +x "$root/init"
  (cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$out/initramfs.cpio.gz"
  rm -rf "$root"
fi
ls -la "$out"
