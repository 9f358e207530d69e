#!/usr/bin/env bash
# r3map-csi on a real cluster: install the chart, write through an mmap of
# a block PVC on one node, move the pod to another node, verify every byte,
# report the downtime, uninstall and check that nothing is left.
#
# Needs (it checks each and stops with a message naming what is missing):
#   - kubectl and helm on PATH (bash .ci/install-deps installs both);
#   - a cluster in KUBECONFIG (or ~/.kube/config) with cluster-admin rights;
#   - at least 2 schedulable, Ready nodes;
#   - nbd.ko loadable on those nodes (checked with a privileged pod that
#     runs `modprobe nbd && ls /sys/module/nbd` on each);
#   - R3MAP_IMAGE: REPOSITORY:TAG of an image built from
#     charts/r3map-csi/Dockerfile that the nodes can pull;
#   - no r3map-csi driver installed already (the CSIDriver is cluster-wide).
#
# Knobs: R3MAP_E2E_APP_IMAGE (python:3-slim), R3MAP_E2E_MIB (64, MiB
# written), R3MAP_E2E_RWX (1: also the ReadWriteMany live-migration
# variant, skipped with a note if the PVC does not bind), R3MAP_E2E_TIMEOUT
# (300 s per wait), R3MAP_E2E_KEEP (1: leave everything installed).
set -euo pipefail

say() { printf 'e2e/cluster: %s\n' "$*" >&2; }
die() { say "STOP: $*"; exit 1; }

# --- What it needs: everything that does not need the cluster first. ---
for tool in kubectl helm; do
  command -v "$tool" >/dev/null 2>&1 ||
    die "$tool is not on PATH (bash .ci/install-deps installs helm and kubectl)"
done
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
app_image=${R3MAP_E2E_APP_IMAGE:-python:3-slim}
mib=${R3MAP_E2E_MIB:-64}
rwx=${R3MAP_E2E_RWX:-1}
timeout=${R3MAP_E2E_TIMEOUT:-300}
suffix=$(date +%s)
ns=r3map-e2e-$suffix
release=r3map-e2e
sc=r3map-e2e-$suffix
driver=r3map.csi.r3map.io

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

[ -n "${R3MAP_IMAGE:-}" ] ||
  die "set R3MAP_IMAGE=REPOSITORY:TAG to an r3map-csi image the nodes can pull (built from charts/r3map-csi/Dockerfile)"
case $R3MAP_IMAGE in
  *:*) image_repo=${R3MAP_IMAGE%:*} image_tag=${R3MAP_IMAGE##*:} ;;
  *) die "R3MAP_IMAGE=$R3MAP_IMAGE has no :TAG" ;;
esac
kc=${KUBECONFIG:-$HOME/.kube/config}
found=0
IFS=: read -ra kcs <<< "$kc"
for f in "${kcs[@]}"; do [ -f "$f" ] && found=1; done
[ "$found" = 1 ] || die "no kubeconfig: KUBECONFIG=$kc names no file (point KUBECONFIG at the cluster to test)"
k() { kubectl --request-timeout=30s "$@"; }
if ! err=$(k get --raw /version 2>&1 >/dev/null); then
  die "cannot reach a cluster through KUBECONFIG=$kc: ${err//$'\n'/ }"
fi
k auth can-i '*' '*' --all-namespaces >/dev/null 2>&1 ||
  die "the credentials in KUBECONFIG=$kc are not cluster-admin (the chart installs cluster-wide objects)"
if k get csidriver "$driver" >/dev/null 2>&1; then
  die "a CSIDriver $driver exists already: uninstall that r3map-csi first"
fi

# Schedulable: Ready, not cordoned, no NoSchedule/NoExecute taint.
# shellcheck disable=SC2016 # a Go template, not shell
ready_tpl='{{range .items}}{{$ok := true}}{{if .spec.unschedulable}}{{$ok = false}}{{end}}{{range .spec.taints}}{{if or (eq .effect "NoSchedule") (eq .effect "NoExecute")}}{{$ok = false}}{{end}}{{end}}{{range .status.conditions}}{{if and (eq .type "Ready") (ne .status "True")}}{{$ok = false}}{{end}}{{end}}{{if $ok}}{{.metadata.name}}{{"\n"}}{{end}}{{end}}'
mapfile -t nodes < <(k get nodes -o go-template="$ready_tpl")
[ "${#nodes[@]}" -ge 2 ] ||
  die "needs at least 2 schedulable Ready nodes, found ${#nodes[@]} (${nodes[*]:-none})"
