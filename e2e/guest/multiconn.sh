#!/bin/busybox sh
# Guest scenario "multiconn" (kernel command line r3map_scenario=multiconn):
# the CSI node plugin with --connections 2 (two socketpairs per device, one
# per blk-mq hardware queue), the region service on the host as in csi.sh.
#   1. stage and publish; the device has 2 hardware queues and the plugin
#      serves 2 sockets;
#   2. two "pods" (mmapcheck mloop), one pinned to each CPU so that both
#      connections carry requests, msync piece after piece while
#      a. one connection is cut (the plugin's test hook, SIGUSR1: our end
#         closes as if its server died); the supervisor must RECONFIGURE a
#         replacement;
#      b. both connections are cut at once;
#      c. the plugin is killed with SIGKILL and restarted: the re-attach
#         RECONFIGUREs both sockets in one message;
#      after each, the kernel must have logged one "reconnected socket" per
#      replaced connection and the plugin must serve 2 sockets again;
#   3. the pods see no error; everything they msync'd reads back;
#      unpublish, unstage.
# The host (node/tests/guest_multiconn.rs) then checks every msync'd byte in
# the region. Markers as in csi.sh.
# Kernel parameters: r3map_host, r3map_port, r3map_seed, r3map_vol.
SCENARIO=multiconn FAIL_LOGS="/tmp/node-*.log /tmp/pod*.log"
. /common.sh

# The pods' writes, mirrored in node/tests/guest_multiconn.rs: pod K writes
# COUNT pieces of PIECE bytes from OFF + K * PIECE * COUNT, seed SEED + K.
N=2
OFF=1048576 PIECE=131072 COUNT=100
SEED=$((seed + 21))
LEN=$((PIECE * COUNT))
KUBELET=/var/lib/kubelet
STG=$KUBELET/plugins/kubernetes.io/csi/volumeDevices/staging/$vol
TGT=$KUBELET/pods/pod-1/volumeDevices/kubernetes.io~csi/$vol
mkdir -p $KUBELET /run/csi

