#!/bin/sh
# container.sh: run a program in a throwaway container whose /dev is a
# cdevfs tree, with a network namespace of its own.
#
#   usage (as root): container.sh PROGRAM [ARG...]
#   CDEVFS=/path/to/cdevfs picks the binary (default: cdevfs on PATH)
#
# 1. unshare gives the container new mount and network namespaces; every
#    mount below is private to them (unshare makes propagation private),
#    so the machine's own /dev is never touched.
# 2. cdevfs serves its tree on a scratch directory, from the container's
#    network namespace: the interfaces that opening /dev/tun creates are
#    the container's. The daemon stays outside step 3's view, because it
#    needs the real /dev/fuse and /dev/net/tun.
# 3. PROGRAM runs in one more mount namespace, where the tree is
#    bind-mounted over /dev: it opens /dev/tun, /dev/null, ... unmodified.
# 4. When PROGRAM exits, SIGTERM stops cdevfs, which destroys the
#    interfaces it created and unmounts. PROGRAM's exit status is ours.
set -eu

if [ -z "${CDEVFS_CONTAINER:-}" ]; then
	CDEVFS_CONTAINER=1 exec unshare --mount --net -- "$0" "$@"
fi
[ $# -gt 0 ] || { echo "usage: container.sh PROGRAM [ARG...]" >&2; exit 2; }

dev=$(mktemp -d "${TMPDIR:-/tmp}/cdevfs-container.XXXXXX")
# --allow-other: a container process that is not root may use the tree.
"${CDEVFS:-cdevfs}" mount --allow-other "$dev" &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon; rmdir "$dev"' EXIT

# The tree serves once the clone node is there.
tries=0
until [ -e "$dev/tun" ]; do
	kill -0 $daemon 2>/dev/null || { echo "container.sh: cdevfs exited" >&2; exit 1; }
	tries=$((tries + 1))
	[ $tries -le 100 ] || { echo "container.sh: cdevfs did not serve in 10s" >&2; exit 1; }
	sleep 0.1
done

status=0
unshare --mount -- sh -c 'mount --bind "$1" /dev && shift && exec "$@"' sh "$dev" "$@" || status=$?
exit $status