node_a=${nodes[0]} node_b=${nodes[1]}
say "nodes: $node_a (first) and $node_b (second) of ${#nodes[@]} schedulable"

# --- From here on the cluster changes: undo it whatever happens. ---
crd_before=0
k get crd r3mapvolumes.r3map.io >/dev/null 2>&1 && crd_before=1
cleanup() {
  local rc=$?
  k uncordon "$node_a" >/dev/null 2>&1 || true
  if [ "${R3MAP_E2E_KEEP:-0}" = 1 ]; then
    say "R3MAP_E2E_KEEP=1: left namespace $ns and release $release installed"
  elif [ "$rc" -ne 0 ]; then
    say "failed (exit $rc): removing what the run installed"
    k delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
    helm uninstall "$release" -n "$ns" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
k create namespace "$ns" >/dev/null
# The node plugin (and the nbd check) run privileged: Pod Security
# Admission must let them.
k label namespace "$ns" pod-security.kubernetes.io/enforce=privileged >/dev/null

# A pod pinned to a node (or away from one) that runs a shell command.
# pod NAME IMAGE AFFINITY_OP NODE PRIVILEGED CMD [CLAIM]
pod() {
  local name=$1 image=$2 op=$3 node=$4 priv=$5 cmd=$6 claim=${7:-}
  cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $name
  namespace: $ns
  labels: {app: r3map-e2e}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 5
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
          - matchExpressions:
              - {key: kubernetes.io/hostname, operator: $op, values: ["$node"]}
  tolerations: [{operator: Exists, effect: NoSchedule}]
  containers:
    - name: main
      image: $image
      command: ["sh", "-c", "$cmd"]
      securityContext: {privileged: $priv, runAsUser: 0}
EOF
  if [ -n "$claim" ]; then
    cat <<EOF
      volumeDevices: [{name: data, devicePath: /dev/xvda}]
      volumeMounts: [{name: prog, mountPath: /prog}]
  volumes:
    - {name: data, persistentVolumeClaim: {claimName: $claim}}
    - {name: prog, configMap: {name: r3map-e2e-workload}}
EOF
  else
    cat <<EOF
      volumeMounts: [{name: modules, mountPath: /lib/modules, readOnly: true}]
  volumes:
    - {name: modules, hostPath: {path: /lib/modules, type: Directory}}
EOF
  fi
}

# wait_phase POD PHASE...: until the pod reaches one of the phases.
wait_phase() {
  local name=$1 phase deadline=$((SECONDS + timeout))
  shift
  while :; do
    phase=$(k get pod "$name" -n "$ns" -o jsonpath='{.status.phase}' 2>/dev/null || true)
    for want in "$@"; do [ "$phase" = "$want" ] && { echo "$phase"; return 0; }; done
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
}

# wait_log POD TEXT: until the pod's log has TEXT (polled every 0.2 s).
# Fails at once on a MISMATCH line.
wait_log() {
  local name=$1 text=$2 log deadline=$((SECONDS + timeout))
  while :; do
    log=$(k logs "$name" -n "$ns" 2>/dev/null || true)
    case $log in *MISMATCH*) say "$name: $log"; return 1 ;; esac
    case $log in *"$text"*) printf '%s\n' "$log"; return 0 ;; esac
    [ "$SECONDS" -lt "$deadline" ] || { say "$name: no '$text' after ${timeout}s"; return 1; }
    sleep 0.2
  done
}

# --- nbd.ko on both nodes. ---
for n in "$node_a" "$node_b"; do
  p=nbd-check-$(printf '%s' "$n" | tr -c 'a-z0-9-' '-' | cut -c1-40)
  pod "$p" "$R3MAP_IMAGE" In "$n" true "modprobe nbd && ls /sys/module/nbd" | k apply -f - >/dev/null
  phase=$(wait_phase "$p" Succeeded Failed) || die "the nbd check pod on $n did not finish in ${timeout}s (image pullable? $(k get pod "$p" -n "$ns" -o jsonpath='{.status.containerStatuses[0].state}' 2>/dev/null))"
  if [ "$phase" != Succeeded ]; then
    die "nbd.ko is not loadable on node $n (modprobe nbd && ls /sys/module/nbd said: $(k logs "$p" -n "$ns" 2>&1 | tr '\n' ' '))"
  fi
  k delete pod "$p" -n "$ns" --wait=false >/dev/null
