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

	"github.com/cdevfs/cdevfs/devnode"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Capability bits in /proc/PID/status CapEff (linux/capability.h).
const (
	capChown    = 0  // CAP_CHOWN: chown to anyone, chgrp to any group
	capFowner   = 3  // CAP_FOWNER: chmod and set times of files one does not own
	capFsetid   = 4  // CAP_FSETID: keep S_ISGID on chmod outside the group
	capNetAdmin = 12 // CAP_NET_ADMIN: create interfaces (clone)
)

// caller returns the FUSE caller of a request.
func caller(ctx context.Context) fuse.Caller {
	if c, ok := fuse.FromContext(ctx); ok {
		return *c
	}
	return fuse.Caller{}
}

// withActor returns ctx carrying the FUSE caller as devnode's actor, so
// that the cloner's create and destroy logs name the process behind them.
func withActor(ctx context.Context) context.Context {
	c := caller(ctx)
	return devnode.WithActor(ctx, devnode.Actor{Pid: c.Pid, Uid: c.Uid})
}

// creds are a FUSE caller's credentials. The kernel passes the uid, gid
// and pid; the supplementary groups and effective capabilities come from
// /proc/PID/status, read once per request that needs them. The daemon
// checks permissions itself (no default_permissions mount option), so
// that every refusal reaches it and is logged; these are the facts the
// kernel's checks would use.
type creds struct {
	uid, gid, pid uint32
	groups        []uint32
	capEff        uint64
}

// credsOf reads the caller's credentials. uid 0 needs nothing more (it
// is treated as holding every capability, as cdevfs always has); if the
// caller's /proc entry cannot be read (it exited, or lives in another pid
// namespace) it has no supplementary group and no capability.
func credsOf(ctx context.Context) *creds {
	c := caller(ctx)
	cr := &creds{uid: c.Uid, gid: c.Gid, pid: c.Pid}
	if c.Uid == 0 {
		return cr
	}
	st, err := procStatus(c.Pid)
	if err != nil {
		return cr
	}
	cr.capEff, _ = strconv.ParseUint(st["CapEff"], 16, 64)
	for _, g := range strings.Fields(st["Groups"]) {
		if n, err := strconv.ParseUint(g, 10, 32); err == nil {
			cr.groups = append(cr.groups, uint32(n))
		}
	}
	return cr
}

// hasCap reports whether the caller holds capability bit (uid 0 holds all).
func (c *creds) hasCap(bit uint) bool {
	return c.uid == 0 || c.capEff&(1<<bit) != 0
}

// privileged reports whether the caller may clone interfaces: uid 0 or
// CAP_NET_ADMIN in its effective set (DESIGN.md, "Open, close, destroy").
func (c *creds) privileged() bool { return c.hasCap(capNetAdmin) }

// inGroup reports whether gid is the caller's primary group or one of its
// supplementary groups (FUSE passes only the primary one).
func (c *creds) inGroup(gid uint32) bool {
	if c.gid == gid {
		return true
	}
	for _, g := range c.groups {
		if g == gid {
			return true
		}
	}
	return false
}

// permitted checks want (a mask of 4 read, 2 write, 1 exec) against an
// entry's mode and owner as the kernel's generic_permission would: the
// owner's bits for the owner, else the group's bits for a member of the
// group, else the others' bits; uid 0 may do anything.
func (c *creds) permitted(a devnode.Attr, want uint32) bool {
	if c.uid == 0 {
		return true
	}
	var bits uint32
	switch {
	case c.uid == a.Uid:
		bits = a.Mode >> 6
	case c.inGroup(a.Gid):
		bits = a.Mode >> 3
	default:
		bits = a.Mode
	}
	return bits&7&want == want
}

// owns reports whether the caller may act as the entry's owner for chmod
// and utimes: the owner itself, or CAP_FOWNER (inode_owner_or_capable).
func (c *creds) owns(a devnode.Attr) bool {
	return c.uid == a.Uid || c.hasCap(capFowner)
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

// accessWant maps open flags to the permission bits they need; O_TRUNC
// needs write permission whatever the access mode, as in Linux's
// build_open_flags.
func accessWant(flags uint32) uint32 {
	var want uint32
	switch flags & syscall.O_ACCMODE {
	case syscall.O_WRONLY:
		want = 2
	case syscall.O_RDWR:
		want = 6
	default:
		want = 4
	}
	if flags&syscall.O_TRUNC != 0 {
		want |= 2
	}
	return want
}
