#!/bin/busybox sh
# Guest scenario "netlink" (kernel command line r3map_scenario=netlink; /init
# execs this after mounting /dev, /proc, /sys): the node plugin's attach path
# through the kernel's NBD netlink interface, with r3map-nbd-probe serving
# the volume from a file on the guest's rootfs over a socketpair.
#   1. attach (the kernel picks /dev/nbdN), check sysfs backend/size/pid,
#      write with O_DIRECT dd and mmap+msync, read back;
#   2. restart: a writer loop runs, the server is killed with SIGKILL, a new
#      probe re-attaches with RECONFIGURE; the writer must see no error and
#      everything written must read back;
#   3. RECONFIGURE while the server is alive (the kernel drops the socket);
#   4. detach (DISCONNECT; the device is destroyed);
#   5. no server comes back: I/O fails with EIO after dead_conn_timeout;
#   6. no io_timeout: what happens to requests in flight at the kill.
# Markers: "R3MAP-GUEST: FINDING k=v" records a measurement, PASS/FAIL as in
# /init. node/tests/guest_netlink.rs asserts on them.
export PATH=/bin:/sbin
log() { echo "R3MAP-GUEST: $*"; }
up() { cut -d' ' -f1 /proc/uptime; }
# Seconds between two uptimes, with two decimals.
dt() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
bye() { sync; poweroff -f; sleep 5; echo o >/proc/sysrq-trigger; }
fail() {
	log "FAIL $*"
	dmesg | grep -i nbd | tail -30
	bye
}
step() {
	t=$1; shift
	timeout "$t" "$@" || fail "step failed (rc=$?): $*"
}
finding() { log "FINDING $*"; }

