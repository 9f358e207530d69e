#!/usr/bin/env bash
# Two "hosts" made of network namespaces joined by a veth pair, and a live
# migration between them. Needs root (ip netns), the r3map binary, nbdcopy
# and fio.
#
#   two-hosts.sh up NAME          create NAME-a (10.77.0.1) and NAME-b (10.77.0.2)
#   two-hosts.sh down NAME        delete them (idempotent)
#   two-hosts.sh migrate R3MAP    the whole scenario below, cleaning up on exit
#
# The scenario: host a serves a memory region (NBD on a unix socket, Seed on
# 10.77.0.1 with a token); random writes go to it; host b runs `r3map leech`
# through the delay relay (RTT) to 10.77.0.1; fio keeps writing on a until
# finalize; then b's export must equal a's final content byte for byte.
#
# Environment: SIZE (256MiB), RTT (2ms), RATE (unset: no limit; e.g. 1gbit
# adds a tbf qdisc on both veth ends), NAME (r3mig$$), WORK (a temp dir).
set -euo pipefail

A_IP=10.77.0.1
B_IP=10.77.0.2

up() {
  local n=$1
  down "$n"
  ip netns add "$n-a"
  ip netns add "$n-b"
  # veth names are limited to 15 characters: derive short ones.
  local va="${n:0:10}va" vb="${n:0:10}vb"
  ip link add "$va" type veth peer name "$vb"
  ip link set "$va" netns "$n-a"
  ip link set "$vb" netns "$n-b"
  ip -n "$n-a" addr add "$A_IP/24" dev "$va"
  ip -n "$n-b" addr add "$B_IP/24" dev "$vb"
  for h in a b; do
    ip -n "$n-$h" link set lo up
  done
  ip -n "$n-a" link set "$va" up
  ip -n "$n-b" link set "$vb" up
  if [ -n "${RATE:-}" ]; then
    tc -n "$n-a" qdisc add dev "$va" root tbf rate "$RATE" burst 256kb latency 50ms
    tc -n "$n-b" qdisc add dev "$vb" root tbf rate "$RATE" burst 256kb latency 50ms
  fi
  echo "two-hosts: $n-a ($A_IP) <-> $n-b ($B_IP)${RATE:+ at $RATE}"
}

down() {
  local n=$1
  # Deleting a namespace deletes its end of the veth, and so the pair.
  ip netns del "$n-a" 2>/dev/null || true
  ip netns del "$n-b" 2>/dev/null || true
}

wait_for() { # path-or-port test, description
  local i
  for i in $(seq 1 200); do
    if eval "$1"; then return 0; fi
    sleep 0.05
  done
  echo "two-hosts: timed out waiting for $2" >&2
  return 1
}

bytes() { # 256MiB, 1GiB or a plain number of bytes
  case $1 in
    *GiB) echo $(( ${1%GiB} << 30 )) ;;
    *MiB) echo $(( ${1%MiB} << 20 )) ;;
    *KiB) echo $(( ${1%KiB} << 10 )) ;;
    *) echo "$1" ;;
  esac
}

# Globals, so the EXIT trap still sees them after migrate() returns.
name="" work="" pids=()

migrate() {
  local bin=$1
  name=${NAME:-r3mig$$}
  local size=${SIZE:-256MiB} rtt=${RTT:-2ms}
  work=${WORK:-$(mktemp -d)}
  cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    down "$name"
    [ -n "${WORK:-}" ] || rm -rf "$work"
  }
  trap cleanup EXIT
  up "$name"

  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/token"
  local ns_a="ip netns exec $name-a" ns_b="ip netns exec $name-b"

  # Host a: the source serves its region and the Seed service.
  $ns_a "$bin" serve --backend memory: --size "$size" --chunk-size 64KiB \
    --socket "$work/a.sock" --seed-listen "$A_IP:7001" --token-file "$work/token" \
    2>"$work/a.log" &
  pids+=($!)
  wait_for "[ -S '$work/a.sock' ]" "the source's NBD socket"
  local uri_a="nbd+unix:///r3map?socket=$work/a.sock"
  # Content before the migration: random data over the first half.
  head -c "$(( $(bytes "$size") / 2 ))" /dev/urandom >"$work/seed.img"
  nbdcopy "$work/seed.img" "$uri_a"

  # Host b: the relay adds the RTT on b's loopback; the leech pulls through it.
  $ns_b "$bin" relay --listen 127.0.0.1:7100 --to "$A_IP:7001" --rtt "$rtt" 2>"$work/relay.log" &
  pids+=($!)
  wait_for "$ns_b bash -c 'exec 3<>/dev/tcp/127.0.0.1/7100' 2>/dev/null" "the relay"
  local t0
  t0=$(date +%s.%N)
  $ns_b "$bin" leech --from 127.0.0.1:7100 --token-file "$work/token" \
    --cache "$work/b.cache" --socket "$work/b.sock" --control "$work/b.ctl" \
    2>"$work/b.log" &
  local leech=$!
  pids+=($leech)
  wait_for "[ -S '$work/b.sock' ] && [ -S '$work/b.ctl' ]" "the leech"

  # Writes on a during pre-copy and right up to finalize; they start to fail
  # (EIO) at finalize, which ends fio with an error: expected.
  fio --name=w --ioengine=nbd --uri="$uri_a" --rw=randwrite --bs=4k --iodepth=8 \
    --time_based --runtime=60 --rate=20m --output="$work/fio.out" >/dev/null 2>&1 &
  local fio=$!
  pids+=($fio)
  sleep 2
  "$bin" finalize --leech "$work/b.ctl" --token-file "$work/token" | tee "$work/finalize.out"
  wait "$fio" 2>/dev/null || true
  "$bin" finalize --leech "$work/b.ctl" --token-file "$work/token" --wait >/dev/null
  local t1
  t1=$(date +%s.%N)

  # Destination equals the source's final content (writes are closed there).
  nbdcopy "$uri_a" "$work/a.final"
  nbdcopy "nbd+unix:///r3map?socket=$work/b.sock" "$work/b.final"
  if ! cmp "$work/a.final" "$work/b.final"; then
    echo "two-hosts: FAIL: destination differs from the source" >&2
    tail -20 "$work/a.log" "$work/b.log" >&2
    exit 1
  fi
  if ! kill -0 "$leech"; then
    echo "two-hosts: FAIL: the leech exited" >&2
    exit 1
  fi
  echo "two-hosts: migrated $size over veth (rtt $rtt${RATE:+, rate $RATE}) in $(awk "BEGIN{printf \"%.2f\", $t1 - $t0}") s: identical"
}

case "${1:-}" in
  up) up "${2:?name}" ;;
  down) down "${2:?name}" ;;
  migrate) migrate "${2:?path to the r3map binary}" ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
