#!/bin/sh
# Port of the transient and 235704 cases of FreeBSD's tests/sys/net/if_tun_test.sh
# to cdevfs. FreeBSD runs them in a vnet jail; here the caller gives a mount and
# the network namespace of the daemon serving it.
#
# usage: if_tun_test.sh CASE MOUNT NETNS BINDIR
#   CASE    transient | 235704
#   MOUNT   a cdevfs mountpoint
#   NETNS   path of the daemon's network namespace (/proc/PID/ns/net)
#   BINDIR  where transient_tuntap and icmpecho were built
set -eu
case_name=$1 mnt=$2 netns=$3 bindir=$4

ifconfig() { nsenter --net="$netns" ip "$@"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

# "ifconfig tun create": a lookup of a free unit creates it; print its name.
tun_create() {
	for unit in $(seq 20 60); do
		if ! ifconfig link show "tun$unit" >/dev/null 2>&1; then
			stat "$mnt/tun$unit" >/dev/null && { echo "tun$unit"; return 0; }
		fi
	done
	return 1
}

# gone NAME: wait up to 2 s for NAME to leave the kernel (the close reaches
# the daemon asynchronously and the destroy runs on a worker).
gone() {
	for _ in $(seq 200); do
		ifconfig link show "$1" >/dev/null 2>&1 || return 0
		sleep 0.01
	done
	return 1
}

# unlisted NAME: wait up to 2 s for NAME to leave the mount's listing.
unlisted() {
	for _ in $(seq 200); do
		ls "$mnt" | grep -qx "$1" || return 0
		sleep 0.01
	done
	return 1
}

transient_body() {
	tun=$(tun_create) || fail "tun create"
	ifconfig link show "$tun" >/dev/null || fail "$tun missing after create"
	"$bindir/transient_tuntap" "$mnt/$tun" || fail "transient_tuntap"
	gone "$tun" || fail "$tun still exists after the last close of a transient device"
	unlisted "$tun" || fail "$tun still listed after its transient close"
}

# FreeBSD PR 235704: renaming a tun then destroying it must not panic. Here:
# the node keeps its name and proxies packets after the rename; deleting the
# renamed interface revokes the node.
body_235704() {
	tun=$(tun_create) || fail "tun create"
	ifconfig link set "$tun" name foo || fail "rename"
	ifconfig addr add 198.18.0.1/32 peer 198.18.0.2 dev foo
	ifconfig link set foo up
	"$bindir/icmpecho" "$mnt/$tun" 198.18.0.2 198.18.0.1 3 || fail "echo through $tun after rename"
	ifconfig link del foo || fail "destroy foo"
	gone foo || fail "foo not deleted"
	unlisted "$tun" || fail "$tun still listed after foo was deleted"
}

case $case_name in
transient) transient_body ;;
235704) body_235704 ;;
*) fail "unknown case $case_name" ;;
esac
echo "ok $case_name"
