#!/bin/busybox sh
# Guest scenario "csi" (kernel command line r3map_scenario=csi; /init execs
# this after mounting /dev, /proc, /sys): the CSI node plugin
# r3map-csi-node runs here, the region service (`r3map backend`, TLS and a
# token) on the host at 10.0.2.2:PORT, and r3map-csi-call plays kubelet.
#   1. stage (twice: idempotent), publish to a target file (twice), stats;
#   2. a "pod" (mmapcheck mloop) mmaps the published device MAP_SHARED and
#      msyncs piece after piece; the plugin is killed with SIGKILL while it
#      writes and started again on the same --state-dir; the pod must see
#      no error; everything it msync'd reads back;
#   3. unpublish, unstage (each twice: idempotent); the device is gone;
#   4. node-a stages again and its plugin dies; a second plugin instance
#      (node-b: another node id and state dir) stages the volume, which
#      fences node-a off, and reads the content back; node-a's restarted
#      plugin refuses to re-attach (fenced), answers FAILED_PRECONDITION to
#      a stage, reports the volume abnormal, and unstages it cleanly.
# The host (node/tests/guest_csi.rs) then reads the region and checks every
# byte the pod msync'd. Markers as in netlink.sh.
# Kernel parameters: r3map_host, r3map_port, r3map_seed, r3map_vol.
SCENARIO=csi FAIL_LOGS="/tmp/node-*.log"
. /common.sh

# The pod's writes, mirrored in node/tests/guest_csi.rs: COUNT pieces of
# PIECE bytes from OFF, pattern seed SEED.
OFF=1048576 PIECE=262144 COUNT=48
SEED=$((seed + 11))
KUBELET=/var/lib/kubelet
STG=$KUBELET/plugins/kubernetes.io/csi/volumeDevices/staging/$vol
TGT=$KUBELET/pods/pod-1/volumeDevices/kubernetes.io~csi/$vol
TGT2=$KUBELET/pods/pod-2/volumeDevices/kubernetes.io~csi/$vol
mkdir -p $KUBELET /run/csi

# start_node TAG NODEID LOG: starts a plugin in the background; sets $npid.
start_node() {
	rm -f /run/csi/$1.sock
	R3MAP_LOG=info r3map-csi-node --endpoint unix:///run/csi/$1.sock --nodeid $2 \
		--drivername test.r3map.io --state-dir /var/$1 --kubelet-dir $KUBELET \
		--region-service $host:$port --token-file /etc/r3map/token \
		--ca /etc/r3map/ca.crt --tls-name localhost >$3 2>&1 &
	npid=$!
	i=0
	until [ -S /run/csi/$1.sock ]; do
		i=$((i + 1))
		[ $i -gt 600 ] && fail "plugin $1 did not listen"
		kill -0 $npid 2>/dev/null || { cat $3; fail "plugin $1 exited"; }
		sleep 0.1
	done
}
# call TAG ARGS...: one CSI call; fails the scenario unless it succeeds.
call() {
	t=$1; shift
	timeout 300 r3map-csi-call --endpoint unix:///run/csi/$t.sock "$@" >/tmp/call.out 2>&1
	rc=$?
	cat /tmp/call.out
	[ $rc = 0 ] || fail "call $* exited $rc"
}
# call_fail TAG CODE ARGS...: one CSI call that must fail with CODE.
call_fail() {
	t=$1 want=$2; shift 2
	timeout 300 r3map-csi-call --endpoint unix:///run/csi/$t.sock "$@" >/tmp/call.out 2>&1
	rc=$?
	cat /tmp/call.out
	[ $rc = 1 ] && grep -q "code=$want" /tmp/call.out || fail "call $* exited $rc, want code $want"
}
CTX="--context regionId=$vol --context chunkSize=256KiB --context pullWorkers=4 --context durability=flush"

