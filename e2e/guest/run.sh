#!/usr/bin/env bash
# Boots the e2e guest built by prepare.sh; its /init connects the kernel NBD
# client to r3map on the host's loopback (10.0.2.2 inside qemu's user
# network) and prints R3MAP-GUEST markers on this script's stdout.
#   run.sh PORT SEED
# Env: R3MAP_GUEST_TIMEOUT (s, default 240), R3MAP_GUEST_ACCEL (default tcg),
#      R3MAP_GUEST_KERNEL=vmlinux|vmlinuz (default: vmlinux if prepare.sh made one),
#      R3MAP_GUEST_INITRAMFS (default initramfs.gz; initramfs-extra.gz for
#      an image with R3MAP_GUEST_EXTRA_BINS), R3MAP_GUEST_APPEND (more
#      kernel parameters, e.g. r3map_scenario=netlink), R3MAP_GUEST_MEM
#      (default 512M; the guest's files live in RAM).
# Exits 0 only if the guest printed "R3MAP-GUEST: PASS".
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 PORT SEED" >&2; exit 2; }
port=$1 seed=$2
here=$(cd "$(dirname "$0")" && pwd)
out=${R3MAP_E2E_CACHE:-$(cd "$here/.." && pwd)/.cache}/guest
kernel=${R3MAP_GUEST_KERNEL:-}
if [ -z "$kernel" ]; then
  kernel=vmlinuz
  [ -f "$out/vmlinux" ] && kernel=vmlinux
fi
initrd=${R3MAP_GUEST_INITRAMFS:-initramfs.gz}
[ -f "$out/$kernel" ] && [ -f "$out/$initrd" ] || {
  echo "run.sh: $out/$kernel or $initrd missing: run prepare.sh first" >&2
  exit 2
}

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# -smp 2: the two-connection scenario puts one writer on each CPU so that both
# of nbd's hardware queues (one per connection) carry requests.
# The guest only talks to 10.0.2.2, which qemu's user network maps to the
# host's 127.0.0.1.
rc=0
timeout -k 5 "${R3MAP_GUEST_TIMEOUT:-240}" \
  qemu-system-x86_64 -accel "${R3MAP_GUEST_ACCEL:-tcg}" -m "${R3MAP_GUEST_MEM:-512M}" -smp 2 \
  -nographic -no-reboot -nodefaults -serial stdio -monitor none \
  -kernel "$out/$kernel" -initrd "$out/$initrd" \
  -append "console=ttyS0 quiet panic=-1 r3map_host=10.0.2.2 r3map_port=$port r3map_seed=$seed ${R3MAP_GUEST_APPEND:-}" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= </dev/null | tee "$log" || rc=$?
[ "$rc" = 124 ] && echo "run.sh: guest timed out" >&2
grep -q '^R3MAP-GUEST: PASS' <(tr -d '\r' <"$log")
