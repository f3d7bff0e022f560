package testenv

import (
	"strconv"
	"strings"
	"syscall"
)

// LinkEventDrops sums, over the NETLINK_ROUTE sockets subscribed to link
// events (RTNLGRP_LINK) in table, a namespace's /proc/net/netlink, the
// messages the kernel dropped for them: how the watch's overflow shows.
func LinkEventDrops(table []byte) int {
	// sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
	drops := 0
	for _, line := range strings.Split(string(table), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 10 || f[1] != "0" { // NETLINK_ROUTE
			continue
		}
		groups, err := strconv.ParseUint(f[3], 16, 32)
		if err != nil || groups&(1<<(syscall.RTNLGRP_LINK-1)) == 0 {
			continue
		}
		n, _ := strconv.Atoi(f[8])
		drops += n
	}
	return drops
}