# --- 1. stage and publish on node-a -------------------------------------------
start_node a node-a /tmp/node-a1.log
t0=$(up)
call a stage --volume-id $vol --staging-path $STG $CTX
finding "stage_s=$(dt $t0 $(up))"
call a stage --volume-id $vol --staging-path $STG $CTX
idx=$(grep -o '"device_index": [0-9]*' /var/a/volumes/$vol.json | grep -o '[0-9]*$')
[ -n "$idx" ] || { cat /var/a/volumes/$vol.json; fail "no device index recorded"; }
[ "$(cat /sys/block/nbd$idx/backend)" = "$vol" ] || fail "nbd$idx backend is not $vol"
finding "device=nbd$idx size=$(($(cat /sys/block/nbd$idx/size) * 512))"
log "staged $vol on nbd$idx"
# A read-only publish: the bind mount is remounted ro, which alone does not
# stop a writer of a device node; the plugin makes the device read-only
# (zeros at 0, where the volume holds zeros, should a write get through).
TGT_RO=$KUBELET/pods/pod-ro/volumeDevices/kubernetes.io~csi/$vol
call a publish --volume-id $vol --staging-path $STG --target-path $TGT_RO --readonly
ro_opt=$(grep " $TGT_RO " /proc/mounts | cut -d' ' -f4 | cut -d, -f1)
[ "$ro_opt" = ro ] || fail "read-only publish is mounted '$ro_opt'"
mmapcheck dwrite $TGT_RO 0 4096 zero 2>/tmp/ro.err
ro_rc=$?
finding "readonly_publish_write_rc=$ro_rc err='$(head -c 80 /tmp/ro.err)'"
[ $ro_rc != 0 ] || fail "a write through the read-only publish succeeded"
call a unpublish --volume-id $vol --target-path $TGT_RO
mmapcheck dwrite /dev/nbd$idx 0 4096 zero || fail "the device stayed read-only after the read-only publish went"
log "read-only publish refused a write"
call a publish --volume-id $vol --staging-path $STG --target-path $TGT
call a publish --volume-id $vol --staging-path $STG --target-path $TGT
[ -b $TGT ] || fail "$TGT is not a block device after publish"
call a stats --volume-id $vol --path $STG
grep -q 'abnormal=false' /tmp/call.out || fail "volume condition abnormal after stage"
log "published at $TGT"

# --- 2. the pod writes; the plugin is killed and restarted under it ----------
mmapcheck mloop $TGT $OFF $PIECE $COUNT $SEED >/tmp/pod.log 2>&1 &
POD=$!
wait_line /tmp/pod.log '^6 ' 1800 || { cat /tmp/pod.log; fail "the pod made no progress"; }
t_kill=$(up)
kill -9 $npid
wait $npid 2>/dev/null
n_kill=$(grep -c '^[0-9]' /tmp/pod.log)
finding "killed_plugin_after_pieces=$n_kill"
sleep 1
start_node a node-a /tmp/node-a2.log
wait_line /tmp/node-a2.log "reattached $vol" 600 || { cat /tmp/node-a2.log; fail "no re-attach after the restart"; }
t_re=$(up)
finding "restart_gap_s=$(dt $t_kill $t_re)"
grep 'r3map-csi-node:' /tmp/node-a2.log
i=0
while kill -0 $POD 2>/dev/null; do
	i=$((i + 1)); [ $i -gt 3000 ] && fail "the pod did not finish within 300 s"; sleep 0.1
done
wait $POD
prc=$?
tail -3 /tmp/pod.log
grep -q ERR /tmp/pod.log && fail "the pod saw an I/O error across the restart: $(grep ERR /tmp/pod.log)"
[ $prc = 0 ] || fail "the pod exited $prc"
n=$(grep -c '^[0-9]' /tmp/pod.log)
[ "$n" = $COUNT ] || fail "the pod msync'd $n of $COUNT pieces"
gap=$(awk '{ if (n++) { g = $2 - p; if (g > m) m = g } p = $2 } END { printf "%.2f", m }' /tmp/pod.log)
finding "pod_pieces=$n pod_max_gap_s=$gap"
timeout 120 mmapcheck check $TGT $OFF $((PIECE * COUNT)) $SEED || fail "the pod's writes do not read back on node-a"
call a stats --volume-id $vol --path $TGT
grep -q 'abnormal=false' /tmp/call.out || fail "volume condition abnormal after the restart"
log "restart OK: the pod saw no error, $n pieces read back"

