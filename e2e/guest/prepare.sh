#!/usr/bin/env bash
# Builds what the kernel NBD e2e guest boots, under e2e/.cache/ (idempotent):
#   guest/vmlinux        Debian's 6.1 kernel, uncompressed, booted via its PVH note
#   guest/vmlinuz        the same kernel as bzImage (fallback)
#   guest/initramfs.gz   busybox, nbd-client and its libs, mmapcheck, nbd.ko + virtio-net modules, /init
# Env: R3MAP_GUEST_EXTRA_BINS="PATH..." adds dynamically linked binaries
# (stripped, with the libraries ldd lists) to /bin, and then the initramfs is
# written as guest/initramfs-extra.gz instead, so that a run with extra
# binaries and one without do not rebuild each other's image.
# R3MAP_GUEST_EXTRA_FILES="PATH..." copies files to /etc/r3map/ in the guest
# (credentials for the csi scenario); R3MAP_GUEST_IMAGE names the image
# (default initramfs-extra.gz), so that two scenarios with different extras
# do not rebuild each other's image either.
# R3MAP_GUEST_EXTRA_LIBS="PATH..." copies shared objects to the same path in
# the guest, with the libraries ldd lists: plugins a binary dlopens (nbdkit's
# memory plugin), which ldd of the binary does not show.
# The kernel package is fetched with `apt-get download` and unpacked with
# `dpkg -x`: nothing is installed system-wide. Prints the cache dir on success.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${R3MAP_E2E_CACHE:-$(cd "$here/.." && pwd)/.cache}
out=$cache/guest
mkdir -p "$cache/debs" "$out"
die() { echo "prepare.sh: $*" >&2; exit 1; }

# Concurrent runs (two test binaries, a developer and CI) must not interleave.
exec 9>"$cache/prepare.lock"
flock -w 600 9 || die "timed out waiting for $cache/prepare.lock"

for t in busybox nbd-client gcc cpio gzip depmod; do
  command -v "$t" >/dev/null || die "$t is missing: run 'bash .ci/install-deps' (as root)"
done
busybox=$(command -v busybox)
# ldd fails on a static binary, which is what the initramfs needs.
! ldd "$busybox" >/dev/null 2>&1 || die "$busybox is not static: install busybox-static"

# --- the kernel package ------------------------------------------------------
kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-6\.1\.[^ ]*-amd64$/{print $2; exit}'; }
pkg=$(kpkg || true)
if [ -z "$pkg" ] && ! ls "$cache"/debs/linux-image-6.1.*-amd64_*.deb >/dev/null 2>&1; then
  apt-get update -qq >/dev/null || die "apt-get update failed"
  pkg=$(kpkg || true)
