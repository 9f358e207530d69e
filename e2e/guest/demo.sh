#!/bin/busybox sh
# Guest scenario "demo" (kernel command line r3map_scenario=demo): runs
# `r3map-csi-demo --here` inside the guest, whose kernel has the NBD
# client: the region service, the controller and two node plugins all run
# here on loopback. Prints R3MAP-GUEST: PASS when the walkthrough passed.
# Kernel parameters: r3map_demo_size, r3map_demo_chunk, r3map_demo_all.
export PATH=/bin:/sbin
log() { echo "R3MAP-GUEST: $*"; }
bye() { sync; poweroff -f; sleep 5; echo o >/proc/sysrq-trigger; }
size=64MiB chunk=256KiB all=
for kv in $(cat /proc/cmdline); do
	case $kv in
	r3map_demo_size=*) size=${kv#*=} ;;
	r3map_demo_chunk=*) chunk=${kv#*=} ;;
	r3map_demo_all=1) all=--all ;;
	esac
done
M=/lib/modules
for m in $(cat $M/load); do
	insmod $M/$m || { log "FAIL insmod $m"; bye; }
done
ip link set lo up
mkdir -p /var/lib /tmp
if r3map-csi-demo --here --plain --size "$size" --chunk "$chunk" $all \
	--work /var/demo --kubelet-dir /var/lib/kubelet; then
	log "PASS"
else
	dmesg | grep -i nbd | tail -20
	log "FAIL the demo failed"
fi
bye