seed=1
for kv in $(cat /proc/cmdline); do
	case $kv in r3map_seed=*) seed=${kv#*=} ;; esac
done
S() { echo $((seed + $1)); }
MIB=1048576
SIZE=64MiB
# The timeouts under test (seconds): an in-flight request is requeued after
# IO_T; new I/O waits up to DEAD_T for a replacement socket.
IO_T=5
DEAD_T=30

insmod /lib/modules/nbd.ko || fail "insmod nbd"
P=r3map-nbd-probe

# attach ID FILE IO_T DEAD_T: starts a serving probe in the background; sets
# $idx and $ppid_ (the probe's pid).
attach() {
	rm -f /tmp/$1.idx
	args="--backend file:/tmp/$1.img --size $SIZE --id $1 --index-file /tmp/$1.idx"
	[ -n "$2" ] && args="$args --io-timeout $2"
	[ -n "$3" ] && args="$args --dead-conn-timeout $3"
	$P attach $args >/tmp/$1.log 2>&1 &
	ppid_=$!
	i=0
	while [ ! -f /tmp/$1.idx ]; do
		i=$((i + 1))
		[ $i -gt 300 ] && { cat /tmp/$1.log; fail "attach $1 gave no index"; }
		kill -0 $ppid_ 2>/dev/null || { cat /tmp/$1.log; fail "attach $1 exited"; }
		sleep 0.1
	done
	idx=$(cat /tmp/$1.idx)
	cat /tmp/$1.log
}
ddirect() { # ddirect DEV OFF LEN SEED BS
	mmapcheck gen "$2" "$3" "$4" >/tmp/pat || fail "gen"
	step 60 dd if=/tmp/pat of="$1" bs="$5" seek=$(($2 / $5)) count=$(($3 / $5)) \
		oflag=direct conv=notrunc 2>/dev/null
	rm /tmp/pat
}
# A writer loop of 256 KiB O_DIRECT writes from 8 MiB on, one seed each,
# until /tmp/stop-$1 exists; logs "i end-uptime" per write to /tmp/w-$1.log
# and "ERR i rc" on a failure.
WBASE=$((8 * MIB)) WLEN=262144 WMAX=200
writer() {
	dev=$1 tag=$2
	: >/tmp/w-$tag.log
	i=0
	while [ $i -lt $WMAX ] && [ ! -f /tmp/stop-$tag ]; do
		mmapcheck dwrite $dev $((WBASE + i * WLEN)) $WLEN $(S $((100 + i))) || {
			echo "ERR $i $? $(up)" >>/tmp/w-$tag.log
			return 1
		}
		echo "$i $(up)" >>/tmp/w-$tag.log
		i=$((i + 1))
	done
}
# Largest gap between consecutive completions in a writer log.
maxgap() { awk '$1 != "ERR" { if (n++) { g = $2 - p; if (g > m) m = g } p = $2 } END { printf "%.2f", m }' "$1"; }
wcount() { grep -vc ERR "$1"; }
# Reads back every write the writer logged as done.
wcheck() {
	dev=$1 tag=$2
	n=$(wcount /tmp/w-$tag.log)
	i=0
	while [ $i -lt "$n" ]; do
		mmapcheck check $dev $((WBASE + i * WLEN)) $WLEN $(S $((100 + i))) ||
			fail "writer region $i ($tag) does not read back"
		i=$((i + 1))
	done
	echo "$n"
}
wait_line() { # wait_line FILE PATTERN TENTHS
	i=0
	until grep -q "$2" "$1" 2>/dev/null; do
		i=$((i + 1)); [ $i -gt "$3" ] && return 1; sleep 0.1
	done
}

log "netlink scenario at $(up)s (io_timeout=$IO_T dead_conn_timeout=$DEAD_T)"

# --- 1. attach -------------------------------------------------------------
attach pvc-a $IO_T $DEAD_T
A=$idx P1=$ppid_
DEV=/dev/nbd$A
i=0
while [ ! -b $DEV ]; do i=$((i + 1)); [ $i -gt 50 ] && fail "no $DEV"; sleep 0.1; done
finding "attach_index=$A"
be=$(cat /sys/block/nbd$A/backend 2>/dev/null)
[ "$be" = pvc-a ] || fail "/sys/block/nbd$A/backend is '$be', want pvc-a"
sz=$(($(cat /sys/block/nbd$A/size) * 512))
[ $sz = $((64 * MIB)) ] || fail "nbd$A size $sz"
finding "sysfs_pid=$(cat /sys/block/nbd$A/pid 2>/dev/null) probe_pid=$P1"
log "attached nbd$A backend=$be size=$sz"
step 10 $P status --index $A | grep -q "connected=1" || fail "status after attach"
# R1: O_DIRECT dd; R2: mmap MAP_SHARED + msync.
ddirect $DEV $((1 * MIB)) $((1 * MIB)) $(S 1) 65536
step 60 mmapcheck mmap $DEV $((4 * MIB + 4096)) $((1 * MIB)) $(S 2)
step 60 mmapcheck check $DEV $((1 * MIB)) $((1 * MIB)) $(S 1)
step 60 mmapcheck mcheck $DEV $((4 * MIB + 4096)) $((1 * MIB)) $(S 2)
step 30 blockdev --flushbufs $DEV
log "written and read back at $(up)s"

# --- 2. restart under load -------------------------------------------------
writer $DEV a &
W=$!
wait_line /tmp/w-a.log '^5 ' 300 || fail "writer made no progress"
# Stop the server first so that the writer's next request is surely in
# flight (sent, unanswered) when the socket dies; then kill it.
kill -STOP $P1
sleep 0.5
t_kill=$(up)
kill -9 $P1
wait $P1 2>/dev/null
n_kill=$(wcount /tmp/w-a.log)
log "killed the server (pid $P1) at ${t_kill}s after $n_kill writes, one in flight"
sleep 1
finding "dead_status_connected=$($P status --index $A | sed -n 's/.*connected=//p')"
finding "dead_sysfs_pid=$(cat /sys/block/nbd$A/pid 2>/dev/null)"
# A probe for another volume must refuse this device.
$P reattach --index $A --backend file:/tmp/pvc-x.img --size $SIZE --id pvc-x >/tmp/x.log 2>&1
rc=$?
cat /tmp/x.log
[ $rc = 3 ] || fail "reattach with the wrong id exited $rc, want 3 (refused)"
# Without our check, the kernel itself refuses a mismatching identifier.
$P reattach --no-sysfs-check --index $A --backend file:/tmp/pvc-x.img --size $SIZE --id pvc-x >/tmp/x.log 2>&1
rc=$?
cat /tmp/x.log
finding "kernel_wrong_id_reconfigure_exit=$rc $(grep -o 'answered [A-Z]*' /tmp/x.log)"
grep -q 'answered EINVAL' /tmp/x.log || fail "the kernel accepted a RECONFIGURE with another identifier"
sleep 1
$P reattach --index $A --backend file:/tmp/pvc-a.img --size $SIZE --id pvc-a >/tmp/p2.log 2>&1 &
P2=$!
wait_line /tmp/p2.log 'reattached' 300 || { cat /tmp/p2.log; fail "reattach did not finish"; }
t_re=$(up)
cat /tmp/p2.log
finding "restart_gap_s=$(dt $t_kill $t_re)"
finding "reattached_sysfs_pid=$(cat /sys/block/nbd$A/pid 2>/dev/null) new_probe_pid=$P2"
# Let the writer run on the new server, past one io_timeout.
wait_line /tmp/w-a.log "^$((n_kill + 20)) " $(((IO_T + 30) * 10)) || true
touch /tmp/stop-a
wait $W
wrc=$?
cat /tmp/w-a.log | tail -3
grep -q ERR /tmp/w-a.log && fail "the writer saw an I/O error across the restart: $(grep ERR /tmp/w-a.log)"
[ $wrc = 0 ] || fail "writer exited $wrc"
n_end=$(wcount /tmp/w-a.log)
[ "$n_end" -gt $((n_kill + 1)) ] || fail "the writer made no progress after the restart ($n_kill -> $n_end)"
finding "restart_writer_max_gap_s=$(maxgap /tmp/w-a.log) writes_before_kill=$n_kill writes_total=$n_end"
step 30 blockdev --flushbufs $DEV
checked=$(wcheck $DEV a)
step 60 mmapcheck check $DEV $((1 * MIB)) $((1 * MIB)) $(S 1)
step 60 mmapcheck mcheck $DEV $((4 * MIB + 4096)) $((1 * MIB)) $(S 2)
log "restart OK: no writer error, $checked writer regions + R1 + R2 read back at $(up)s"

# --- 3. RECONFIGURE while the server is alive -------------------------------
$P reattach --index $A --backend file:/tmp/pvc-a.img --size $SIZE --id pvc-a >/tmp/p3.log 2>&1
rc=$?
cat /tmp/p3.log
finding "reconfigure_while_alive_exit=$rc"
[ $rc = 4 ] || fail "RECONFIGURE while the server is alive: probe exited $rc, want 4 (socket dropped)"
kill -0 $P2 || fail "the live server died when a second RECONFIGURE came"
step 60 mmapcheck check $DEV $((1 * MIB)) $((1 * MIB)) $(S 1)
log "RECONFIGURE with a live server: success reported, socket dropped, old server still serving"

# --- 4. detach ---------------------------------------------------------------
step 30 $P detach --index $A
i=0
while kill -0 $P2 2>/dev/null; do
	i=$((i + 1)); [ $i -gt 100 ] && fail "the server did not exit after DISCONNECT"; sleep 0.1
done
wait $P2
prc=$?
cat /tmp/p2.log | tail -2
[ $prc = 0 ] || fail "server exited $prc after DISCONNECT"
sleep 0.5
if [ -e /sys/block/nbd$A ]; then
	finding "after_detach=present size=$(cat /sys/block/nbd$A/size) backend=$(cat /sys/block/nbd$A/backend 2>/dev/null)"
else
	finding "after_detach=destroyed"
fi
log "detached at $(up)s"

# --- 5. nobody comes back: EIO after dead_conn_timeout -----------------------
DT5=5
attach pvc-b $IO_T $DT5
B=$idx PB=$ppid_
finding "second_attach_index=$B"
ddirect /dev/nbd$B 0 65536 $(S 3) 65536
kill -9 $PB
wait $PB 2>/dev/null
t0=$(up)
mmapcheck check /dev/nbd$B 0 65536 $(S 3) 2>/tmp/e1
r1=$?
t1=$(up)
mmapcheck check /dev/nbd$B 0 65536 $(S 3) 2>/tmp/e2
r2=$?
t2=$(up)
finding "dead_read1_rc=$r1 after_s=$(dt $t0 $t1) err='$(head -c 120 /tmp/e1)'"
finding "dead_read2_rc=$r2 after_s=$(dt $t1 $t2)"
[ $r1 != 0 ] || fail "a read with no server came back succeeded"
grep -qi "input/output" /tmp/e1 || fail "the read did not fail with EIO: $(cat /tmp/e1)"
# Can a server still come back after the expiry?
$P reattach --index $B --backend file:/tmp/pvc-b.img --size $SIZE --id pvc-b >/tmp/pb2.log 2>&1 &
PB2=$!
if wait_line /tmp/pb2.log 'reattached\|error\|refused\|DROPPED' 100; then
	mmapcheck check /dev/nbd$B 0 65536 $(S 3) 2>/tmp/e3
	rr=$?
	finding "after_expiry_reattach='$(grep -o 'reattached.*\|error.*\|refused.*\|DROPPED.*' /tmp/pb2.log | head -1)' read_rc=$rr $(head -c 80 /tmp/e3)"
else
	finding "after_expiry_reattach=hung"
fi
step 30 $P detach --index $B
kill $PB2 2>/dev/null
wait $PB2 2>/dev/null
log "dead_conn_timeout expiry gives EIO at $(up)s"

# --- 6. no io_timeout: requests in flight at the kill ------------------------
attach pvc-c "" $DEAD_T
C=$idx PC=$ppid_
rm -f /tmp/stop-c
writer /dev/nbd$C c &
W=$!
wait_line /tmp/w-c.log '^5 ' 300 || fail "writer c made no progress"
kill -STOP $PC
sleep 0.5
t_kill=$(up)
kill -9 $PC
wait $PC 2>/dev/null
n_kill=$(wcount /tmp/w-c.log)
sleep 2
$P reattach --index $C --backend file:/tmp/pvc-c.img --size $SIZE --id pvc-c >/tmp/pc2.log 2>&1 &
PC2=$!
wait_line /tmp/pc2.log 'reattached' 300 || { cat /tmp/pc2.log; fail "reattach c did not finish"; }
# Up to 45 s for progress: the block layer's default request timeout is 30 s.
if wait_line /tmp/w-c.log "^$((n_kill + 3)) " 450; then
	finding "no_io_timeout_resumed_after_s=$(dt $t_kill $(up)) max_gap_s=$(maxgap /tmp/w-c.log)"
else
	finding "no_io_timeout_resumed=no within 45s of the restart"
fi
touch /tmp/stop-c
step 60 $P detach --index $C
wait $W
finding "no_io_timeout_writer_exit=$? $(grep ERR /tmp/w-c.log)"
wait $PC2
dmesg | grep -i nbd | tail -25

log "PASS"
bye