# start_node LOG: starts the plugin in the background; sets $npid.
start_node() {
	rm -f /run/csi/a.sock
	R3MAP_LOG=info r3map-csi-node --endpoint unix:///run/csi/a.sock --nodeid node-a \
		--drivername test.r3map.io --state-dir /var/a --kubelet-dir $KUBELET \
		--region-service $host:$port --token-file /etc/r3map/token \
		--ca /etc/r3map/ca.crt --tls-name localhost \
		--connections $N --test-cut-on-usr1 >$1 2>&1 &
	npid=$!
	i=0
	until [ -S /run/csi/a.sock ]; do
		i=$((i + 1))
		[ $i -gt 600 ] && fail "the plugin did not listen"
		kill -0 $npid 2>/dev/null || { cat $1; fail "the plugin exited"; }
		sleep 0.1
	done
}
call() {
	timeout 300 r3map-csi-call --endpoint unix:///run/csi/a.sock "$@" >/tmp/call.out 2>&1
	rc=$?
	cat /tmp/call.out
	[ $rc = 0 ] || fail "call $* exited $rc"
}
# served: the plugin's unnamed unix stream sockets less the $base it has
# with no volume (tokio's signal self-pipe pair), i.e. its ends of the
# device's socketpairs (its gRPC sockets carry the endpoint's path, its
# region-service link is TCP).
served() {
	echo $(($(plugin_unnamed) - base))
}
plugin_unnamed() {
	for f in /proc/$npid/fd/*; do readlink "$f"; done 2>/dev/null |
		sed -n 's/^socket:\[\([0-9]*\)\]$/\1/p' >/tmp/inos
	awk 'NR == FNR { a[$1] = 1; next } FNR > 1 && NF == 7 && $5 == "0001" && ($7 in a) { n++ } END { print n + 0 }' /tmp/inos /proc/net/unix
}
# kheld: unnamed connected unix stream sockets that no process holds: the
# kernel's ends (nbd keeps a reference to each socket it was given).
kheld() {
	for f in /proc/[0-9]*/fd/*; do readlink "$f"; done 2>/dev/null |
		sed -n 's/^socket:\[\([0-9]*\)\]$/\1/p' >/tmp/allinos
	awk 'NR == FNR { a[$1] = 1; next } FNR > 1 && NF == 7 && $5 == "0001" && $6 == "03" && !($7 in a) { n++ } END { print n + 0 }' /tmp/allinos /proc/net/unix
}
reconnected() { dmesg | grep -c "nbd$idx: reconnected socket"; }
# replaced_in LOG: how many replacements the plugin logged (after the
# RECONFIGURE, its check that the kernel kept the socket, and serving it).
replaced_in() { grep -c "replaced a dead connection of nbd$idx" $1; }
# wait_replaced LOG BEFORE K: until LOG has K more replacements than BEFORE.
wait_replaced() {
	i=0
	until [ $(replaced_in $1) -ge $(($2 + $3)) ]; do
		i=$((i + 1)); [ $i -gt 600 ] && { tail -5 $1; fail "the plugin logged $(($(replaced_in $1) - $2)) replacements, want $3"; }
		sleep 0.1
	done
}
pieces() { grep -c '^[0-9]' /tmp/pod$1.log; }
# progress K: waits until both pods msync'd K more pieces (I/O flows on).
progress() {
	b0=$(pieces 0) b1=$(pieces 1) i=0
	until [ $(pieces 0) -ge $((b0 + $1)) ] || ! kill -0 $P0 2>/dev/null; do
		i=$((i + 1)); [ $i -gt 1800 ] && fail "pod 0 made no progress"; sleep 0.1
	done
	until [ $(pieces 1) -ge $((b1 + $1)) ] || ! kill -0 $P1 2>/dev/null; do
		i=$((i + 1)); [ $i -gt 1800 ] && fail "pod 1 made no progress"; sleep 0.1
	done
}
# expect_replaced WHAT BEFORE K LOG: waits until the kernel logged at least
# K more "reconnected socket" lines than BEFORE and the plugin serves $N
# sockets again. (More than K: a request that was in flight on a cut
# connection times out 30 s later and may take another connection down.)
expect_replaced() {
	i=0
	until [ $(reconnected) -ge $(($2 + $3)) ] && [ $(served) = $N ]; do
		i=$((i + 1))
		[ $i -gt 300 ] && { tail -5 $4; fail "$1: the kernel logged $(($(reconnected) - $2)) reconnected sockets (want $3), the plugin serves $(served) (want $N)"; }
		sleep 0.2
	done
	s=$(served) k=$(kheld)
	finding "${1}_replaced_s=$(dt $t_cut $(up)) ${1}_reconnected=$(($(reconnected) - $2)) ${1}_served=$s ${1}_kernel_held=$k"
	[ "$s" = $N ] || fail "$1: the plugin serves $s sockets, want $N"
	[ "$k" = $N ] || fail "$1: the kernel holds $k sockets, want $N"
}

# --- 1. stage and publish --------------------------------------------------
start_node /tmp/node-1.log
base=$(plugin_unnamed)
finding "plugin_sockets_without_volumes=$base"
CTX="--context regionId=$vol --context chunkSize=256KiB --context pullWorkers=4 --context durability=flush"
call stage --volume-id $vol --staging-path $STG $CTX
idx=$(grep -o '"device_index": [0-9]*' /var/a/volumes/$vol.json | grep -o '[0-9]*$')
[ -n "$idx" ] || { cat /var/a/volumes/$vol.json; fail "no device index recorded"; }
grep -q '"connections": 2' /var/a/volumes/$vol.json || { cat /var/a/volumes/$vol.json; fail "the record does not say 2 connections"; }
nq=$(ls /sys/block/nbd$idx/mq | wc -l)
s=$(served) k=$(kheld)
finding "device=nbd$idx hw_queues=$nq served=$s kernel_held=$k"
[ "$nq" = $N ] || fail "nbd$idx has $nq hardware queues, want $N (one per connection)"
[ "$s" = $N ] && [ "$k" = $N ] || fail "after stage: served $s, kernel holds $k, want $N"
t0=$(up)
call publish --volume-id $vol --staging-path $STG --target-path $TGT
# The publish opens the device (BLKROSET), which runs the partition scan:
# the first reads. In three of seven runs one of them went unanswered until
# the kernel's 30 s timer fired (docs/nbd-netlink.md, open); the plugin's
# log and the kernel's messages when it happens.
pub_s=$(dt $t0 $(up))
finding "publish_s=$pub_s"
awk -v s=$pub_s 'BEGIN { exit !(s > 20) }' && { tail -30 /tmp/node-1.log; dmesg | grep nbd; } | sed 's/^/R3MAP-GUEST: SLOW-PUBLISH /'
log "staged nbd$idx with $N connections"

# --- 2. the pods write; connections are cut under them ----------------------
taskset -c 0 mmapcheck mloop $TGT $OFF $PIECE $COUNT $SEED >/tmp/pod0.log 2>&1 &
P0=$!
taskset -c 1 mmapcheck mloop $TGT $((OFF + LEN)) $PIECE $COUNT $((SEED + 1)) >/tmp/pod1.log 2>&1 &
P1=$!
progress 3
D=/sys/kernel/debug/block/nbd$idx
r0=$(cat $D/hctx0/run) r1=$(cat $D/hctx1/run)
finding "hctx_runs_before_cut=$r0,$r1"
[ "$r0" -gt 0 ] && [ "$r1" -gt 0 ] || fail "not both hardware queues carried requests"

# a. one connection
c=$(reconnected) r=$(replaced_in /tmp/node-1.log)
t_cut=$(up)
kill -USR1 $npid
wait_replaced /tmp/node-1.log $r 1
expect_replaced one_cut $c 1 /tmp/node-1.log
progress 2
log "one connection cut and replaced"

# b. both connections at once (the second cut may land before or after the
# first replacement: either way two sockets die and two are replaced)
c=$(reconnected) r=$(replaced_in /tmp/node-1.log)
t_cut=$(up)
kill -USR1 $npid
# Apart: signals that arrive together are delivered once.
sleep 0.3
kill -USR1 $npid
wait_replaced /tmp/node-1.log $r 2
expect_replaced two_cuts $c 2 /tmp/node-1.log
progress 2
log "two connections cut and replaced"

# c. the plugin dies; its restart RECONFIGUREs both sockets at once
c=$(reconnected)
t_cut=$(up)
kill -9 $npid
wait $npid 2>/dev/null
finding "killed_plugin_after_pieces=$(pieces 0),$(pieces 1)"
sleep 1
start_node /tmp/node-2.log
wait_line /tmp/node-2.log "reattached $vol" 600 || { cat /tmp/node-2.log; fail "no re-attach after the restart"; }
grep 'r3map-csi-node:' /tmp/node-2.log
expect_replaced restart $c 2 /tmp/node-2.log
log "restart re-attached both connections"

i=0
while kill -0 $P0 2>/dev/null || kill -0 $P1 2>/dev/null; do
	i=$((i + 1)); [ $i -gt 3000 ] && fail "the pods did not finish within 300 s"; sleep 0.1
done
wait $P0; rc0=$?
wait $P1; rc1=$?
grep -h ERR /tmp/pod0.log /tmp/pod1.log && fail "a pod saw an I/O error"
[ $rc0 = 0 ] && [ $rc1 = 0 ] || fail "the pods exited $rc0, $rc1"
[ $(pieces 0) = $COUNT ] && [ $(pieces 1) = $COUNT ] || fail "the pods msync'd $(pieces 0), $(pieces 1) of $COUNT pieces"
g0=$(awk '{ if (n++) { g = $2 - p; if (g > m) m = g } p = $2 } END { printf "%.2f", m }' /tmp/pod0.log)
g1=$(awk '{ if (n++) { g = $2 - p; if (g > m) m = g } p = $2 } END { printf "%.2f", m }' /tmp/pod1.log)
finding "pod_pieces=$COUNT pod_max_gap_s=$g0,$g1"
timeout 120 mmapcheck check $TGT $OFF $LEN $SEED || fail "pod 0's writes do not read back"
timeout 120 mmapcheck check $TGT $((OFF + LEN)) $LEN $((SEED + 1)) || fail "pod 1's writes do not read back"
s=$(served)
[ "$s" = $N ] || fail "after the pods: the plugin serves $s sockets, want $N"
log "pods OK: no error, every piece reads back"
echo "--- kernel messages about nbd$idx"
dmesg | grep "nbd$idx" | sed 's/^/R3MAP-GUEST: DMESG /'

# --- 3. unpublish, unstage ----------------------------------------------------
call unpublish --volume-id $vol --target-path $TGT
call unstage --volume-id $vol --staging-path $STG
[ -e /var/a/volumes/$vol.json ] && fail "the record survived unstage"
kill $npid
wait $npid
log "unstaged"

log "PASS"
bye