# --- 3. unpublish and unstage (each twice) ------------------------------------
call a unpublish --volume-id $vol --target-path $TGT
call a unpublish --volume-id $vol --target-path $TGT
[ -e $TGT ] && fail "$TGT still exists after unpublish"
t0=$(up)
call a unstage --volume-id $vol --staging-path $STG
finding "unstage_s=$(dt $t0 $(up))"
call a unstage --volume-id $vol --staging-path $STG
[ -e /var/a/volumes/$vol.json ] && fail "the record survived unstage"
sleep 0.5
if [ -e /sys/block/nbd$idx ]; then
	finding "after_unstage=present size=$(cat /sys/block/nbd$idx/size)"
	[ "$(cat /sys/block/nbd$idx/size)" = 0 ] || fail "nbd$idx still sized after unstage"
else
	finding "after_unstage=destroyed"
fi
kill $npid
wait $npid
log "unstaged on node-a"

# --- 4. a second node takes the volume over; the first one is fenced ---------
# node-a stages again (a fresh stage: it fences the region at a new epoch)
# and its plugin dies; node-b stages the volume (fencing node-a off) and
# reads it back; node-a's restarted plugin must refuse to re-attach.
start_node a node-a /tmp/node-a3.log
call a stage --volume-id $vol --staging-path $STG $CTX
idx_a=$(grep -o '"device_index": [0-9]*' /var/a/volumes/$vol.json | grep -o '[0-9]*$')
kill -9 $npid
wait $npid 2>/dev/null
start_node b node-b /tmp/node-b.log
call b stage --volume-id $vol --staging-path $STG $CTX
call b publish --volume-id $vol --staging-path $STG --target-path $TGT2
timeout 120 mmapcheck check $TGT2 $OFF $((PIECE * COUNT)) $SEED || fail "the pod's writes do not read back on node-b"
timeout 60 mmapcheck check $TGT2 0 $OFF zero || fail "the bytes before the pod's range are not zero on node-b"
call b stats --volume-id $vol --path $TGT2
grep -q 'abnormal=false' /tmp/call.out || fail "volume condition abnormal on node-b"
log "node-b read the volume back"
pb=$npid
start_node a node-a /tmp/node-a4.log
grep 'r3map-csi-node:' /tmp/node-a4.log
grep -q "refused $vol.*fenced" /tmp/node-a4.log || fail "node-a's restarted plugin did not refuse the fenced volume"
call_fail a FailedPrecondition stage --volume-id $vol --staging-path $STG $CTX
call a stats --volume-id $vol --path $STG
grep -q 'abnormal=true' /tmp/call.out || fail "node-a's fenced volume is not abnormal"
call a unstage --volume-id $vol --staging-path $STG
[ -e /var/a/volumes/$vol.json ] && fail "node-a's record survived unstage"
sleep 0.5
[ -e /sys/block/nbd$idx_a ] && [ "$(cat /sys/block/nbd$idx_a/size)" != 0 ] && fail "node-a's nbd$idx_a still attached"
kill $npid
wait $npid
log "node-a fenced: re-attach refused, stage FAILED_PRECONDITION, unstage cleaned up"
# node-b is unaffected.
timeout 120 mmapcheck check $TGT2 $OFF $((PIECE * COUNT)) $SEED || fail "node-b lost the volume when node-a unstaged"
npid=$pb
call b unpublish --volume-id $vol --target-path $TGT2
call b unstage --volume-id $vol --staging-path $STG
kill $npid
wait $npid
log "node-b unstaged"

log "PASS"
bye
