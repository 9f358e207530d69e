#!/bin/busybox sh
# Guest scenario "throughput" (kernel command line r3map_scenario=throughput):
# informational numbers, not a regression gate (TCG emulation). Two devices,
# each attached through the kernel NBD client with 4 KiB blocks:
#   r3map:  r3map-csi-node stages and publishes volume r3map_vol (region
#           service on the host at 10.0.2.2, as in csi.sh);
#   nbdkit: `nbdkit memory` in this guest on a unix socket, attached by
#           nbd-client.
# For each: ready_s (from starting the stage call, or nbdkit, until the
# device has its size), then `mmapcheck mbench` (timed mmap write + msync,
# caches dropped, timed mmap read) of LEN bytes at 0, then an O_DIRECT check
# of the same bytes. FINDING keys: <path>_ready_s, <path>_write_s,
# <path>_read_s, bench_bytes. node/tests/guest_throughput.rs turns them into
# the table in docs/benchmarks.md and checks the r3map bytes in the region.
# Kernel parameters: r3map_host, r3map_port, r3map_seed, r3map_vol.
SCENARIO=throughput FAIL_LOGS="/tmp/node.log /tmp/nbdkit.log"
. /common.sh
# sized N TENTHS: waits until /dev/nbdN has a non-zero size.
sized() {
	i=0
	until [ "$(cat /sys/block/nbd$1/size 2>/dev/null || echo 0)" != 0 ]; do
		i=$((i + 1)); [ $i -gt "$2" ] && return 1; sleep 0.01
	done
}
command -v nbdkit >/dev/null || fail "no nbdkit in the initramfs"

# Mirrored in node/tests/guest_throughput.rs: LEN bytes at 0, seeds
# r3map_seed + 31 (r3map) and + 32 (nbdkit); the devices are SIZE bytes.
LEN=$((32 * 1048576)) SIZE=64M
finding "bench_bytes=$LEN"

# --- r3map: the node plugin stages and publishes -------------------------
KUBELET=/var/lib/kubelet
STG=$KUBELET/plugins/kubernetes.io/csi/volumeDevices/staging/$vol
TGT=$KUBELET/pods/pod-1/volumeDevices/kubernetes.io~csi/$vol
mkdir -p $KUBELET /run/csi
R3MAP_LOG=info r3map-csi-node --endpoint unix:///run/csi/a.sock --nodeid node-a \
	--drivername test.r3map.io --state-dir /var/a --kubelet-dir $KUBELET \
	--region-service $host:$port --token-file /etc/r3map/token \
	--ca /etc/r3map/ca.crt --tls-name localhost >/tmp/node.log 2>&1 &
npid=$!
i=0
until [ -S /run/csi/a.sock ]; do
	i=$((i + 1)); [ $i -gt 600 ] && fail "the plugin did not listen"
	kill -0 $npid 2>/dev/null || fail "the plugin exited"
	sleep 0.1
done
call() {
	timeout 300 r3map-csi-call --endpoint unix:///run/csi/a.sock "$@" >/tmp/call.out 2>&1 ||
		{ cat /tmp/call.out; fail "call $*"; }
}
CTX="--context regionId=$vol --context chunkSize=256KiB --context pullWorkers=4 --context durability=flush"
t0=$(up)
call stage --volume-id $vol --staging-path $STG $CTX
idx=$(grep -o '"device_index": [0-9]*' /var/a/volumes/$vol.json | grep -o '[0-9]*$')
[ -n "$idx" ] || fail "no device index recorded"
sized $idx 3000 || fail "nbd$idx has no size after stage"
finding "r3map_ready_s=$(dt $t0 $(up)) r3map_device=nbd$idx"
call publish --volume-id $vol --staging-path $STG --target-path $TGT
[ -b $TGT ] || fail "$TGT is not a block device after publish"
out=$(timeout 300 mmapcheck mbench $TGT 0 $LEN $((seed + 31))) || fail "mbench on r3map: $out"
finding "r3map_$(echo "$out" | sed 's/ / r3map_/')"
timeout 120 mmapcheck check $TGT 0 $LEN $((seed + 31)) || fail "r3map bytes do not read back"
log "r3map verified"
# Unstage pushes everything to the region, where the host test checks it.
call unpublish --volume-id $vol --target-path $TGT
call unstage --volume-id $vol --staging-path $STG
kill $npid
wait $npid
log "r3map unstaged"

# --- nbdkit memory, attached through nbd-client ----------------------------
dev=
for d in /sys/block/nbd*; do
	n=${d#/sys/block/nbd}
	[ "$n" != "$idx" ] && [ "$(cat $d/size)" = 0 ] && { dev=$n; break; }
done
[ -n "$dev" ] || fail "no free nbd device"
t0=$(up)
nbdkit -f -U /tmp/nbdkit.sock memory $SIZE >/tmp/nbdkit.log 2>&1 &
kpid=$!
i=0
until [ -S /tmp/nbdkit.sock ]; do
	i=$((i + 1)); [ $i -gt 3000 ] && fail "nbdkit did not listen"
	kill -0 $kpid 2>/dev/null || fail "nbdkit exited"
	sleep 0.01
done
# -b 4096 and -t 30: the node plugin's block size and I/O timeout.
timeout 60 nbd-client -u /tmp/nbdkit.sock /dev/nbd$dev -b 4096 -t 30 >/tmp/nbdc.log 2>&1 ||
	{ cat /tmp/nbdc.log; fail "nbd-client attach of nbdkit"; }
sized $dev 3000 || fail "nbd$dev has no size after nbd-client"
finding "nbdkit_ready_s=$(dt $t0 $(up)) nbdkit_device=nbd$dev"
out=$(timeout 300 mmapcheck mbench /dev/nbd$dev 0 $LEN $((seed + 32))) || fail "mbench on nbdkit: $out"
finding "nbdkit_$(echo "$out" | sed 's/ / nbdkit_/')"
timeout 120 mmapcheck check /dev/nbd$dev 0 $LEN $((seed + 32)) || fail "nbdkit bytes do not read back"
log "nbdkit verified"
timeout 60 nbd-client -d /dev/nbd$dev
kill $kpid
wait $kpid

log "PASS"
bye
