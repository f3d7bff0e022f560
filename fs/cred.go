package fs

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// capNetAdmin is CAP_NET_ADMIN's bit in /proc/PID/status CapEff.
const capNetAdmin = 12

// caller returns the FUSE caller of a request.
func caller(ctx context.Context) fuse.Caller {
	if c, ok := fuse.FromContext(ctx); ok {
		return *c
	}
	return fuse.Caller{}
}

// privileged reports whether the caller may clone interfaces: uid 0 or
// CAP_NET_ADMIN in its effective set (DESIGN.md, "Open, close, destroy").
func privileged(c fuse.Caller) bool {
	if c.Uid == 0 {
		return true
	}
	st, err := procStatus(c.Pid)
	if err != nil {
		return false
	}
	eff, err := strconv.ParseUint(st["CapEff"], 16, 64)
	return err == nil && eff&(1<<capNetAdmin) != 0
}

// procStatus reads the fields of /proc/PID/status. The pid is the one the
// kernel put in the FUSE header, translated to our pid namespace.
func procStatus(pid uint32) (map[string]string, error) {
	if pid == 0 {
		return nil, errors.New("caller pid not visible")
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m := make(map[string]string)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m, sc.Err()
}

// inGroup reports whether the caller's primary or supplementary groups
// include gid. FUSE passes only the primary gid; the others come from
// /proc/PID/status.
func inGroup(c fuse.Caller, gid uint32) bool {
	if c.Gid == gid {
		return true
	}
	st, err := procStatus(c.Pid)
	if err != nil {
		return false
	}
	for _, g := range strings.Fields(st["Groups"]) {
		if n, err := strconv.ParseUint(g, 10, 32); err == nil && uint32(n) == gid {
			return true
		}
	}
	return false
}

// permitted checks want (a mask of 4 read, 2 write, 1 exec) against a
// node's mode and owner, as the kernel would with default_permissions. The
// daemon checks itself instead of mounting with default_permissions so
// that every refusal reaches it and is logged.
func permitted(c fuse.Caller, mode, uid, gid uint32, want uint32) bool {
	if c.Uid == 0 {
		return true
	}
	var bits uint32
	switch {
	case c.Uid == uid:
		bits = mode >> 6
	case inGroup(c, gid):
		bits = mode >> 3
	default:
		bits = mode
	}
	return bits&7&want == want
}

// accessWant maps open flags to the permission bits they need.
func accessWant(flags uint32) uint32 {
	switch flags & syscall.O_ACCMODE {
	case syscall.O_WRONLY:
		return 2
	case syscall.O_RDWR:
		return 6
	}
	return 4
}