done
say "nbd.ko loads on $node_a and $node_b"

# --- Install. ---
store=()
if [ -z "$(k get storageclass -o jsonpath='{.items[?(@.metadata.annotations.storageclass\.kubernetes\.io/is-default-class=="true")].metadata.name}')" ]; then
  say "no default StorageClass: the region service keeps regions in memory (regionService.store=memory:)"
  store=(--set regionService.store=memory:)
fi
t=$(now)
helm install "$release" "$root/charts/r3map-csi" -n "$ns" --wait --timeout "${timeout}s" \
  --set image.repository="$image_repo" --set image.tag="$image_tag" \
  --set storageClass.name="$sc" --set regionService.persistence.whenDeleted=Delete \
  "${store[@]}" >/dev/null
# `helm --wait` skips an OnDelete DaemonSet: wait for its pods.
deadline=$((SECONDS + timeout))
while :; do
  read -r ready want < <(k get ds "$release-node" -n "$ns" \
    -o jsonpath='{.status.numberReady} {.status.desiredNumberScheduled}{"\n"}') || true
  [ "${want:-0}" -gt 0 ] && [ "$ready" = "$want" ] && break
  [ "$SECONDS" -lt "$deadline" ] || die "node plugins not ready after ${timeout}s ($ready of $want)"
  sleep 2
done
say "installed in $(secs "$t" "$(now)") s (namespace $ns)"
k create configmap r3map-e2e-workload -n "$ns" --from-file=workload.py="$here/workload.py" >/dev/null

pvc() {
  cat <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1, namespace: $ns}
spec:
  storageClassName: $sc
  volumeMode: Block
  accessModes: [$2]
  resources: {requests: {storage: 1Gi}}
EOF
}
run_workload() { # NAME OP NODE MODE SEED CLAIM
  pod "$1" "$app_image" "$2" "$3" false "exec python3 /prog/workload.py $4 /dev/xvda $mib $5" "$6" |
    k apply -f - >/dev/null
}
wait_bound() { # CLAIM
  k wait --for=jsonpath='{.status.phase}'=Bound "pvc/$1" -n "$ns" --timeout="${timeout}s" >/dev/null 2>&1
}

# --- ReadWriteOnce: the old pod is gone before the new one starts. ---
pvc data-rwo ReadWriteOnce | k apply -f - >/dev/null
wait_bound data-rwo || die "the ReadWriteOnce block PVC did not bind: $(k describe pvc data-rwo -n "$ns" | tail -5)"
run_workload writer In "$node_a" write rwo-"$suffix" data-rwo
t=$(now)
wait_log writer "r3map-e2e: wrote" >/dev/null || die "the writer did not write"
say "RWO: writer on $node_a wrote and msynced $mib MiB ($(secs "$t" "$(now)") s from pod creation)"
k cordon "$node_a" >/dev/null
t0=$(now)
k delete pod writer -n "$ns" --wait=false >/dev/null
run_workload reader NotIn "$node_a" verify rwo-"$suffix" data-rwo
line=$(wait_log reader "r3map-e2e: verified") || die "RWO: the data did not survive the move"
t1=$(now)
where=$(k get pod reader -n "$ns" -o jsonpath='{.spec.nodeName}')
say "RWO: reader on $where verified every byte"
say "RWO downtime (old pod deleted -> new pod verified): $(secs "$t0" "$t1") s; in the new pod: ${line##*bytes in }"
k delete pod reader -n "$ns" --wait=true >/dev/null
k uncordon "$node_a" >/dev/null