fi
if [ -n "$pkg" ]; then
  deb=$(ls "$cache"/debs/"${pkg}"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    # apt-get download writes to the current directory.
    (cd "$cache/debs" && apt-get download -q "$pkg" >/dev/null 2>&1) || {
      apt-get update -qq >/dev/null || die "apt-get update failed"
      (cd "$cache/debs" && apt-get download -q "$pkg") || die "apt-get download $pkg failed"
    }
    deb=$(ls "$cache"/debs/"${pkg}"_*.deb | head -1)
  fi
else
  # No apt metadata for the kernel (offline): reuse what an earlier run fetched.
  deb=$(ls -t "$cache"/debs/linux-image-6.1.*-amd64_*.deb | head -1)
fi
[ -f "$deb" ] || die "no linux-image-6.1.*-amd64 package"

kname=$(basename "$deb" .deb)
kdir=$cache/kernel/$kname
# A new kernel package (Debian bumps the ABI) replaces everything built from
# the old one; the old unpacked tree and .deb go too (~500 MB each).
if [ "$(cat "$out/kernel" 2>/dev/null)" != "$kname" ]; then
  rm -f "$out/vmlinuz" "$out/vmlinux" "$out/initramfs.gz"
  find "$cache/kernel" -mindepth 1 -maxdepth 1 ! -name "$kname" -exec rm -rf {} + 2>/dev/null || true
  find "$cache/debs" -name '*.deb' ! -name "$kname.deb" -delete
  echo "$kname" >"$out/kernel"
fi
if [ ! -f "$kdir/.done" ]; then
  rm -rf "$kdir"; mkdir -p "$kdir"
  dpkg -x "$deb" "$kdir"
  touch "$kdir/.done"
fi
kver=$(ls "$kdir/lib/modules" | head -1)
[ -n "$kver" ] || die "no modules in $deb"
mods=$kdir/lib/modules/$kver
[ -f "$mods/modules.dep" ] || depmod -b "$kdir" "$kver"

# Module path (as in modules.dep) plus its dependencies, in load order.
moddeps() {
  local line
  line=$(grep -E "(^|/)$1\.ko(\.xz|\.zst)?:" "$mods/modules.dep") || die "module $1 not in $kver"
  local self=${line%%:*} deps=${line#*:} d
  for d in $deps; do echo "$d"; done | tac
  echo "$self"
}

# --- the kernel images ------------------------------------------------------
vmlinuz=$kdir/boot/vmlinuz-$kver
if [ ! -f "$out/vmlinuz" ]; then
  cp "$vmlinuz" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
  rm -f "$out/vmlinux"
fi
# An uncompressed ELF with a PVH entry note boots without the bzImage's
# self-decompression (seconds under TCG). Extracting it needs python3's lzma.
if [ ! -f "$out/vmlinux" ] && command -v python3 >/dev/null; then
  python3 - "$out/vmlinuz" "$out/vmlinux.tmp" <<'EOF' || rm -f "$out/vmlinux.tmp"
import lzma, sys
d = open(sys.argv[1], "rb").read()
i = d.find(b"\xfd7zXZ\x00")
if i < 0:
    sys.exit("bzImage is not xz-compressed")
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(d[i:])
if elf[:4] != b"\x7fELF":
    sys.exit("payload is not an ELF")
open(sys.argv[2], "wb").write(elf)
EOF
  # XEN_ELFNOTE_PHYS32_ENTRY (type 0x12) is what qemu's PVH loader needs.
  if [ -f "$out/vmlinux.tmp" ] && readelf -n "$out/vmlinux.tmp" 2>/dev/null | grep -q '(0x00000012)'; then
    mv "$out/vmlinux.tmp" "$out/vmlinux"
  else
    rm -f "$out/vmlinux.tmp"
  fi
fi

# --- the guest helper -------------------------------------------------------
if [ ! -f "$out/mmapcheck" ] || [ "$here/mmapcheck.c" -nt "$out/mmapcheck" ]; then
  gcc -static -O2 -Wall -Werror -o "$out/mmapcheck.tmp" "$here/mmapcheck.c"
  mv "$out/mmapcheck.tmp" "$out/mmapcheck"
fi

# --- the initramfs ----------------------------------------------------------
extra=(${R3MAP_GUEST_EXTRA_BINS:-})
img=initramfs.gz
[ ${#extra[@]} -gt 0 ] && img=${R3MAP_GUEST_IMAGE:-initramfs-extra.gz}
for b in "${extra[@]}"; do [ -x "$b" ] || die "extra binary $b is missing"; done
files=(${R3MAP_GUEST_EXTRA_FILES:-})
for f in "${files[@]}"; do [ -f "$f" ] || die "extra file $f is missing"; done
libs=(${R3MAP_GUEST_EXTRA_LIBS:-})
for f in "${libs[@]}"; do [ -f "$f" ] || die "extra library $f is missing"; done
scenarios=(netlink.sh csi.sh multiconn.sh demo.sh throughput.sh common.sh)
stamp_inputs=("$here/init" "${scenarios[@]/#/$here/}" "$here/prepare.sh" "$out/mmapcheck" "$deb" "$busybox" "$(command -v nbd-client)" "${extra[@]}" "${files[@]}" "${libs[@]}")
fresh=1
[ -f "$out/$img" ] || fresh=0
for f in "${stamp_inputs[@]}"; do
  [ "$fresh" = 1 ] && [ "$f" -nt "$out/$img" ] && fresh=0
done
if [ "$fresh" = 0 ]; then
  root=$(mktemp -d "$cache/root.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,lib/modules,lib64,etc}
  cp "$busybox" "$root/bin/busybox"
  for a in $("$busybox" --list); do
    [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"
  done
  cp "$out/mmapcheck" "$root/bin/mmapcheck"
  nbdc=$(command -v nbd-client)
  cp "$nbdc" "$root/bin/nbd-client"
  for b in "${extra[@]}"; do
    # Stripped: the release profile's line tables would only cost boot time.
    strip -o "$root/bin/$(basename "$b")" "$b" 2>/dev/null || cp "$b" "$root/bin/"
  done
  # Shared libraries at the paths ldd resolved them to, plus the loader.
  for l in "${libs[@]}"; do
    mkdir -p "$root$(dirname "$l")"
    cp -L "$l" "$root$l"
  done
  for lib in $(for b in "$nbdc" "${extra[@]}" "${libs[@]}"; do ldd "$b"; done | grep -oE '/[^ ]+' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  # Only the modules the guest needs, with their dependencies: the NIC and
  # the NBD client. virtio-net rather than e1000: its link is up at once,
  # where e1000's emulated autonegotiation costs ~2.5 s under TCG.
  for m in virtio_pci virtio_net nbd; do
    for p in $(moddeps $m); do
      b=$(basename "$p" | sed -E 's/\.(xz|zst)$//')
      grep -qx "$b" "$root/lib/modules/load" 2>/dev/null && continue
      echo "$b" >>"$root/lib/modules/load"
      f=$mods/$p
      case $f in
      *.xz) xz -dc "$f" >"$root/lib/modules/$(basename "$f" .xz)" ;;
      *.zst) zstd -qdc "$f" >"$root/lib/modules/$(basename "$f" .zst)" ;;
      *) cp "$f" "$root/lib/modules/" ;;
      esac
    done
  done
  mkdir -p "$root/etc/r3map"
  for f in "${files[@]}"; do cp "$f" "$root/etc/r3map/"; done
  cp "$here/init" "$root/init"
  for s in "${scenarios[@]}"; do
    cp "$here/$s" "$root/$s"
    chmod 755 "$root/$s"
  done
  chmod 755 "$root/init"
  (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1 >"$out/$img.tmp")
  mv "$out/$img.tmp" "$out/$img"
fi
echo "$out"
