# Sourced by the node plugin's guest scenarios (csi.sh, multiconn.sh,
# throughput.sh) after they set SCENARIO and FAIL_LOGS (files whose tails a
# failure prints): the marker helpers, the kernel parameters r3map_host,
# r3map_port, r3map_seed and r3map_vol, the modules, the network to the
# host (10.0.2.2) and the credentials check. Markers as in netlink.sh.
export PATH=/bin:/sbin
log() { echo "R3MAP-GUEST: $*"; }
up() { cut -d' ' -f1 /proc/uptime; }
dt() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
bye() { sync; poweroff -f; sleep 5; echo o >/proc/sysrq-trigger; }
fail() {
	log "FAIL $*"
	for f in $FAIL_LOGS; do [ -f "$f" ] && { echo "--- $f"; tail -20 "$f"; }; done
	dmesg | grep -i nbd | tail -30
	bye
}
finding() { log "FINDING $*"; }
wait_line() { # wait_line FILE PATTERN TENTHS
	i=0
	until grep -q "$2" "$1" 2>/dev/null; do
		i=$((i + 1)); [ $i -gt "$3" ] && return 1; sleep 0.1
	done
}

host=10.0.2.2 port= seed= vol=
for kv in $(cat /proc/cmdline); do
	case $kv in
	r3map_host=*) host=${kv#*=} ;;
	r3map_port=*) port=${kv#*=} ;;
	r3map_seed=*) seed=${kv#*=} ;;
	r3map_vol=*) vol=${kv#*=} ;;
	esac
done
[ -n "$port" ] && [ -n "$seed" ] && [ -n "$vol" ] || fail "missing r3map_port/r3map_seed/r3map_vol"
log "$SCENARIO scenario booted at $(up)s"

M=/lib/modules
for m in $(cat $M/load); do
	insmod $M/$m || fail "insmod $m"
done
ip link set lo up
i=0
while ! ip link show eth0 >/dev/null 2>&1; do
	i=$((i + 1)); [ $i -gt 100 ] && fail "no eth0"; sleep 0.1
done
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || fail "eth0 setup"
[ -f /etc/r3map/token ] && [ -f /etc/r3map/ca.crt ] || fail "no credentials in /etc/r3map"