# --- ReadWriteMany: live migration (both attached, then the old detaches). ---
if [ "$rwx" = 1 ]; then
  pvc data-rwx ReadWriteMany | k apply -f - >/dev/null
  if ! wait_bound data-rwx; then
    say "RWX: skipped, the ReadWriteMany block PVC did not bind: $(k get events -n "$ns" --field-selector involvedObject.name=data-rwx -o jsonpath='{.items[*].message}')"
    k delete pvc data-rwx -n "$ns" --wait=false >/dev/null
  else
    run_workload writer-rwx In "$node_a" write rwx-"$suffix" data-rwx
    wait_log writer-rwx "r3map-e2e: wrote" >/dev/null || die "RWX: the writer did not write"
    # The reader's node attaches while the writer runs: pre-copy; its
    # device waits until the writer's node lets go.
    run_workload reader-rwx In "$node_b" verify rwx-"$suffix" data-rwx
    # Attached on the second node (ControllerPublish: the pre-copy runs);
    # the reader's pod may not run before the hand-over.
    pv=$(k get pvc data-rwx -n "$ns" -o jsonpath='{.spec.volumeName}')
    deadline=$((SECONDS + timeout))
    until k get volumeattachments -o jsonpath='{range .items[?(@.spec.source.persistentVolumeName=="'"$pv"'")]}{.spec.nodeName}={.status.attached}{"\n"}{end}' |
        grep -qx "$node_b=true"; do
      [ "$SECONDS" -lt "$deadline" ] || die "RWX: $pv was not attached on $node_b while the writer ran"
      sleep 0.5
    done
    t0=$(now)
    k delete pod writer-rwx -n "$ns" --wait=false >/dev/null
    line=$(wait_log reader-rwx "r3map-e2e: verified") || die "RWX: the data did not survive the migration"
    t1=$(now)
    say "RWX live migration: reader on $node_b verified every byte"
    say "RWX downtime (writer deleted -> reader verified): $(secs "$t0" "$t1") s; in the reader: ${line##*bytes in }"
    k delete pod reader-rwx -n "$ns" --wait=true >/dev/null
  fi
fi

# --- Uninstall and check nothing is left. ---
left=()
pvs=$(k get pvc -n "$ns" -o jsonpath='{.items[*].spec.volumeName}')
k delete pvc --all -n "$ns" --wait=true >/dev/null
for pv in $pvs; do
  k wait --for=delete "pv/$pv" --timeout="${timeout}s" >/dev/null 2>&1 || left+=("PV $pv")
done
# DeleteVolume removes a volume's record; the CRD may go below, so look now.
records=" $(k get r3mapvolumes -o jsonpath='{.items[*].spec.volumeName}') "
for pv in $pvs; do
  case $records in *" $pv "*) left+=("the R3mapVolume of $pv") ;; esac
done
k delete configmap r3map-e2e-workload -n "$ns" >/dev/null
helm uninstall "$release" -n "$ns" --wait --timeout "${timeout}s" >/dev/null
# What the release leaves in its namespace (the namespace's own default
# ServiceAccount and root CA ConfigMap aside; leader-election Leases are
# reported, they belong to no release).
kinds=pods,services,deployments,statefulsets,daemonsets,persistentvolumeclaims,secrets,configmaps,serviceaccounts,roles,rolebindings
while read -r obj; do
  case $obj in ""|serviceaccount/default|configmap/kube-root-ca.crt) ;; *) left+=("$obj") ;; esac
done < <(k get "$kinds" -n "$ns" -o name)
leases=$(k get leases -n "$ns" -o name | tr '\n' ' ')
[ -z "$leases" ] || say "leader-election Leases left in $ns (removed with it): $leases"
k delete namespace "$ns" --wait=true --timeout="${timeout}s" >/dev/null
[ "$crd_before" = 1 ] || k delete crd r3mapvolumes.r3map.io --wait=true >/dev/null
trap - EXIT

[ "$crd_before" = 1 ] || ! k get crd r3mapvolumes.r3map.io >/dev/null 2>&1 || left+=("the R3mapVolume CRD")
n=$(k get pv -o jsonpath='{.items[?(@.spec.storageClassName=="'"$sc"'")].metadata.name}' | wc -w)
[ "$n" -eq 0 ] || left+=("$n PV(s) of $sc")
n=$(k get volumeattachments -o jsonpath='{.items[?(@.spec.attacher=="'"$driver"'")].metadata.name}' | wc -w)
[ "$n" -eq 0 ] || left+=("$n VolumeAttachment(s) of $driver")
! k get namespace "$ns" >/dev/null 2>&1 || left+=("namespace $ns")
! k get csidriver "$driver" >/dev/null 2>&1 || left+=("CSIDriver $driver")
! k get storageclass "$sc" >/dev/null 2>&1 || left+=("StorageClass $sc")
for kind in clusterroles clusterrolebindings; do
  n=$(k get "$kind" -l app.kubernetes.io/instance="$release" -o name | wc -l)
  [ "$n" -eq 0 ] || left+=("$n $kind")
done
[ "${#left[@]}" -eq 0 ] || die "left behind after uninstall: ${left[*]}"
say "uninstalled; nothing left behind"
say "PASS"
